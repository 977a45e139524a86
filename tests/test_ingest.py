"""DICOM ingest: geometry as SimpleITK reads it, every transfer syntax, robustness, privacy and accounting."""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from conftest import ROOT, out_args
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from stages.archive import dicom_index
from stages.archive import pseudonym as pn
from stages.archive.dicom_index import ClassifyRules, read_header, scan_header, walk
from stages.archive.dicom_volume import SeriesError, assemble, decode_slice
from stages.archive.manifest import IngestOutputs
from stages.ingest import ingest_dicom

CT_SERIES = ROOT.parent / "shared" / "fixtures" / "siemens_ct_series"
RULES = ClassifyRules.from_config()
KEY = b"a test key of more than sixteen bytes"


def _key(cohort: Path) -> bytes:
    return pn.load_key(cohort / "pseudonym.key")


@pytest.fixture(scope="module")
def tiny_ingest(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ingest")
    truth = tiny_cohort / "truth"
    summary = ingest_dicom(tiny_cohort / "dicom", IngestOutputs.in_folder(out), _key(tiny_cohort), RULES, workers=2,
                           label_dir=truth / "labels", gradings=truth / "gradings.csv", subjects=truth / "subjects.csv")
    return out, summary


def _itk(paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


def _itk_folder(folder: Path) -> sitk.Image:
    return _itk([Path(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))])


def assert_same_image(ours: sitk.Image, theirs: sitk.Image) -> None:
    assert ours.GetSize() == theirs.GetSize()
    np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours).astype(float), sitk.GetArrayFromImage(theirs).astype(float))


# --- geometry -------------------------------------------------------------------------------------------------------

def test_demo_volumes_equal_simpleitk_series_reader(tiny_cohort, tiny_ingest, tmp_path):
    out, _ = tiny_ingest
    manifest = pd.read_parquet(out / "manifest.parquet")
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    planted = set(pd.read_csv(tiny_cohort / "truth" / "planted_files.csv").path)
    key = _key(tiny_cohort)
    for study in studies.itertuples():
        row = manifest[manifest.scan_id == pn.series_id(key, study.sag_t2_series_uid)].iloc[0]
        # SimpleITK reads the series' own files only (the planted duplicate would upset GDCM's sorting).
        clean = tmp_path / study.sag_t2_series_uid
        clean.mkdir()
        for p in (tiny_cohort / study.sag_t2_dir).iterdir():
            if str(p.relative_to(tiny_cohort)) not in planted:
                shutil.copyfile(p, clean / p.name)
        assert_same_image(sitk.ReadImage(str(out / row.volume)), _itk_folder(clean))
    assert len(studies) == len(manifest)


def test_label_maps_travel_with_their_volumes(tiny_ingest):
    out, summary = tiny_ingest
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert summary["with_label_map"] == len(manifest) > 0
    for row in manifest.itertuples():
        label, image = sitk.ReadImage(str(out / row.label_map)), sitk.ReadImage(str(out / row.volume))
        assert label.GetSize() == image.GetSize()
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)


def test_real_ct_series_matches_simpleitk_and_is_rejected_by_default_selection(tmp_path):
    assert CT_SERIES.is_dir(), f"fixture missing: {CT_SERIES} (the shared/ folder must lie beside the project)"
    files = walk(CT_SERIES)
    records = [read_header(p) for p in files]
    assert not any(r["problem"] for r in records)
    volume = assemble(records)
    ours, theirs = volume.to_sitk(), _itk_folder(CT_SERIES)
    assert_same_image(ours, theirs)
    assert volume.spacing[2] == pytest.approx(2.0, abs=1e-3)  # from the positions, not SliceThickness (3 mm)
    summary_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="no volume could be written"):
        ingest_dicom(CT_SERIES, IngestOutputs.in_folder(summary_dir), KEY, RULES)
    files_table = pd.read_csv(summary_dir / "files.csv")
    assert (files_table.status == "skipped").all() and len(files_table) == len(files)
    reason = files_table.reason.iloc[0]
    assert "modality CT not in ['MR']" in reason and "plane axial not in ['sagittal']" in reason
    # Selected as CT, it is still refused: it carries no identity to pseudonymise.
    with pytest.raises(RuntimeError):
        ingest_dicom(CT_SERIES, IngestOutputs.in_folder(tmp_path / "ct"), KEY,
                     ClassifyRules.from_config({"modality": ["CT"], "plane": ["axial"]}))
    assert set(pd.read_csv(tmp_path / "ct" / "files.csv").reason) == {"missing identity: empty PatientID"}


