"""Enhanced (multi-frame) MR objects, orthonormal orientations and one-slice series in DICOM ingest.

An enhanced object is built here from the demo's single-frame slices (pydicom ships no enhanced MR file offline), so
the single-frame series is the reference: the same slices as the frames of one object must give the same volume,
voxel for voxel and in geometry, and the same accounting of duplicates and gaps.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian

from stages.archive import dicom_index
from stages.archive import pseudonym as pn
from stages.archive.dicom_index import ClassifyRules, read_header
from stages.archive.dicom_volume import ORTHONORMAL_TOL, SeriesError, assemble, orientation_problem
from stages.archive.manifest import IngestOutputs
from stages.core.config import ConfigError
from stages.demo.synth_dicom import uid
from stages.ingest import ingest_dicom

RULES = ClassifyRules.from_config()
KEY = b"a multi-frame key of more than sixteen bytes"
# The top-level attributes an enhanced object shares with its series' single-frame files.
COPIED = ("SpecificCharacterSet", "StudyDate", "SeriesDate", "StudyTime", "AccessionNumber", "Modality",
          "Manufacturer", "InstitutionName", "SeriesDescription", "ManufacturerModelName", "PatientName", "PatientID",
          "PatientBirthDate", "PatientSex", "PatientAge", "MagneticFieldStrength", "StudyInstanceUID",
          "SeriesInstanceUID", "SeriesNumber", "FrameOfReferenceUID", "Rows", "Columns", "SamplesPerPixel",
          "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
GROUPS = ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence", "MREchoSequence",
          "MRTimingAndRelatedParametersSequence")


def _item(**values) -> Sequence:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return Sequence([item])


def _groups(ds: Dataset) -> dict[str, Sequence]:
    """The functional groups of one single-frame MR file (position excepted), from its top-level attributes."""
    return {
        "PlaneOrientationSequence": _item(ImageOrientationPatient=ds.ImageOrientationPatient),
        "PixelMeasuresSequence": _item(PixelSpacing=ds.PixelSpacing, **{
            k: ds[k].value for k in ("SliceThickness", "SpacingBetweenSlices") if k in ds}),
        "PixelValueTransformationSequence": _item(RescaleSlope=ds.get("RescaleSlope", 1),
                                                  RescaleIntercept=ds.get("RescaleIntercept", 0), RescaleType="US"),
        "MREchoSequence": _item(EffectiveEchoTime=float(ds.EchoTime)),
        "MRTimingAndRelatedParametersSequence": _item(RepetitionTime=float(ds.RepetitionTime)),
    }


def enhanced_mr(sources: list[Path], path: Path, per_frame: tuple[str, ...] = ()) -> Path:
    """Write the single-frame files ``sources`` as the frames (in that order) of one Enhanced MR Image Storage object:
    each frame's ImagePositionPatient in its PlanePositionSequence, the functional groups named in ``per_frame`` per
    frame and the others shared (taken from the first file), no geometry, echo or timing at the top level."""
    slices = [pydicom.dcmread(p) for p in sources]
    first = slices[0]
    sop_uid = uid("enhanced", *[s.SOPInstanceUID for s in slices], *per_frame)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = EnhancedMRImageStorage, sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in COPIED:
        setattr(ds, keyword, first[keyword].value)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.InstanceNumber = EnhancedMRImageStorage, sop_uid, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    for keyword, value in _groups(first).items():
        if keyword not in per_frame:
            setattr(shared, keyword, value)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k, s in enumerate(slices):
        frame = Dataset()
        frame.FrameContentSequence = _item(InStackPositionNumber=k + 1)
        frame.PlanePositionSequence = _item(ImagePositionPatient=s.ImagePositionPatient)
        for keyword, value in _groups(s).items():
            if keyword in per_frame:
                setattr(frame, keyword, value)
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _series(cohort: Path) -> list[Path]:
    """The first study's sagittal T2 (nine single-frame files, none of them planted), in position order."""
    study = pd.read_csv(cohort / "truth" / "studies.csv").iloc[0]
    files = sorted((cohort / study.sag_t2_dir).iterdir())
    normal = np.cross(*np.reshape(read_header(files[0])["iop"], (2, 3)))
    return sorted(files, key=lambda p: float(np.dot(read_header(p)["ipp"], normal)))


