"""The demo cohort as written to disk: real DICOM as a scanner writes it, ground truth that matches it."""

from __future__ import annotations

import datetime as dt
import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TINY

from stages.demo import genome
from stages.demo import phantom as ph
from stages.demo.synth_dicom import read_volume
from stages.demo_cohort import DemoConfig, DemoOutputs, generate, plan_cohort

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "EchoTime", "RepetitionTime",
            "MagneticFieldStrength", "StudyDate", "SeriesDescription", "Manufacturer", "PatientID", "PatientName",
            "PatientBirthDate", "AccessionNumber")


def _truth(cohort: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth" / f"{name}.csv", dtype={"patient_id": str, "accession_number": str})


def _files(cohort: Path) -> list[Path]:
    return sorted(p for p in (cohort / "dicom").rglob("*") if p.is_file())


def _plane(ds: pydicom.Dataset) -> str:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return "SAG COR AX".split()[int(np.argmax(np.abs(np.cross(iop[:3], iop[3:]))))]


def test_every_file_but_the_planted_ones_is_a_complete_mr_image(tiny_cohort):
    planted = set(_truth(tiny_cohort, "planted_files").path)
    files = _files(tiny_cohort)
    assert all("." not in p.name for p in files), "file names carry no extension"
    assert all(len(p.relative_to(tiny_cohort / "dicom").parts) == 4 for p in files if p.name != "LOCKFILE")
    for path in files:
        if str(path.relative_to(tiny_cohort)) in planted:
            continue
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        for key in REQUIRED:
            assert key in ds, f"{path}: {key} missing"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        pydicom.uid.UID(ds.SOPInstanceUID).is_valid


def test_each_study_has_the_four_series_with_their_planes(tiny_cohort):
    studies = _truth(tiny_cohort, "studies")
    for study in studies.itertuples():
        planes = {}
        for key in ("localizer_dir", "sag_t1_dir", "sag_t2_dir", "axial_t2_dir"):
            datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tiny_cohort / getattr(study, key)).iterdir()
                        if p.name != "IM00001_1"]
            planes[key] = sorted({_plane(d) for d in datasets})
            assert {d.StudyInstanceUID for d in datasets} == {study.study_uid}
        assert planes == {"localizer_dir": ["AX", "COR", "SAG"], "sag_t1_dir": ["SAG"], "sag_t2_dir": ["SAG"],
                          "axial_t2_dir": ["AX"]}


def test_label_map_has_the_series_geometry_and_every_level(tiny_cohort):
    planted = {str(Path(p).parent) for p in _truth(tiny_cohort, "planted_files").path}
    checked = 0
    for study in _truth(tiny_cohort, "studies").itertuples():
        label = sitk.ReadImage(str(tiny_cohort / study.label_map))
        present = set(np.unique(sitk.GetArrayFromImage(label))) - {0}
        assert present == {*ph.VERTEBRA_LABELS.values(), *ph.DISC_LABELS.values()}
        if study.sag_t2_dir in planted:
            continue  # a duplicate slice upsets GDCM's sorting; that is the ingest stage's problem to handle
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tiny_cohort / study.sag_t2_dir)))
        image = reader.Execute()
        checked += 1
        assert label.GetSize() == image.GetSize()
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-4)
    assert checked >= 5


def test_landmarks_are_the_centres_of_the_labelled_structures(tiny_cohort):
    studies = _truth(tiny_cohort, "studies")
    marks = _truth(tiny_cohort, "landmarks")
    for study in studies.itertuples():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_cohort / study.label_map)))  # (k, j, i)
        for mark in marks[marks.series_uid == study.sag_t2_series_uid].itertuples():
            k, j, i = np.nonzero(label == mark.label)
            error = np.abs(np.array([i.mean(), j.mean(), k.mean()]) - [mark.i, mark.j, mark.k])
            assert np.all(error[:2] < 1.0), f"{mark.level}: in-plane centroid off by {error[:2]} voxels"
            # Left-right, a structure wider than the slab is cut off: its centroid is then biased, not its centre.
            if k.min() > 0 and k.max() < label.shape[0] - 1:
                assert error[2] < 1.0, f"{mark.level}: centroid off by {error[2]} slices"
            assert 0 <= round(mark.k) < label.shape[0]