# --- transfer syntaxes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
                                  "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_padded.dcm"])
def test_pydicom_test_files_decode_to_the_same_pixels(name, tmp_path):
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    records = []
    for i, source in enumerate((name, name)):  # two slices so that assemble() has a volume to make
        ds = pydicom.dcmread(get_testdata_file(source))
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.SOPInstanceUID = f"1.2.3.{i}"
        path = tmp_path / f"s{i}"
        ds.save_as(path)
        records.append(read_header(path))
    volume = assemble(records)
    assert np.array_equal(volume.array[0], reference)


def test_truncated_file_is_quarantined_with_the_reason():
    record = read_header(Path(get_testdata_file("MR_truncated.dcm")))
    assert record["problem"].startswith("truncated")


def _pydicom_test_files() -> list[Path]:
    """pydicom's own test files (those installed with it; none is downloaded)."""
    return sorted(p for p in Path(get_testdata_file("MR_small.dcm")).parent.rglob("*") if p.is_file())


def _header_variants(tiny_cohort: Path, dest: Path) -> dict[str, tuple[Path, bool]]:
    """Files that exercise the header walk, each with whether the walk reads it (True) or leaves it to pydicom."""
    source = _series_copy(tiny_cohort, dest / "plain")[0]
    variants = {"plain": (source, True)}

    def variant(name: str, fast: bool, change, cut: float | None = None, append: bytes = b"") -> None:
        ds = pydicom.dcmread(source)
        change(ds)
        path = dest / name
        ds.save_as(path)
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * cut)] if cut else data + append)
        variants[name] = (path, fast)

    def sequences(ds: Dataset) -> None:
        inner, item = Dataset(), Dataset()
        inner.CodeValue, inner.CodeMeaning = "T-D1100", "Spine"
        item.ReferencedSOPInstanceUID, item.AnatomicRegionSequence = "1.2.3.4", [inner]
        ds.ReferencedImageSequence = [item]
        ds["ReferencedImageSequence"].is_undefined_length = True
        ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True

    def implicit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        sequences(ds)

    def names(charset, name: str, institution: str):
        def change(ds: Dataset) -> None:
            ds.SpecificCharacterSet, ds.PatientName, ds.InstitutionName = charset, name, institution
        return change

    def odd_values(ds: Dataset) -> None:
        ds.PatientName, ds.EchoTime, ds.ImageType = "", None, "ORIGINAL"
        ds.SeriesDescription = ["SAG", "T2"]  # a backslash in LO: a multi-valued element
        ds.InversionTime = " 2200.5 "

    def long_header(ds: Dataset) -> None:  # a vendor's private block (as Siemens' CSA) before Rows, Columns...
        ds.private_block(0x0019, "SPINE-SSL TEST", create=True).add_new(0x10, "OB", bytes(3 * dicom_index.HEAD_BYTES))

    variant("sequences", True, sequences)
    variant("implicit_vr", True, implicit)
    variant("latin1", True, names("ISO_IR 100", "MÜLLER^JÜRGEN", "KLINIK SÜD"))
    variant("utf8", True, names("ISO_IR 192", "ØVREBØ^ÅSE", "SJUKHUS ÖST"))
    variant("iso2022", True, names(["", "ISO 2022 IR 87"], "YAMADA^TAROU=山田^太郎", "SPITAL"))
    variant("long_header", True, long_header)  # read again, whole, when the first read ends inside the header
    variant("odd_values", True, odd_values)
    # An element after the pixel data repeats one before it: pydicom keeps the later one, and so must the walk.
    variant("after_pixels", True, lambda ds: None, append=b"\x08\x00\x60\x00CS\x02\x00CT")
    variant("truncated", True, lambda ds: None, cut=0.6)
    variant("cut_in_header", False, lambda ds: None, cut=0.01)
    return variants


