"""Localisation (label maps and the learned localiser) and extraction of the vertebral-body and disc volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import extract_folder, localise_folder
from scipy.ndimage import binary_dilation, binary_erosion

from stages.anatomy.crops import (
    NO_REFERENCE,
    ExtractConfig,
    ExtractOutputs,
    crop,
    normalise,
)
from stages.anatomy.localiser import LocaliseConfig
from stages.anatomy.spine_structures import check_structures, structures_from_label_map
from stages.archive import pseudonym as pn
from stages.archive.dicom_index import ClassifyRules
from stages.archive.manifest import IngestOutputs
from stages.core import levels
from stages.demo_cohort import DemoConfig, DemoOutputs, generate
from stages.ingest import ingest_dicom
from stages.localiser_train import run as train_localiser

EXTRACT = ExtractConfig.from_config({"vertebra_size": [32, 32, 5], "disc_size": [16, 32, 5], "axial_size": [16, 16]})


def _ingest(cohort: Path, out: Path) -> Path:
    truth = cohort / "truth"
    ingest_dicom(cohort / "dicom", IngestOutputs.in_folder(out), pn.load_key(cohort / "pseudonym.key"),
                 ClassifyRules.from_config(), workers=2, label_dir=truth / "labels", gradings=truth / "gradings.csv",
                 subjects=truth / "subjects.csv")
    return out


@pytest.fixture(scope="module")
def pipeline(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    ingest = _ingest(tiny_cohort, root / "ingest")
    localise_folder(ingest, root / "localise", LocaliseConfig.from_config(), None, workers=2)
    extract_folder(ingest, root / "localise", root / "extract", EXTRACT, workers=2)
    return {"ingest": ingest, "localise": root / "localise", "extract": root / "extract"}


def test_label_map_centres_are_the_generators_truth(tiny_cohort):
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    marks = pd.read_csv(tiny_cohort / "truth" / "landmarks.csv")
    for study in studies.itertuples():
        label = sitk.ReadImage(str(tiny_cohort / study.label_map))
        table = structures_from_label_map(label).set_index("level")
        truth = marks[marks.series_uid == study.sag_t2_series_uid].set_index("level")
        assert sorted(table.index) == sorted(truth.index) == sorted(levels.VERTEBRAE + levels.DISCS)
        error = (table[["i", "j", "k"]] - truth[["i", "j", "k"]]).abs()
        assert (error[["i", "j"]] < 1.0).all().all()
        inside = table.width_mm < label.GetSize()[2] * label.GetSpacing()[2] - 2 * label.GetSpacing()[2]
        assert (error.k[inside] < 1.0).all()
        assert (table.label == truth.label).all()
        # The spine axis points down (-z) and the AP direction anterior (-y).
        assert (table.axis_z < -0.3).all() and (table.ap_y < -0.5).all()
        np.testing.assert_allclose(table.loc[list(levels.VERTEBRAE), "height_mm"], truth.loc[list(levels.VERTEBRAE), "height_mm"],
                                   atol=2 * label.GetSpacing()[1])


def test_checks_flag_missing_levels_transitional_and_disorder(tiny_cohort):
    study = pd.read_csv(tiny_cohort / "truth" / "studies.csv").iloc[0]
    label = sitk.ReadImage(str(tiny_cohort / study.label_map))
    table = structures_from_label_map(label)
    assert check_structures(table, {19, 20}) == []
    assert check_structures(table[table.level != "L3"]) == ["missing vertebra level(s): L3"]
    assert any("transitional" in p for p in check_structures(table, {25}))
    swapped = table.copy()
    l1, l4 = swapped.index[swapped.level == "L1"][0], swapped.index[swapped.level == "L4"][0]
    swapped.loc[[l1, l4], ["x", "y", "z"]] = swapped.loc[[l4, l1], ["x", "y", "z"]].to_numpy()
    assert "levels out of order along the spine" in check_structures(swapped)


def test_extracted_volumes_have_the_configured_shapes_and_index(pipeline):
    index = pd.read_parquet(pipeline["extract"] / "index.parquet")
    vertebrae = np.load(pipeline["extract"] / "vertebrae.npy", mmap_mode="r")
    discs = np.load(pipeline["extract"] / "discs.npy", mmap_mode="r")
    axial = np.load(pipeline["extract"] / "axial.npy", mmap_mode="r")
    n = index.scan_id.nunique()
    assert vertebrae.shape == (7 * n, 5, 32, 32) and discs.shape == (6 * n, 5, 16, 32) and axial.shape == (6 * n, 3, 16, 16)
    assert vertebrae.dtype == np.float16
    assert set(index.level[index.kind == "vertebra"]) == set(levels.VERTEBRAE)
    assert {"scan_id", "subject_id", "study_id", "days_since_first_study", "kind", "level", "array", "row",
            "source"} <= set(index.columns)
    assert index.groupby("array").row.apply(lambda r: sorted(r) == list(range(len(r)))).all()
    assert np.isfinite(np.asarray(vertebrae, dtype=np.float32)).all()


def test_neighbouring_bodies_have_median_one_half(pipeline):
    """Independent of the crop code: medians of the raw voxels inside the neighbours' label maps (their core: the
    mask eroded in-plane, without the dark cortical rim and partial-volume edge, on the 3 middle slices), times the
    scale."""
    index = pd.read_parquet(pipeline["extract"] / "index.parquet")
    manifest = pd.read_parquet(pipeline["ingest"] / "manifest.parquet").set_index("scan_id")
    checked = 0
    for scan, rows in index.groupby("scan_id"):
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(pipeline["ingest"] / manifest.loc[scan, "volume"])))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(pipeline["ingest"] / manifest.loc[scan, "label_map"])))
        medians = {}
        for name, value in levels.VERTEBRA_LABELS.items():
            mask = binary_erosion(label == value, np.ones((1, 3, 3), bool))
            mid = int(np.rint(np.nonzero(label == value)[0].mean()))
            mask[: max(mid - 1, 0)] = False  # the 3 slices through the body's middle
            mask[mid + 2:] = False
            medians[name] = np.median(volume[mask])
        for row in rows[rows.kind == "disc"].itertuples():
            upper, lower = row.level.split("-")
            reference = np.median([medians[upper], medians[lower]])
            assert reference * row.scale == pytest.approx(0.5, rel=0.15), (row.level, reference * row.scale)
            checked += 1
    assert checked >= 6


def test_normalisation_is_exact_on_piecewise_constant_bodies(pipeline, tmp_path):
    """Each body of constant intensity 100 + 20 * (level number): every volume's scale is exactly 0.5 over the median
    of the bodies above and below it (a body at either end of the column: its one neighbour)."""
    ingest = tmp_path / "ingest"
    shutil.copytree(pipeline["ingest"], ingest)
    manifest = pd.read_parquet(ingest / "manifest.parquet").iloc[:1]
    manifest.to_parquet(ingest / "manifest.parquet")
    scan = manifest.iloc[0]
    label = sitk.ReadImage(str(ingest / scan.label_map))
    array = sitk.GetArrayFromImage(label)
    value = {name: 100.0 + 20 * n for n, name in enumerate(levels.VERTEBRAE)}
    flat = np.zeros(array.shape, np.float32)
    for name, v in value.items():
        flat[array == levels.VERTEBRA_LABELS[name]] = v
    image = sitk.GetImageFromArray(flat)
    image.CopyInformation(label)
    sitk.WriteImage(image, str(ingest / scan.volume))
    localise_folder(ingest, tmp_path / "localise", LocaliseConfig.from_config(), None, workers=1)
    index = extract_folder(ingest, tmp_path / "localise", tmp_path / "extract", EXTRACT)
    for row in index.itertuples():
        if row.kind == "disc":
            around = row.level.split("-")
        else:
            i = levels.VERTEBRAE.index(row.level)
            around = [levels.VERTEBRAE[j] for j in (i - 1, i + 1) if 0 <= j < len(levels.VERTEBRAE)]
        assert row.scale == pytest.approx(0.5 / np.median([value[n] for n in around]), rel=1e-6), row.level


def test_a_crop_without_bodies_to_normalise_by_is_flagged_not_nan(pipeline, tmp_path):
    """The bodies L4, L5 and S1 blacked out (and a margin around them): L5 and S1 (no body median of their own or
    of a neighbour) and the discs L4-L5 and L5-S1 (none above or below) have no reference intensity. They are
    flagged in the index with the reason, their scale NaN and their slots zeros; every other volume is normalised."""
    ingest = tmp_path / "ingest"
    shutil.copytree(pipeline["ingest"], ingest)
    manifest = pd.read_parquet(ingest / "manifest.parquet").iloc[:1]
    manifest.to_parquet(ingest / "manifest.parquet")
    scan = manifest.iloc[0]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(ingest / scan.label_map)))
    image = sitk.ReadImage(str(ingest / scan.volume))
    volume = sitk.GetArrayFromImage(image)
    dark = np.isin(label, [levels.VERTEBRA_LABELS[n] for n in ("L4", "L5", "S1")])
    volume[binary_dilation(dark, np.ones((3, 5, 5), bool))] = 0
    blacked = sitk.GetImageFromArray(volume)
    blacked.CopyInformation(image)
    sitk.WriteImage(blacked, str(ingest / scan.volume))
    localise_folder(ingest, tmp_path / "localise", LocaliseConfig.from_config(), None, workers=1)
    index = extract_folder(ingest, tmp_path / "localise", tmp_path / "extract", EXTRACT)
    flagged = index[index.flag != ""]
    assert set(flagged.level) == {"L5", "S1", "L4-L5", "L5-S1"}
    assert (flagged.flag == NO_REFERENCE).all() and flagged.scale.isna().all()
    assert np.isfinite(index.scale[index.flag == ""]).all()
    for name in ("vertebrae", "discs", "axial"):
        array = np.load(tmp_path / "extract" / f"{name}.npy").astype(np.float32)
        assert np.isfinite(array).all(), name
        rows = flagged.row[flagged.array == ("discs" if name == "axial" else name)]
        assert not array[rows.to_numpy()].any(), name
    assert pd.read_csv(tmp_path / "extract" / "index.csv").flag.notna().sum() == len(flagged)


def test_normalisation_that_overflows_float16_is_flagged():
    volumes, scale, flag = normalise([np.full((2, 3, 3), 100.0, np.float32)], 1e-4)
    assert flag.startswith("intensities not finite") and np.isnan(scale) and not volumes[0].any()
    volumes, scale, flag = normalise([np.full((2, 3, 3), 100.0, np.float32)], np.nan)
    assert flag == NO_REFERENCE and np.isnan(scale) and volumes[0].dtype == np.float16 and not volumes[0].any()
    volumes, scale, flag = normalise([np.full((2, 3, 3), 100.0, np.float32)], 200.0)
    assert flag == "" and scale == 0.0025 and np.all(volumes[0] == np.float16(0.25))


def test_crop_pads_missing_slices_with_zeros_and_is_deterministic(pipeline):
    structures = pd.read_parquet(pipeline["localise"] / "structures.parquet")
    manifest = pd.read_parquet(pipeline["ingest"] / "manifest.parquet").set_index("scan_id")
    row = next(structures[structures.kind == "vertebra"].itertuples())
    image = sitk.ReadImage(str(pipeline["ingest"] / manifest.loc[row.scan_id, "volume"]), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(image)
    edge = row._replace(k=1.0)  # the middle slice is the scan's second: two slices of a 5-slice crop fall outside
    array, step = crop(volume, image, edge, (32, 32, 5), 0.5)
    assert np.all(array[0] == 0) and np.any(array[1] != 0) and np.any(array[2] != 0)
    again, _ = crop(volume, image, edge, (32, 32, 5), 0.5)
    assert np.array_equal(array, again)
    assert step == pytest.approx(row.depth_mm / 16)


def test_extraction_is_reproducible(pipeline, tmp_path):
    extract_folder(pipeline["ingest"], pipeline["localise"], tmp_path / "again", EXTRACT, workers=1)
    for name in ("vertebrae", "discs", "axial"):
        assert np.array_equal(np.load(tmp_path / "again" / f"{name}.npy"), np.load(pipeline["extract"] / f"{name}.npy"))


def test_a_damaged_label_map_is_flagged_and_skipped_not_fatal(pipeline, tmp_path):
    ingest = tmp_path / "ingest"
    shutil.copytree(pipeline["ingest"], ingest)
    manifest = pd.read_parquet(ingest / "manifest.parquet")
    victim = manifest.iloc[0]
    label = sitk.ReadImage(str(ingest / victim.label_map))
    array = sitk.GetArrayFromImage(label)
    array[array == levels.VERTEBRA_LABELS["L3"]] = 0
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(label)
    sitk.WriteImage(damaged, str(ingest / victim.label_map))
    summary = localise_folder(ingest, tmp_path / "localise", LocaliseConfig.from_config(), None, workers=1)
    flags = pd.read_csv(tmp_path / "localise" / "flags.csv")
    assert summary["flagged"] == 1 and list(flags.scan_id) == [victim.scan_id]
    assert flags.reason.iloc[0] == "missing vertebra level(s): L3"
    index = extract_folder(ingest, tmp_path / "localise", tmp_path / "extract", EXTRACT)
    assert victim.scan_id not in set(index.scan_id) and index.scan_id.nunique() == len(manifest) - 1


def test_scan_without_label_map_and_without_localiser_is_flagged(pipeline, tmp_path):
    ingest = tmp_path / "ingest"
    shutil.copytree(pipeline["ingest"], ingest)
    manifest = pd.read_parquet(ingest / "manifest.parquet")
    manifest.loc[0, "label_map"] = ""
    manifest.to_parquet(ingest / "manifest.parquet")
    localise_folder(ingest, tmp_path / "localise", LocaliseConfig.from_config(), None, workers=1)
    flags = pd.read_csv(tmp_path / "localise" / "flags.csv")
    assert flags.reason.tolist() == ["no label map and no learned localiser"]


@pytest.mark.slow
def test_learned_localiser_on_held_out_scans(tmp_path_factory):
    """Trained on half the subjects' label maps, measured against the other half's. Generous bounds: the figures
    of the default demo run are in the README."""
    root = tmp_path_factory.mktemp("learned")
    cohort = root / "cohort"
    generate(DemoConfig.from_config({"seed": 5, "n_subjects": 16, "matrix": 96, "slices": 9, "bad_files": False}),
             DemoOutputs.in_folder(cohort), workers=2)
    ingest = _ingest(cohort, root / "ingest")
    cfg = LocaliseConfig.from_config({"withhold_label_fraction": 0.5, "epochs": 100, "image_size": 64, "width": 8,
                                      "batch_size": 8})
    model = train_localiser(ingest / "manifest.parquet", ingest / "volumes", ingest / "labels",
                            {"model": root / "model" / "localiser.pt", "history": root / "model" / "training.csv",
                             "scans": root / "model" / "training_scans.csv"}, cfg)
    summary = localise_folder(ingest, root / "localise", cfg, model, workers=2)["learned_vs_withheld_labels"]
    assert summary["scans"] >= 6
    assert summary["detected_fraction"] > 0.8
    assert summary["level_accuracy"] > 0.6
    assert summary["mean_in_plane_error_mm"] < 20
    evaluation = pd.read_csv(root / "localise" / "evaluation.csv")
    right = evaluation[evaluation.level_correct]
    assert right.in_plane_error_mm.median() < 6


def test_sharded_localisation_and_extraction_equal_one_job(pipeline, tmp_path):
    """Three shard jobs and a merge write exactly what one job over the cohort writes (issue 9: per-shard jobs)."""
    from stages.extract import merge as merge_extract
    from stages.localise import LocaliseOutputs
    from stages.localise import merge as merge_localise

    n = 3
    for i in range(n):
        localise_folder(pipeline["ingest"], tmp_path / "loc" / str(i), LocaliseConfig.from_config(), None, 1, (i, n))
    merge_localise([tmp_path / "loc" / str(i) for i in range(n)], LocaliseOutputs.in_folder(tmp_path / "localise"))
    whole = pipeline["localise"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "localise" / "structures.parquet"),
                                  pd.read_parquet(whole / "structures.parquet"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "localise" / "flags.csv"), pd.read_csv(whole / "flags.csv"))
    ours = json.loads((tmp_path / "localise" / "evaluation.json").read_text())
    assert ours == json.loads((whole / "evaluation.json").read_text())
    sizes = [json.loads((tmp_path / "loc" / str(i) / "evaluation.json").read_text())["scans"] for i in range(n)]
    assert sum(sizes) == ours["scans"] and max(sizes) - min(sizes) <= 1

    for i in range(n):
        extract_folder(pipeline["ingest"], whole, tmp_path / "ext" / str(i), EXTRACT, 1, (i, n))
    merge_extract([tmp_path / "ext" / str(i) for i in range(n)], ExtractOutputs.in_folder(tmp_path / "extract"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "extract" / "index.parquet"),
                                  pd.read_parquet(pipeline["extract"] / "index.parquet"))
    for name in ("vertebrae", "discs", "axial"):
        assert np.array_equal(np.load(tmp_path / "extract" / f"{name}.npy"),
                              np.load(pipeline["extract"] / f"{name}.npy")), name


def test_shard_blocks_cover_every_scan_once():
    from stages.core.shards import parse_shard, shard_block, shard_count

    for n_items in (0, 1, 7, 100):
        for n in (1, 3, 8):
            blocks = [range(n_items)[shard_block(n_items, i, n)] for i in range(n)]
            assert [x for b in blocks for x in b] == list(range(n_items))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert shard_count(0, 500) == 1 and shard_count(500, 500) == 1 and shard_count(501, 500) == 2
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "2", "a/b", "-1/3"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    with pytest.raises(ValueError):
        shard_count(10, 0)


def test_arrays_merge_a_chunk_at_a_time(tmp_path):
    from stages.core.shards import concat_arrays

    parts = [np.random.default_rng(i).random((n, 2, 3)).astype(np.float16) for i, n in enumerate((5, 0, 7))]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    offsets = concat_arrays([tmp_path / f"{i}.npy" for i in range(3)], tmp_path / "all.npy", chunk_rows=2)
    assert offsets == [0, 5, 5]
    assert np.array_equal(np.load(tmp_path / "all.npy"), np.concatenate(parts))
    np.save(tmp_path / "odd.npy", np.zeros((2, 3, 3), np.float16))
    with pytest.raises(ValueError, match="disagree"):
        concat_arrays([tmp_path / "0.npy", tmp_path / "odd.npy"], tmp_path / "bad.npy")


def test_a_shard_job_counts_the_shards_from_the_manifest(pipeline, tmp_path):
    """The workflow passes --shard I --scans-per-shard P (a cluster job cannot ask a checkpoint for N)."""
    import subprocess
    import sys

    from conftest import ROOT

    from stages.core.shards import count_from_manifest, resolve_shard

    manifest = pipeline["ingest"] / "manifest.parquet"
    n_scans = len(pd.read_parquet(manifest))
    assert resolve_shard("1", count_from_manifest(manifest, 6)) == (1, -(-n_scans // 6))
    assert resolve_shard("1/4", count_from_manifest(manifest, None)) == (1, 4)
    with pytest.raises(ValueError, match="--scans-per-shard"):
        resolve_shard("1", count_from_manifest(manifest, None))

    def run(*args: str) -> subprocess.CompletedProcess:
        ingest, localised = pipeline["ingest"], pipeline["localise"]
        return subprocess.run([sys.executable, "-m", "stages.extract", "--manifest", str(manifest), "--volumes",
                               str(ingest / "volumes"), "--structures", str(localised / "structures.parquet"),
                               "--flags", str(localised / "flags.csv"), *args], capture_output=True, text=True,
                              cwd=ROOT)

    bad = run("--shard", "9", "--scans-per-shard", str(n_scans), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "0 <= I < N" in bad.stderr
    bad = run("--shard", "0", "--scans-per-shard", str(n_scans))
    assert bad.returncode == 2 and "--shard and --out SHARD_DIR go together" in bad.stderr
    bad = run("--out-vertebrae", str(tmp_path / "v.npy"))
    assert bad.returncode == 2 and "--out-discs is required" in bad.stderr
    sizes = ("--vertebra-size", "32", "32", "5", "--disc-size", "16", "32", "5", "--axial-size", "16", "16")  # EXTRACT
    shard = run("--shard", "0/1", "--out", str(tmp_path / "one"), *sizes)
    assert shard.returncode == 0, shard.stderr
    assert pd.read_parquet(tmp_path / "one" / "index.parquet").equals(
        pd.read_parquet(pipeline["extract"] / "index.parquet"))