def _copies(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    return [Path(shutil.copyfile(p, folder / p.name)) for p in files]


def _ingest(archive: Path, out: Path, rules: ClassifyRules = RULES) -> dict:
    """Ingest ``archive`` into ``out``; the summary, manifest, files and series tables (no volume: summary None)."""
    try:
        summary = ingest_dicom(archive, IngestOutputs.in_folder(out), KEY, rules)
    except RuntimeError:
        summary = None
    return {"summary": summary, "manifest": pd.read_csv(out / "manifest.csv"), "files": pd.read_csv(out / "files.csv"),
            "series": pd.read_csv(out / "series.csv"), "out": out}


def _volume(result: dict) -> sitk.Image:
    (row,) = result["manifest"].itertuples()
    return sitk.ReadImage(str(result["out"] / row.volume))


def assert_identical(ours: sitk.Image, reference: sitk.Image) -> None:
    assert ours.GetSize() == reference.GetSize()
    assert ours.GetOrigin() == reference.GetOrigin()
    assert ours.GetSpacing() == reference.GetSpacing()
    assert ours.GetDirection() == reference.GetDirection()
    assert sitk.GetArrayViewFromImage(ours).dtype == sitk.GetArrayViewFromImage(reference).dtype
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))


# --- enhanced multi-frame MR ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_frame", [(), GROUPS], ids=["shared_groups", "per_frame_groups"])
def test_enhanced_object_gives_the_volume_of_its_single_frame_slices(tiny_cohort, tmp_path, per_frame):
    files = _copies(_series(tiny_cohort), tmp_path / "single" / "series")
    if per_frame:  # a different rescale on every slice: per frame in the enhanced object
        for k, p in enumerate(files):
            ds = pydicom.dcmread(p)
            ds.RescaleSlope, ds.RescaleIntercept = 2, -10 * k
            ds.save_as(p)
    shuffled = files[:]
    random.Random(5).shuffle(shuffled)  # frame order is not slice order
    enhanced = enhanced_mr(shuffled, tmp_path / "multi" / "series" / "ENHANCED.dcm", per_frame)
    single, multi = _ingest(tmp_path / "single", tmp_path / "out_single"), _ingest(tmp_path / "multi", tmp_path / "out")

    assert_identical(_volume(multi), _volume(single))
    assert (tmp_path / "out" / multi["manifest"].volume[0]).read_bytes() == \
        (tmp_path / "out_single" / single["manifest"].volume[0]).read_bytes()
    assert _volume(multi).GetSize() == (64, 64, len(files))
    if per_frame:
        raw = np.stack([pydicom.dcmread(p).pixel_array for p in files]).astype(float)
        expected = raw * 2 - 10 * np.arange(len(files))[:, None, None]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(_volume(multi)), expected)
    # the same classification and manifest row, one file accounted for
    columns = ["modality", "plane", "weighting", "weighting_source", "localizer"]
    assert multi["series"][columns].to_dict("records") == single["series"][columns].to_dict("records")
    assert multi["series"].weighting[0] == "T2" and multi["series"].weighting_source[0] == "TE/TR"
    differ = {"n_source_files"}
    assert multi["manifest"].drop(columns=list(differ)).equals(single["manifest"].drop(columns=list(differ)))
    assert multi["manifest"].n_source_files[0] == 1 and single["manifest"].n_source_files[0] == len(files)
    scan_id = pn.series_id(KEY, pydicom.dcmread(enhanced).SeriesInstanceUID)
    assert multi["files"][["file", "status", "reason"]].to_dict("records") == [
        {"file": "series/ENHANCED.dcm", "status": "used", "reason": f"in volume {scan_id}"}]
    assert multi["summary"]["used"] == 1 and multi["summary"]["files"] == 1