def test_header_walk_reads_the_same_fields_as_pydicom(tiny_cohort, tmp_path, monkeypatch):
    variants = _header_variants(tiny_cohort, tmp_path)
    files = [path for path, _ in variants.values()]
    files += _pydicom_test_files()  # every transfer syntax, DICOMDIRs, files without preamble or meta
    walked = [read_header(p) for p in files]
    for name, (path, fast) in variants.items():
        assert (scan_header(path) is not None) == fast, name
    monkeypatch.setattr(dicom_index, "scan_header", lambda *args, **kwargs: None)  # pydicom.dcmread for every file
    for path, ours in zip(files, walked):
        reference = read_header(path)
        assert ours.keys() == reference.keys(), path
        for key, value in reference.items():
            both_nan = isinstance(value, float) and math.isnan(value) and math.isnan(ours[key])
            assert ours[key] == value or both_nan, (path, key)
    assert walked[files.index(variants["after_pixels"][0])]["modality"] == "CT"
    assert walked[files.index(variants["truncated"][0])]["problem"].startswith("truncated")
    assert "山田" in walked[files.index(variants["iso2022"][0])]["patient_name"]


def test_pixels_read_at_the_walked_offset_equal_pydicom_pixel_array(tiny_cohort, tmp_path):
    variants = _header_variants(tiny_cohort, tmp_path)
    files = [path for name, (path, _) in variants.items() if name not in ("truncated", "cut_in_header")]
    files += _pydicom_test_files()
    compared = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            reference = ds.pixel_array
        except Exception:  # noqa: BLE001, S112 - not an image pydicom can decode: nothing to compare
            continue
        if reference.ndim != 2:
            with pytest.raises(SeriesError):
                decode_slice(str(path))
            continue
        pixels, slope, intercept = decode_slice(str(path))
        assert pixels.dtype == reference.dtype and np.array_equal(pixels, reference), path
        assert (slope, intercept) == (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
        compared += 1
    assert compared >= 30


def _series_copy(tiny_cohort: Path, dest: Path, transfer_syntax=None) -> list[Path]:
    """The first study's sagittal T2 copied into dest, optionally re-encoded."""
    study = pd.read_csv(tiny_cohort / "truth" / "studies.csv").iloc[0]
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sorted((tiny_cohort / study.sag_t2_dir).iterdir()):
        ds = pydicom.dcmread(src)
        if transfer_syntax == JPEGBaseline8Bit:
            image = (ds.pixel_array / 16).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds["PixelData"].VR = "OB"
        elif transfer_syntax is not None:
            ds.compress(transfer_syntax)
        path = dest / src.name
        ds.save_as(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series_give_the_same_volume(tiny_cohort, tmp_path, syntax):
    plain = assemble([read_header(p) for p in _series_copy(tiny_cohort, tmp_path / "plain")])
    packed_files = _series_copy(tiny_cohort, tmp_path / "packed", syntax)
    assert pydicom.dcmread(packed_files[0]).file_meta.TransferSyntaxUID == syntax
    packed = assemble([read_header(p) for p in packed_files])
    assert np.array_equal(plain.array, packed.array)
    np.testing.assert_allclose(plain.origin, packed.origin)


def test_jpeg_baseline_series_decodes_close_to_the_original(tiny_cohort, tmp_path):
    plain = assemble([read_header(p) for p in _series_copy(tiny_cohort, tmp_path / "plain")])
    lossy = assemble([read_header(p) for p in _series_copy(tiny_cohort, tmp_path / "jpeg", JPEGBaseline8Bit)])
    expected = (plain.array / 16).astype(np.uint8).astype(float)
    assert np.abs(lossy.array.astype(float) - expected).mean() < 2.0


def test_undecodable_pixel_data_is_named(tiny_cohort, tmp_path):
    files = _series_copy(tiny_cohort, tmp_path / "s", JPEG2000Lossless)
    ds = pydicom.dcmread(files[3])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 this is not a codestream" * 4])
    ds.save_as(files[3])
    with pytest.raises(SeriesError) as err:
        assemble([read_header(p) for p in files])
    assert "undecodable pixel data" in err.value.files[str(files[3])]


# --- robustness -----------------------------------------------------------------------------------------------------

def test_shuffled_and_renamed_files_give_the_same_volume(tiny_cohort, tmp_path):
    files = _series_copy(tiny_cohort, tmp_path / "a")
    reference = assemble([read_header(p) for p in files])
    renamed = []
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    for i, p in enumerate(shuffled):
        target = tmp_path / "b" / ("deeper" if i % 2 else "") / f"{random.Random(i).randrange(10**9)}.dcm"
        shutil.copyfile(p, target)
        renamed.append(target)
    again = assemble([read_header(p) for p in walk(tmp_path / "b")])
    assert np.array_equal(reference.array, again.array)
    np.testing.assert_allclose(reference.origin, again.origin)


def test_instance_numbers_do_not_decide_the_order(tiny_cohort, tmp_path):
    files = _series_copy(tiny_cohort, tmp_path / "s")
    reference = assemble([read_header(p) for p in files])
    for i, p in enumerate(files):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = [5, 1, 9, 3, 7, 2, 8, 4, 6][i % 9]
        ds.save_as(p)
    assert np.array_equal(assemble([read_header(p) for p in files]).array, reference.array)


def test_missing_slice_is_detected(tiny_cohort, tmp_path):
    files = _series_copy(tiny_cohort, tmp_path / "s")
    records = [read_header(p) for p in files]
    records.sort(key=lambda r: np.dot(r["ipp"], np.cross(r["iop"][:3], r["iop"][3:])))
    del records[4]
    with pytest.raises(SeriesError, match="missing slice"):
        assemble(records)


def test_duplicate_slice_is_dropped_and_a_conflicting_one_is_refused(tiny_cohort, tmp_path):
    files = _series_copy(tiny_cohort, tmp_path / "s")
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1351.99"  # re-sent under a new UID
    ds.save_as(tmp_path / "s" / "copy")
    records = [read_header(p) for p in walk(tmp_path / "s")]
    volume = assemble(records)
    assert volume.array.shape[0] == len(files)
    assert len(volume.dropped) == 1 and "duplicate slice" in next(iter(volume.dropped.values()))
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "s" / "copy")
    with pytest.raises(SeriesError, match="two different images at one position"):
        assemble([read_header(p) for p in walk(tmp_path / "s")])


def test_two_series_mixed_in_one_folder_and_an_empty_patient_id(tiny_cohort, tmp_path):
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    mixed = tmp_path / "archive" / "one_folder"
    mixed.mkdir(parents=True)
    for i, study in enumerate(studies.iloc[:2].itertuples()):
        for p in (tiny_cohort / study.sag_t2_dir).iterdir():
            if not p.name.endswith("_1"):
                shutil.copyfile(p, mixed / f"{i}_{p.name}")
    blank = tmp_path / "archive" / "blank"
    blank.mkdir()
    for p in (tiny_cohort / studies.iloc[2].sag_t2_dir).iterdir():
        ds = pydicom.dcmread(p)
        ds.PatientID = ""
        ds.save_as(blank / p.name)
    summary = ingest_dicom(tmp_path / "archive", IngestOutputs.in_folder(tmp_path / "out"), KEY, RULES)
    assert summary["volumes"] == 2
    files = pd.read_csv(tmp_path / "out" / "files.csv")
    blank_rows = files[files.file.str.startswith("blank/")]
    assert set(blank_rows.reason) == {"missing identity: empty PatientID"}
    assert set(files[files.file.str.startswith("one_folder/")].status) == {"used"}


def test_run_where_everything_fails_exits_non_zero(tmp_path):
    archive = tmp_path / "junk"
    archive.mkdir()
    (archive / "a.txt").write_text("hello")
    shutil.copyfile(get_testdata_file("MR_truncated.dcm"), archive / "b")
    key = tmp_path / "key"
    key.write_text("x" * 32)
    run = subprocess.run([sys.executable, "-m", "stages.ingest", "--dicom-dir", str(archive), "--key-file", str(key),
                          *out_args(IngestOutputs.in_folder(tmp_path / "out"))], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 1
    assert "no volume could be written from 2 files" in run.stderr
    assert len(pd.read_csv(tmp_path / "out" / "files.csv")) == 2


def test_missing_or_short_key_is_a_clear_error(tmp_path):
    with pytest.raises(pn.PseudonymKeyError, match="SPINE_SSL_PSEUDONYM_KEY"):
        pn.load_key(None, environ={})
    short = tmp_path / "k"
    short.write_text("abc")
    with pytest.raises(pn.PseudonymKeyError, match="at least 16"):
        pn.load_key(short)
    assert pn.load_key(None, environ={pn.KEY_ENV: "k" * 20}) == b"k" * 20


# --- privacy and accounting -----------------------------------------------------------------------------------------

def _identity_strings(cohort: Path) -> set[str]:
    subjects = pd.read_csv(cohort / "truth" / "subjects.csv", dtype=str)
    studies = pd.read_csv(cohort / "truth" / "studies.csv", dtype=str)
    values: set[str] = set()
    for row in subjects.itertuples():
        values |= {row.patient_id, row.patient_name, row.patient_name.replace("^", " "), row.birth_date,
                   row.birth_date.replace("-", "")}
    for row in studies.itertuples():
        values |= {row.accession_number, row.study_date, row.study_date.replace("-", ""), row.study_uid,
                   row.sag_t2_series_uid}
    values.add("RIVERSIDE GENERAL HOSPITAL")
    return {v for v in values if v and len(v) >= 6}


def _output_texts(out: Path) -> dict[str, str]:
    texts = {}
    for path in out.rglob("*"):
        if path.is_dir():
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        if path.suffix == ".parquet":
            data = pd.read_parquet(path).to_csv(index=False).encode()
        texts[str(path.relative_to(out))] = data.decode("latin-1")
    return texts


def test_no_identity_in_any_output_file_name_or_log(tiny_cohort, tmp_path):
    """Plant identity in the headers (and in a folder name), then look for it in everything ingest wrote."""
    archive = tmp_path / "archive"
    shutil.copytree(tiny_cohort / "dicom", archive)
    subjects = pd.read_csv(tiny_cohort / "truth" / "subjects.csv", dtype=str)
    victim = next(p for p in archive.iterdir() if p.is_dir())
    surname = subjects.patient_name.iloc[0].split("^")[0]
    victim.rename(archive / f"{surname}_export")
    log = tmp_path / "ingest.log"
    key = tmp_path / "key"
    key.write_text("k" * 32)
    truth = tiny_cohort / "truth"
    run = subprocess.run([sys.executable, "-m", "stages.ingest", "--dicom-dir", str(archive),
                          *out_args(IngestOutputs.in_folder(tmp_path / "out")),
                          "--key-file", str(key), "--gradings", str(truth / "gradings.csv"),
                          "--subjects", str(truth / "subjects.csv"), "--label-dir", str(truth / "labels"),
                          "--log", str(log)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    texts = _output_texts(tmp_path / "out")
    texts["<log>"] = log.read_text() + run.stdout + run.stderr
    identity = _identity_strings(tiny_cohort) | {surname}
    for name, text in texts.items():
        assert not [v for v in identity if v.lower() in name.lower()], f"identity in the file name {name}"
        leaks = [v for v in identity if v.lower() in text.lower()]
        assert not leaks, f"{name} contains {leaks[:3]}"
    assert "[redacted]" in texts["files.csv"]


def test_every_file_is_accounted_for_exactly_once(tiny_cohort, tiny_ingest):
    out, summary = tiny_ingest
    files = pd.read_parquet(out / "files.parquet")
    on_disk = [str(p.relative_to(tiny_cohort / "dicom")) for p in walk(tiny_cohort / "dicom")]
    assert sorted(files.file) == sorted(on_disk)
    assert files.file.is_unique
    assert set(files.status) <= {"used", "skipped", "quarantined"}
    assert summary["used"] + summary["skipped"] + summary["quarantined"] == summary["files"] == len(on_disk)
    manifest = pd.read_parquet(out / "manifest.parquet")
    second = pd.read_parquet(out / "second_series.parquet")  # each study's axial T2 (ingest.second_series)
    assert manifest.n_source_files.sum() + second.n_source_files.sum() == summary["used"]
    planted = pd.read_csv(tiny_cohort / "truth" / "planted_files.csv")
    by_file = files.set_index("file")
    for row in planted.itertuples():
        status, reason = by_file.loc[row.path.removeprefix("dicom/"), ["status", "reason"]]
        assert status == "quarantined", row
        expected = {"truncated": "truncated", "not_dicom": "not DICOM", "no_pixel_data": "no pixel data",
                    "duplicate": "duplicate file"}[row.kind]
        assert reason.startswith(expected)
    json.loads((out / "summary.json").read_text())


def test_manifest_is_one_row_per_study_with_time_and_scanner(tiny_cohort, tiny_ingest):
    out, _ = tiny_ingest
    manifest = pd.read_csv(out / "manifest.csv")
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    assert len(manifest) == len(studies) and manifest.scan_id.is_unique
    assert manifest.subject_id.nunique() == studies.patient_id.nunique()
    key = _key(tiny_cohort)
    truth = studies.assign(scan_id=[pn.series_id(key, u) for u in studies.sag_t2_series_uid]).merge(manifest, on="scan_id")
    days = truth.days_since_first_study / 365.25
    np.testing.assert_allclose(days, truth.years_from_baseline, atol=0.01)
    np.testing.assert_allclose(truth.field_strength_t_x, truth.field_strength_t_y)
    assert (truth.manufacturer_x == truth.manufacturer_y).all()
    assert manifest.age_years.between(18, 90).all()
    gradings = pd.read_csv(out / "gradings.csv")
    assert set(gradings.study_id) <= set(manifest.study_id)
    assert {"subject_id", "family_id", "sex"} <= set(pd.read_csv(out / "subjects.csv").columns)


def test_dicomdir_is_accounted_for_and_not_needed(tiny_cohort, tmp_path):
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for p in _series_copy(tiny_cohort, tmp_path / "src"):
        fileset.add(pydicom.dcmread(p))
    fileset.write(tmp_path / "media")
    summary = ingest_dicom(tmp_path / "media", IngestOutputs.in_folder(tmp_path / "out"), KEY, RULES)
    files = pd.read_csv(tmp_path / "out" / "files.csv").set_index("file")
    assert files.loc["DICOMDIR", "status"] == "skipped" and files.loc["DICOMDIR", "reason"].startswith("DICOMDIR")
    assert summary["volumes"] == 1 and summary["used"] == len(files) - 1


def test_ingest_in_shards_equals_one_job(tiny_cohort, tiny_ingest, tmp_path):
    """Plan (by subject), one job per shard, merge: the same outputs as one ingest job (issue 9)."""
    from stages.ingest import ingest_shard, merge_shards, plan_shards

    out, _ = tiny_ingest
    key, truth = _key(tiny_cohort), tiny_cohort / "truth"
    plan_file = tmp_path / "plan" / "plan.parquet"
    plan = plan_shards(tiny_cohort / "dicom", plan_file, tmp_path / "plan" / "plan.json", key, 2, scans_per_shard=4)
    assert plan["shards"] == 4 and plan["files"] == len(walk(tiny_cohort / "dicom"))
    table = pd.read_parquet(plan_file)
    assert set(table.shard) == {-1, 0, 1, 2, 3}
    shards = []
    for i in range(plan["shards"]):
        ingest_shard(tiny_cohort / "dicom", plan_file, i, tmp_path / f"shard{i}", key, RULES, 1, truth / "labels")
        shards.append(tmp_path / f"shard{i}")
    subjects = [set(pd.read_parquet(s / "manifest.parquet").subject_id) for s in shards]
    assert all(not a & b for n, a in enumerate(subjects) for b in subjects[n + 1:])  # a subject in one shard
    merged = tmp_path / "merged"
    merge_shards(plan_file, shards, IngestOutputs.in_folder(merged), key, truth / "gradings.csv",
                 truth / "subjects.csv")
    for name in ("manifest.csv", "files.csv", "series.csv", "gradings.csv", "subjects.csv", "summary.json",
                 "second_series.csv"):
        assert (merged / name).read_text() == (out / name).read_text(), name
    for folder in ("volumes", "labels", "second"):
        ours = sorted(p.name for p in (merged / folder).iterdir())
        assert ours == sorted(p.name for p in (out / folder).iterdir()) and ours
        assert all((merged / folder / n).read_bytes() == (out / folder / n).read_bytes() for n in ours)
    # the plan names files by keyed hashes and scrubbed paths only
    names = set(pd.read_csv(tiny_cohort / "truth" / "subjects.csv", dtype=str).patient_id)
    assert not [n for n in names if table.to_csv().find(n) >= 0]


def test_ingest_shard_modes_need_a_plan(tiny_cohort, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stages.ingest", "--dicom-dir", str(tiny_cohort / "dicom"),
                               "--key-file", str(tiny_cohort / "pseudonym.key"), *args], capture_output=True,
                              text=True, cwd=ROOT)
    bad = run("--shard", "0", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "--shard needs --plan" in bad.stderr
    bad = run("--shard", "0", "--plan", str(tmp_path), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "is not a file" in bad.stderr
    bad = run("--out-plan", str(tmp_path / "p.parquet"), "--shard", "0", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "one at a time" in bad.stderr
    bad = run("--out-plan", str(tmp_path / "p.parquet"), "--out-plan-summary", str(tmp_path / "p.json"))
    assert bad.returncode == 2 and "--scans-per-shard" in bad.stderr
    bad = run("--shard", "0")
    assert bad.returncode == 2 and "--shard needs --plan" in bad.stderr
    bad = run("--gradings", str(tiny_cohort / "truth" / "gradings.csv"))
    assert bad.returncode == 2 and "--out-volumes is required" in bad.stderr
