"""Crop-table cohorts (cohort.source: crops): level notations, the accounting of every row, the crops brought to the
extraction sizes and normalisation, no identity in any output, and the workflow from the table through pairs, a short
pretraining and probes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, out_args
from crop_cohort import COLUMNS, N_BAD, write_crop_cohort
from test_workflow import snakemake

from stages.anatomy.crops import ExtractConfig, ExtractOutputs
from stages.core import levels
from stages.extract_crops import core_median, extract_crops, fit
from stages.ingest_crops import CropOutputs, CropTableSpec, ingest_crops, read_image

KEY = b"crop-table-test-key-0123456789"
SPEC = CropTableSpec(columns=COLUMNS, labels={"pfirrmann": (1, 5), "herniation": (0, 1)}, count_from="sacrum")
SIZES = ExtractConfig.from_config({"vertebra_size": [48, 48, 5], "disc_size": [16, 32, 5], "axial_size": [16, 16]})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    return write_crop_cohort(tmp_path_factory.mktemp("crops") / "cohort")


@pytest.fixture(scope="module")
def ingested(cohort, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("crops_ingest")
    summary = ingest_crops(cohort[0], CropOutputs.in_folder(out / "ingest"), KEY, SPEC)
    extract_crops(out / "ingest" / "crops.parquet", out / "ingest" / "crops", ExtractOutputs.in_folder(out / "extract"),
                  SIZES)
    return out, summary


@pytest.mark.parametrize("text, kind, count_from, want", [
    ("L4-L5", None, "top", "L4-L5"), ("L4/L5", None, "top", "L4-L5"), ("L4L5", None, "top", "L4-L5"),
    ("l4-5", None, "top", "L4-L5"), ("L5S1", None, "top", "L5-S1"), ("T12-L1", None, "top", "T12-L1"),
    ("s1", None, "top", "S1"), ("1", "disc", "sacrum", "L5-S1"), ("1", "vertebra", "sacrum", "L5"),
    ("0", "vertebra", "sacrum", "S1"), ("6", "vertebra", "sacrum", "T12"), ("1", "disc", "top", "T12-L1"),
    ("7.0", "vertebra", "top", "S1"), ("2", "vertebra", "top", "L1")])
def test_level_notations_are_normalised(text, kind, count_from, want):
    assert levels.normalise_level(text, kind, count_from) == want


@pytest.mark.parametrize("text, kind", [("L6", None), ("T11", None), ("L3-L5", None), ("8", "vertebra"),
                                        ("7", "disc"), ("disc", None), ("L4", "disc"), ("L4-L5", "vertebra"),
                                        ("3", None)])
def test_unknown_levels_are_errors(text, kind):
    with pytest.raises(levels.LevelError):
        levels.normalise_level(text, kind)


def test_every_row_is_accounted_for_with_its_reason(cohort, ingested):
    table_path, counts = cohort
    out, summary = ingested
    files = pd.read_csv(out / "ingest" / "files.csv")
    assert len(files) == counts["rows"] == summary["files"]
    assert (files.status == "used").sum() == counts["good"] == summary["crops"]
    bad = files[files.status != "used"].reason.tolist()
    assert len(bad) == N_BAD
    expected = ["missing file", "unreadable image", "duplicated row: the same image as row 4", "'T11' is outside",
                "pfirrmann='7' out of range"]
    for reason, want in zip(bad, expected):
        assert want in reason, (reason, want)
    crops = pd.read_parquet(out / "ingest" / "crops.parquet")
    assert set(crops.dimensions) == {2, 3} and summary["crops_2d"] == (crops.dimensions == 2).sum() > 0
    assert len(crops) == len(set(zip(crops.scan_id, crops.level)))  # one crop per acquisition and level
    assert summary["labelled_discs_without_both_bodies"] == 0


def test_duplicated_structure_is_reported(cohort, tmp_path):
    table = pd.read_csv(cohort[0])
    first = cohort[0].parent / table.File.iloc[0]
    other = tmp_path / ("copy" + first.suffix)
    other.write_bytes(first.read_bytes())
    twin = table.iloc[[0]].assign(File=str(other))  # another image of the same subject, acquisition and level
    rows = pd.concat([table.iloc[:2].assign(File=[str(cohort[0].parent / f) for f in table.File.iloc[:2]]), twin])
    rows.to_csv(tmp_path / "t.csv", index=False)
    summary = ingest_crops(tmp_path / "t.csv", CropOutputs.in_folder(tmp_path / "ingest"), KEY, SPEC)
    files = pd.read_csv(tmp_path / "ingest" / "files.csv")
    assert summary["used"] == 2
    assert summary["labelled_discs_without_both_bodies"] == 0  # the two rows are bodies
    assert files.reason.iloc[2] == "duplicated structure: the same subject, acquisition and level as row 2"


def test_acquisitions_and_time_define_the_studies(cohort, ingested):
    out, _ = ingested
    manifest = pd.read_parquet(out / "ingest" / "manifest.parquet")
    table = pd.read_csv(cohort[0])
    good = table.iloc[:cohort[1]["good"]]
    assert len(manifest) == good.groupby(["Patient", "Sequence"]).ngroups
    assert manifest.study_id.is_unique  # "T2" of two subjects are two studies
    per_subject = manifest.groupby("subject_id").days_since_first_study.agg(["min", "max", "size"])
    assert (per_subject["min"] == 0).all()
    assert set(per_subject[per_subject["size"] == 2]["max"]) == {366}  # 2019-03-01 -> 2020-03-01
    subjects = pd.read_parquet(out / "ingest" / "subjects.parquet")
    assert subjects.family_id.nunique() == len(subjects) - 1  # subjects 12 and 13 are twins


def test_gradings_come_from_the_disc_rows(cohort, ingested):
    out, _ = ingested
    gradings = pd.read_parquet(out / "ingest" / "gradings.parquet")
    table = pd.read_csv(cohort[0]).iloc[:cohort[1]["good"]]
    discs = table[table.Anatomy == "IVD"]
    assert len(gradings) == len(discs)
    assert set(gradings.level) == set(levels.DISCS)
    assert gradings.pfirrmann.between(1, 5).all() and set(gradings.herniation) <= {0, 1}
    assert sorted(gradings.pfirrmann.astype(int)) == sorted(discs["Pfirrmann Grade"].astype(int))


def test_no_identity_leaves_ingest(cohort, ingested):
    out, _ = ingested
    table = pd.read_csv(cohort[0])
    secrets = set(table.Patient) | set(table.Kinship) | set(table.ScanDate) | {"Patient0"}
    for path in list((out / "ingest").glob("*.*")) + list((out / "extract").glob("*.*")):
        if path.suffix == ".npy":
            continue
        text = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).to_csv()
        assert not [s for s in secrets if s in text], path.name


def test_crops_are_brought_to_the_extraction_sizes(ingested):
    out, _ = ingested
    index = pd.read_parquet(out / "extract" / "index.parquet")
    vertebrae = np.load(out / "extract" / "vertebrae.npy")
    discs = np.load(out / "extract" / "discs.npy")
    assert vertebrae.shape == ((index.array == "vertebrae").sum(), 5, 48, 48)
    assert discs.shape == ((index.array == "discs").sum(), 5, 16, 32)
    assert list(index[index.array == "vertebrae"].row) == list(range(len(vertebrae)))
    assert (index.source == "crop_table").all()
    assert not np.load(out / "extract" / "axial.npy").any()  # crops are not resliced
    crops = pd.read_parquet(out / "ingest" / "crops.parquet").set_index(["scan_id", "level"])
    for row in index.itertuples():
        volume = (vertebrae if row.array == "vertebrae" else discs)[row.row].astype(np.float32)
        filled = np.flatnonzero(volume.reshape(len(volume), -1).max(axis=1) > 0)
        if crops.loc[(row.scan_id, row.level), "dimensions"] == 2:
            assert list(filled) == [2]  # a 2D crop sits on the middle slice, zeros elsewhere
        else:
            assert list(filled) == [0, 1, 2, 3, 4]


def test_intensity_normalisation_by_neighbours_or_per_image(ingested, tmp_path):
    out, _ = ingested
    index = pd.read_parquet(out / "extract" / "index.parquet")
    vertebrae = np.load(out / "extract" / "vertebrae.npy").astype(np.float32)
    medians = [core_median(v) for v in vertebrae]
    scan = index.scan_id.iloc[0]
    bodies = index[(index.scan_id == scan) & (index.kind == "vertebra")].set_index("level")
    # L3's neighbours L2 and L4 have their median at 0.5 after normalisation
    l2, l4 = medians[bodies.loc["L2", "row"]], medians[bodies.loc["L4", "row"]]
    assert np.median([l2 / bodies.loc["L2", "scale"] * bodies.loc["L3", "scale"],
                      l4 / bodies.loc["L4", "scale"] * bodies.loc["L3", "scale"]]) == pytest.approx(0.5, rel=0.02)
    # an acquisition with discs only: each disc normalised by its own core
    crops = pd.read_parquet(out / "ingest" / "crops.parquet")
    crops[(crops.scan_id == scan) & (crops.kind == "disc")].to_parquet(tmp_path / "discs.parquet")
    table = extract_crops(tmp_path / "discs.parquet", out / "ingest" / "crops",
                          ExtractOutputs.in_folder(tmp_path / "extract"), SIZES)
    discs = np.load(tmp_path / "extract" / "discs.npy").astype(np.float32)
    assert len(table) == 6 and all(core_median(d) == pytest.approx(0.5, rel=0.02) for d in discs)


def test_a_crop_without_intensity_to_normalise_by_is_flagged_not_nan(ingested, tmp_path):
    # an acquisition of discs only (each normalised by its own core), one of them blank: no reference at all
    out, _ = ingested
    crops = pd.read_parquet(out / "ingest" / "crops.parquet")
    discs = crops[(crops.scan_id == crops.scan_id.iloc[0]) & (crops.kind == "disc")].reset_index(drop=True)
    folder = tmp_path / "crops"
    folder.mkdir()
    for crop in discs.itertuples():
        image = np.load(out / "ingest" / "crops" / Path(crop.file).name)
        np.save(folder / Path(crop.file).name, np.zeros_like(image) if crop.level == "L4-L5" else image)
    discs.to_parquet(tmp_path / "discs.parquet")
    table = extract_crops(tmp_path / "discs.parquet", folder, ExtractOutputs.in_folder(tmp_path / "extract"), SIZES)
    flagged = table[table.flag != ""]
    assert flagged.level.tolist() == ["L4-L5"] and flagged.scale.isna().all()
    assert flagged.flag.iloc[0].startswith("no intensity to normalise by")
    array = np.load(tmp_path / "extract" / "discs.npy").astype(np.float32)
    assert np.isfinite(array).all() and not array[flagged.row.iloc[0]].any()
    assert np.isfinite(table.scale[table.flag == ""]).all() and len(table) == 6


def test_fit_keeps_the_aspect_ratio_and_pads():
    image = np.ones((1, 20, 40), np.float32)
    out = fit(image, (48, 48, 3))
    assert out.shape == (3, 48, 48)
    rows = np.flatnonzero(out[1].max(axis=1) > 0.5)
    assert len(rows) == 24 and rows[0] == 12  # 20 x 40 -> 24 x 48, centred
    assert not out[0].any() and not out[2].any()
    deep = np.ones((9, 30, 30), np.float32) * np.arange(9)[:, None, None]
    assert [v.max() for v in fit(deep, (30, 30, 5))] == [2, 3, 4, 5, 6]  # the central slices


def test_read_image_axes_and_colour(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((40, 5, 30), np.float32))
    assert read_image(tmp_path / "a.npy").shape == (5, 40, 30)  # the shortest axis runs across slices
    assert read_image(tmp_path / "a.npy", slice_axis=2).shape == (30, 40, 5)
    np.save(tmp_path / "blank.npy", np.zeros((5, 5)))
    with pytest.raises(ValueError, match="blank"):
        read_image(tmp_path / "blank.npy")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_image(tmp_path / "x.txt")


def test_cli_errors_are_clear(cohort, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stages.ingest_crops", *args], capture_output=True, text=True,
                              cwd=ROOT, env={"SPINE_SSL_PSEUDONYM_KEY": KEY.decode(), "PATH": ""})
    assert run("--help").returncode == 0
    outputs = out_args(CropOutputs.in_folder(tmp_path / "o"))
    bad = run("--table", str(cohort[0]), *outputs, "--column", "path")
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr
    bad = run("--table", str(cohort[0]), *outputs, "--column", "colour=File")
    assert bad.returncode == 2 and "unknown field" in bad.stderr
    bad = run("--table", str(cohort[0]), *outputs, "--label", "pfirrmann=5:1")
    assert bad.returncode == 2 and "MIN <= MAX" in bad.stderr
    bad = run("--table", str(tmp_path / "none.csv"), *outputs)
    assert bad.returncode == 2 and "none.csv" in bad.stderr
    bad = run("--table", str(cohort[0]), *outputs[:-2])
    assert bad.returncode == 2 and "--out-summary" in bad.stderr
    missing = run("--table", str(cohort[0]), *outputs)  # default column names: absent
    assert missing.returncode == 1 and "no column(s)" in missing.stderr and "cohort.crops.columns" in missing.stderr


def crop_config(tmp_path: Path, table: Path) -> Path:
    (tmp_path / "key").write_text(KEY.decode())
    config = {
        "results": str(tmp_path / "results"),
        "cohort": {"source": "crops", "crops_table": str(table), "key_file": str(tmp_path / "key"),
                   "crops": {"columns": COLUMNS}, "level_numbering": {"count_from": "sacrum"}},
        "extract": {"vertebra_size": [48, 48, 5], "disc_size": [44, 48, 5], "axial_size": [16, 16]},
        "splits": {"ssl_fractions": [0.6, 0.2, 0.2]},
        "pretrain": {"width": 0.125, "embedding_dim": 16, "batch_size": 8, "max_epochs": 2, "checkpoint_every": 2},
        "probes": {"tasks": ["grade", "level"], "baselines": ["random"], "label_fractions": [1.0], "seeds": 1,
                   "bootstrap": 20},
        "probe_training": {"heads": ["linear"], "linear_c": [0.1], "max_iter": 100, "epochs": 1, "batch_size": 8},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_crop_table_cohort_runs_through_pairs_pretraining_and_probes(cohort, tmp_path):
    config = crop_config(tmp_path, cohort[0])
    results = tmp_path / "results"
    targets = [str(results / p) for p in ("splits/summary.json", "pretrain/siamese/pretext/evaluation.json",
                                          "probes/runs/siamese/grade/f1/seed0/metrics.json",
                                          "probes/label_efficiency.csv", "extract/qc/gallery.png")]
    run = snakemake(tmp_path, *targets, "--configfile", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "localise" not in log.split("Job stats")[1].split("total")[0]  # no localiser for crops
    volumes = pd.read_parquet(results / "splits" / "volumes.parquet")
    pairs = pd.read_parquet(results / "splits" / "pairs.parquet")
    rows = volumes[volumes.kind == "vertebra"].set_index("row")
    positives = pairs[pairs.positive]
    assert len(positives) > 0
    a, b = rows.loc[positives.a], rows.loc[positives.b]
    assert (a.subject_id.to_numpy() == b.subject_id.to_numpy()).all()
    assert (a.scan_id.to_numpy() != b.scan_id.to_numpy()).all()  # two acquisitions: T1 and T2
    assert (a.level.to_numpy() == b.level.to_numpy()).all()
    subjects = pd.read_parquet(results / "splits" / "subjects.parquet")
    test = set(subjects.subject_id[subjects.downstream_part == "test"])
    assert test and not test & set(subjects.subject_id[subjects.ssl_part != "excluded"])
    metrics = pd.read_csv(results / "pretrain" / "siamese" / "metrics.csv")
    assert metrics.epoch.max() == 2 and np.isfinite(metrics.loss).all()
    run_metrics = json.loads((results / "probes/runs/siamese/grade/f1/seed0/metrics.json").read_text())
    assert run_metrics["n_test"] > 0 and run_metrics["samples"]["missing_body"] == 0
    assert not test & set(pd.read_parquet(results / "probes" / "subsets.parquet").subject_id)
    assert 0 <= run_metrics["heads"]["linear"]["average_class_accuracy"] <= 1


def test_a_parquet_crop_table_reads_like_its_csv(cohort, ingested, tmp_path):
    table = pd.read_csv(cohort[0], dtype=str, keep_default_na=False)
    table["File"] = [str(cohort[0].parent / f) for f in table.File]
    table.to_parquet(tmp_path / "crops.parquet", index=False)
    summary = ingest_crops(tmp_path / "crops.parquet", CropOutputs.in_folder(tmp_path / "ingest"), KEY, SPEC)
    assert summary == ingested[1]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ingest" / "gradings.parquet"),
                                  pd.read_parquet(ingested[0] / "ingest" / "gradings.parquet"))