def test_enhanced_header_is_read_from_its_functional_groups(tiny_cohort, tmp_path, monkeypatch):
    files = _series(tiny_cohort)
    path = enhanced_mr(files, tmp_path / "ENHANCED.dcm", per_frame=("PlaneOrientationSequence",))
    record = read_header(path)
    source = read_header(files[0])
    assert not record["problem"] and record["frames"] == len(files) == len(record["frame_geometry"])
    for key in ("echo_time", "repetition_time", "iop", "ipp", "pixel_spacing", "slice_thickness", "spacing_between"):
        assert record[key] == source[key], key
    assert [g["ipp"] for g in record["frame_geometry"]] == [read_header(p)["ipp"] for p in files]
    assert {g["slope"] for g in record["frame_geometry"]} == {1.0}
    # the header walk leaves multi-frame files to pydicom, so both paths give the same record
    monkeypatch.setattr(dicom_index, "scan_header", lambda *args, **kwargs: None)
    assert read_header(path) == record


def test_slices_of_a_series_may_be_split_between_enhanced_objects(tiny_cohort, tmp_path):
    files = _series(tiny_cohort)
    reference = assemble([read_header(p) for p in files])
    parts = [enhanced_mr(files[5:], tmp_path / "b.dcm"), enhanced_mr(files[:5][::-1], tmp_path / "a.dcm")]
    volume = assemble([read_header(p) for p in parts])
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.spacing, reference.spacing)
    np.testing.assert_array_equal(volume.origin, reference.origin)
    assert volume.used == [str(parts[1]), str(parts[0])] and not volume.dropped


def test_duplicated_frame_is_left_out_like_a_duplicated_file(tiny_cohort, tmp_path):
    files = _copies(_series(tiny_cohort), tmp_path / "single" / "series")
    copy = files[3].with_name(files[3].name + "_1")
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = uid("re-sent", ds.SOPInstanceUID)  # re-sent under a new UID
    ds.save_as(copy)
    enhanced_mr([*files, files[3]], tmp_path / "multi" / "series" / "ENHANCED.dcm")
    single, multi = _ingest(tmp_path / "single", tmp_path / "out_single"), _ingest(tmp_path / "multi", tmp_path / "out")
    assert_identical(_volume(multi), _volume(single))
    assert _volume(multi).GetSize()[2] == len(files)
    # single-frame: the copy is quarantined; enhanced: the file is used, the frame left out, both say why
    entry = single["files"].set_index("file").loc[f"series/{copy.name}"]
    assert (entry.status, entry.reason) == ("quarantined",
                                            f"duplicate slice: same position and pixels as series/{files[3].name}")
    (row,) = multi["files"].itertuples()
    assert row.status == "used"
    assert row.reason.endswith(f"; frame {len(files) + 1} left out as a duplicate slice: same position and pixels as "
                               f"frame 4 of series/ENHANCED.dcm")


def test_conflicting_frame_and_gap_are_quarantined_like_single_frame_series(tiny_cohort, tmp_path):
    files = _series(tiny_cohort)
    changed = tmp_path / "changed"
    changed.mkdir()
    ds = pydicom.dcmread(files[3])
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData, ds.SOPInstanceUID = pixels.tobytes(), uid("changed", ds.SOPInstanceUID)
    ds.save_as(changed / "CHANGED")
    cases = {"conflict": [*files, changed / "CHANGED"], "gap": files[:4] + files[5:]}
    for name, members in cases.items():
        _copies(members, tmp_path / name / "single")
        enhanced_mr(members, tmp_path / name / "multi" / "ENHANCED.dcm")
        single = _ingest(tmp_path / name / "single", tmp_path / name / "out_single")
        multi = _ingest(tmp_path / name / "multi", tmp_path / name / "out")
        assert single["summary"] is None and multi["summary"] is None
        reasons = set(single["files"].reason)
        assert len(reasons) == 1 and set(single["files"].status) == {"quarantined"}
        assert multi["files"][["status", "reason"]].to_dict("records") == [
            {"status": "quarantined", "reason": reasons.pop()}]
        expected = {"conflict": "series unusable: two different images at one position",
                    "gap": "series unusable: missing slice(s): a gap of "}[name]
        assert multi["files"].reason[0].startswith(expected)