def test_disc_grades_are_visible_in_the_dicom_pixels(tiny_cohort):
    studies = _truth(tiny_cohort, "studies")
    grades = _truth(tiny_cohort, "gradings")
    marks = _truth(tiny_cohort, "landmarks")
    signal = {g: [] for g in range(1, 6)}
    for study in studies.itertuples():
        files = [p for p in (tiny_cohort / study.sag_t2_dir).iterdir() if not p.name.endswith("_1")]
        volume, _ = read_volume(files)
        csf = np.percentile(volume, 99.5)
        for row in grades[grades.study_uid == study.study_uid].itertuples():
            mark = marks[(marks.series_uid == study.sag_t2_series_uid) & (marks.level == row.level)].iloc[0]
            k, j, i = (int(round(x)) for x in (mark.k, mark.j, mark.i))
            signal[row.pfirrmann].append(volume[k, j, i - 1:i + 2].mean() / csf)
    means = {g: np.mean(v) for g, v in signal.items() if v}
    low = [means[g] for g in (1, 2) if g in means]
    high = [means[g] for g in (4, 5) if g in means]
    assert low and high
    assert min(low) > max(high) + 0.15, means


def test_follow_ups_are_the_same_person_years_later_on_another_scanner(tiny_cohort):
    studies = _truth(tiny_cohort, "studies")
    grades = _truth(tiny_cohort, "gradings")
    marks = _truth(tiny_cohort, "landmarks")
    followed = studies.groupby("patient_id").filter(lambda g: len(g) > 1)
    assert followed.patient_id.nunique() >= 2
    for pid, group in followed.groupby("patient_id"):
        group = group.sort_values("visit")
        base = group.iloc[0]
        identities = set()
        for study in group.itertuples():
            ds = pydicom.dcmread(next((tiny_cohort / study.localizer_dir).iterdir()), stop_before_pixels=True)
            identities.add((ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex))
            assert float(ds.MagneticFieldStrength) == study.field_strength_t
        assert len(identities) == 1 and identities.pop()[0] == pid
        for study in group.iloc[1:].itertuples():
            years = (dt.date.fromisoformat(study.study_date) - dt.date.fromisoformat(base.study_date)).days / 365.25
            assert TINY.followup_years[0] - 0.01 <= years <= TINY.followup_years[1] + 0.01
            assert study.field_strength_t == TINY.followup_field_t != base.field_strength_t
        # Vertebral bodies keep their size; discs only lose height; grades never improve.
        heights = marks[(marks.patient_id == pid) & (marks.structure == "vertebra")].pivot(
            index="series_uid", columns="level", values="height_mm")
        assert np.allclose(heights.values, heights.values[0])
        discs = marks[(marks.patient_id == pid) & (marks.structure == "disc")].merge(
            group[["sag_t2_series_uid", "visit"]], left_on="series_uid", right_on="sag_t2_series_uid")
        disc_h = discs.pivot(index="visit", columns="level", values="height_mm").sort_index()
        assert np.all(np.diff(disc_h.values, axis=0) <= 1e-9)
        g = grades[grades.patient_id == pid].merge(group[["study_uid", "visit"]]).pivot(
            index="visit", columns="level", values="pfirrmann").sort_index()
        assert np.all(np.diff(g.values, axis=0) >= 0)


def test_families_twins_and_unlabelled_subjects(tiny_cohort):
    subjects = _truth(tiny_cohort, "subjects")
    studies = _truth(tiny_cohort, "studies")
    grades = _truth(tiny_cohort, "gradings")
    twins = subjects[subjects.twin == 1].groupby("family_id")
    assert twins.ngroups == round(TINY.n_subjects * TINY.twin_fraction / 2)
    for _, pair in twins:
        assert len(pair) == 2
        assert pair.patient_name.str.split("^").str[0].nunique() == 1  # a shared surname
        assert pair.birth_date.nunique() == 1 and pair.sex.nunique() == 1
    assert subjects.patient_id.is_unique and studies.accession_number.is_unique
    unlabelled = set(subjects.patient_id[subjects.graded == 0])
    assert len(unlabelled) == round(TINY.n_subjects * TINY.unlabelled_fraction)
    assert not unlabelled & set(grades.patient_id)
    per_study = grades.groupby("study_uid").size()
    assert set(per_study.index) == set(studies.study_uid[~studies.patient_id.isin(unlabelled)])
    assert (per_study == 6).all()
    assert grades.pfirrmann.between(1, 5).all() and grades.herniation.isin([0, 1]).all()