def test_broken_enhanced_objects_are_accounted_for(tiny_cohort, tmp_path):
    files = _series(tiny_cohort)
    archive = tmp_path / "archive"
    path = enhanced_mr(files, archive / "FEWER_GROUPS.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[-1]
    ds.save_as(path)
    path = enhanced_mr(files, archive / "NO_GROUPS.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
    ds.SeriesInstanceUID = uid("no groups")
    ds.save_as(path)
    result = _ingest(archive, tmp_path / "out")
    reasons = result["files"].set_index("file").reason
    assert reasons["FEWER_GROUPS.dcm"] == ("unreadable functional groups: ValueError: "
                                           f"{len(files) - 1} per-frame functional groups for NumberOfFrames 9")
    assert reasons["NO_GROUPS.dcm"].startswith("series not selected: ")
    assert "multi-frame object without per-frame geometry" in reasons["NO_GROUPS.dcm"]
    assert result["summary"] is None and len(result["files"]) == 2


# --- orientation sanity ---------------------------------------------------------------------------------------------

def test_orientation_problem_measures_length_and_angle():
    assert orientation_problem([0, 1, 0, 0, 0, -1]) is None
    assert orientation_problem([0, 1 + 0.9 * ORTHONORMAL_TOL, 0, 0, 0, -1]) is None
    assert "row length 1.0020" in orientation_problem([0, 1.002, 0, 0, 0, -1])
    assert "column length 0.9980" in orientation_problem([0, 1, 0, 0, 0, -0.998])
    tilted = [0, 1, 0, 0, 2 * ORTHONORMAL_TOL, -1]
    tilted[3:] = list(np.array(tilted[3:]) / np.linalg.norm(tilted[3:]))
    assert "row . column 0.0020" in orientation_problem(tilted)


def _reoriented(files: list[Path], folder: Path, iop: list[float]) -> None:
    folder.mkdir(parents=True)
    for p in files:
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.save_as(folder / p.name)


def test_series_with_a_non_orthonormal_orientation_is_quarantined(tiny_cohort, tmp_path):
    files = _series(tiny_cohort)
    iop = np.array(read_header(files[0])["iop"])
    skewed = np.concatenate([iop[:3], iop[3:] + 0.05 * iop[:3]])  # column sheared towards the row: 2.9 degrees
    _reoriented(files, tmp_path / "bad" / "series", list(skewed))
    result = _ingest(tmp_path / "bad", tmp_path / "out")
    assert result["summary"] is None and len(result["files"]) == len(files)
    assert set(result["files"].status) == {"quarantined"}
    (reason,) = set(result["files"].reason)
    assert reason.startswith("ImageOrientationPatient not orthonormal: ") and "row . column 0.0500" in reason
    assert not list((tmp_path / "out" / "volumes").iterdir())
    # the same series as an enhanced object: its one file quarantined for the same reason
    enhanced_mr(sorted((tmp_path / "bad" / "series").iterdir()), tmp_path / "multi" / "ENHANCED.dcm")
    assert set(_ingest(tmp_path / "multi", tmp_path / "out_multi")["files"].reason) == {reason}


def test_orientation_within_the_tolerance_is_written_orthonormal(tiny_cohort, tmp_path):
    files = _series(tiny_cohort)
    iop = np.array(read_header(files[0])["iop"])
    near = np.concatenate([iop[:3] * (1 + 0.4 * ORTHONORMAL_TOL), iop[3:] + 0.4 * ORTHONORMAL_TOL * iop[:3]])
    _reoriented(files, tmp_path / "near" / "series", list(near))
    assert orientation_problem(list(near)) is None and orientation_problem([round(v, 4) for v in iop]) is None
    # orthonormal before the NIfTI writer sees it (which would coerce it, with a warning), and so after
    volume = assemble([read_header(p) for p in sorted((tmp_path / "near" / "series").iterdir())])
    written = np.reshape(_volume(_ingest(tmp_path / "near", tmp_path / "out")).GetDirection(), (3, 3))
    for direction in (volume.direction, written):
        np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)
        np.testing.assert_allclose(direction[:, 0], near[:3], atol=ORTHONORMAL_TOL)
        np.testing.assert_allclose(direction[:, 1], near[3:], atol=ORTHONORMAL_TOL)
    np.testing.assert_allclose(written, volume.direction, atol=1e-6)


# --- one 2D image ---------------------------------------------------------------------------------------------------

def test_min_slices_may_be_one_but_not_zero():
    assert ClassifyRules.from_config({"min_slices": 1}).min_slices == 1
    with pytest.raises(ConfigError, match="min_slices"):
        ClassifyRules.from_config({"min_slices": 0})


@pytest.mark.parametrize("spacing", ["between", "thickness", "none"])
@pytest.mark.parametrize("kind", ["single_frame", "enhanced"])
def test_one_slice_series_becomes_a_one_slice_volume(tiny_cohort, tmp_path, kind, spacing):
    source = _series(tiny_cohort)[4]  # the mid-sagittal slice
    ds = pydicom.dcmread(source)
    if spacing != "between":
        del ds.SpacingBetweenSlices
    if spacing == "none":
        del ds.SliceThickness
    folder = tmp_path / "archive" / "series"
    folder.mkdir(parents=True)
    ds.save_as(folder / "IM00005")
    if kind == "enhanced":
        enhanced_mr([folder / "IM00005"], folder / "ENHANCED.dcm")
        (folder / "IM00005").unlink()
    name = next(folder.iterdir()).name
    skipped = _ingest(tmp_path / "archive", tmp_path / "out_default")
    assert skipped["summary"] is None
    assert "1 image(s), fewer than min_slices 5" in skipped["files"].reason[0]

    result = _ingest(tmp_path / "archive", tmp_path / "out", ClassifyRules.from_config({"min_slices": 1}))
    image = _volume(result)
    expected = {"between": 4.4, "thickness": 4.0, "none": 1.0}[spacing]
    assert image.GetSize() == (64, 64, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ds.pixel_array[None])
    np.testing.assert_allclose(image.GetSpacing(), (4.6875, 4.6875, expected))
    np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in ds.ImagePositionPatient], atol=1e-9)
    row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)),
                               np.column_stack([row, col, np.cross(row, col)]), atol=1e-5)
    (row_,) = result["manifest"].itertuples()
    assert (row_.size_x, row_.size_y, row_.size_z, row_.spacing_z) == (64, 64, 1, pytest.approx(expected))
    (entry,) = result["files"].itertuples()
    assert (entry.file, entry.status) == (f"series/{name}", "used")
    note = "; one slice without SpacingBetweenSlices or SliceThickness: slice spacing set to 1 mm"
    assert entry.reason == f"in volume {row_.scan_id}" + (note if spacing == "none" else "")


def test_duplicates_of_one_slice_do_not_make_a_series(tiny_cohort, tmp_path):
    source = _series(tiny_cohort)[4]
    records = []
    for i in range(2):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = uid("copy", i)
        ds.save_as(tmp_path / f"s{i}")
        records.append(read_header(tmp_path / f"s{i}"))
    with pytest.raises(SeriesError, match="1 distinct slice position"):
        assemble(records, min_slices=2)
    volume = assemble(records, min_slices=1)
    assert volume.array.shape == (1, 64, 64) and len(volume.dropped) == 1