def test_planted_bad_files_are_bad_in_the_intended_way(tiny_cohort):
    planted = _truth(tiny_cohort, "planted_files").set_index("kind")
    assert set(planted.index) == {"truncated", "not_dicom", "no_pixel_data", "duplicate"}
    with pytest.raises(Exception):
        pydicom.dcmread(tiny_cohort / planted.loc["truncated", "path"]).pixel_array
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(tiny_cohort / planted.loc["not_dicom", "path"])
    assert "PixelData" not in pydicom.dcmread(tiny_cohort / planted.loc["no_pixel_data", "path"])
    assert filecmp.cmp(tiny_cohort / planted.loc["duplicate", "path"], tiny_cohort / planted.loc["duplicate", "detail"],
                       shallow=False)


def test_same_seed_same_bytes_other_seed_other_cohort(tmp_path):
    cfg = DemoConfig.from_config(dict(seed=11, n_subjects=3, followup_fraction=0.5, matrix=40, slices=5))
    generate(cfg, DemoOutputs.in_folder(tmp_path / "a"), workers=1)
    generate(cfg, DemoOutputs.in_folder(tmp_path / "b"), workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))
    for name in ("subjects", "studies", "gradings", "landmarks", "planted_files"):
        assert filecmp.cmp(tmp_path / "a" / "truth" / f"{name}.csv", tmp_path / "b" / "truth" / f"{name}.csv", shallow=False)
    other = plan_cohort(DemoConfig.from_config(dict(seed=12, n_subjects=3, followup_fraction=0.5)))
    assert [s.patient_id for s in other] != [s.patient_id for s in plan_cohort(cfg)]


def test_generator_refuses_to_mix_two_cohorts(tmp_path):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "old").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(DemoConfig.from_config({"n_subjects": 2}), DemoOutputs.in_folder(tmp_path))


def test_twins_have_zygosity_and_inherited_genotypes_and_the_truth_names_the_planted_snps(tiny_cohort):
    subjects = _truth(tiny_cohort, "subjects")
    genotypes = pd.read_csv(tiny_cohort / "truth" / "genotypes.csv", dtype={"patient_id": str})
    assert list(genotypes.patient_id) == list(subjects.patient_id)
    dosages = genotypes.drop(columns="patient_id").to_numpy()
    assert set(np.unique(dosages)) <= {0, 1, 2} and dosages.shape[1] == TINY.snps
    zygosity = subjects.zygosity.fillna("")
    assert set(zygosity[subjects.twin == 1]) <= {"MZ", "DZ"} and set(zygosity[subjects.twin == 0]) == {""}
    for _, family in subjects[subjects.twin == 1].groupby("family_id"):
        pair = dosages[family.index]
        assert len(family) == 2 and set(family.zygosity) in ({"MZ"}, {"DZ"})
        assert np.array_equal(pair[0], pair[1]) == (family.zygosity.iloc[0] == "MZ")
    truth = json.loads((tiny_cohort / "truth" / "genetics.json").read_text())
    assert {s["snp"] for s in truth["planted_snps"]} <= set(genotypes.columns)
    assert len(truth["planted_snps"]) == TINY.planted_snps
    assert truth["liability"]["h2"] == pytest.approx(TINY.planted_snps * TINY.planted_snp_share + TINY.polygenic_share)
    assert 0 < truth["expected"]["h2"] < truth["liability"]["h2"]


def test_the_demo_liability_has_the_planted_twin_covariances():
    # the classical twin model: cov(MZ) = a + c, cov(DZ) = a / 2 + c, var = 1 (the liability is standardised)
    cfg = DemoConfig.from_config({"snps": 50, "planted_snps": 2, "planted_snp_share": 0.2, "polygenic_share": 0.2,
                                  "shared_env_share": 0.15})
    model = genome.genetic_model(np.random.default_rng(0), cfg.snps, cfg.planted_snps, cfg.planted_snp_share,
                                 cfg.polygenic_share, cfg.shared_env_share)
    assert model.h2 == pytest.approx(0.6) and model.unique == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    for kind, share in (("MZ", 1.0), ("DZ", 0.5)):
        pairs = np.array([genome.family_liabilities(model, rng, [kind, kind], float(rng.normal()))[1]
                          for _ in range(4000)]) + np.sqrt(model.unique) * rng.normal(size=(4000, 2))
        assert pairs.var() == pytest.approx(1.0, abs=0.07)
        assert np.cov(pairs.T)[0, 1] == pytest.approx(share * model.h2 + model.shared, abs=0.07)
    with pytest.raises(ValueError, match="at most 1"):
        genome.genetic_model(rng, 10, 3, 0.3, 0.2, 0.1)
