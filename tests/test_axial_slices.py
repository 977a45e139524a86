"""Axial slices of the study's own axial series (Hou et al. 2023): kept at ingest and accounted for, assigned to discs
against the demo's ground truth, the angle and distance limits, the three central slices, the fallback to the
resliced slices, marked as such, and the disc's label map cut on exactly the slices' pixels (native and resliced)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from stages.anatomy.axial import AxialConfig, SlicePlane, assign_slices, central_three, slice_planes
from stages.anatomy.crops import axial_stack
from stages.archive import pseudonym as pn
from stages.archive.dicom_index import ClassifyRules, read_header
from stages.archive.dicom_volume import orthonormal_axes
from stages.archive.manifest import IngestOutputs
from stages.axial_slices import axial_slices
from stages.core import levels
from stages.ingest import ingest_dicom

CFG = AxialConfig.from_config()
DOWN = np.array([0.0, 0.0, -1.0])  # the spine axis of a straight spine, head to feet (LPS)


def _discs(*zs: float, axis: np.ndarray = DOWN) -> pd.DataFrame:
    return pd.DataFrame([{"level": f"D{i}", "x": 0.0, "y": 0.0, "z": z, "axis_x": axis[0], "axis_y": axis[1],
                          "axis_z": axis[2]} for i, z in enumerate(zs)])


def _plane(z: float, tilt_deg: float = 0.0, x: float = 0.0) -> SlicePlane:
    """An axial plane through (x, 0, z), tilted about the left-right axis by ``tilt_deg``."""
    t = np.radians(tilt_deg)
    return SlicePlane(np.array([x, 0.0, z]), np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)]),
                      80.0, 80.0)


# --- assignment -----------------------------------------------------------------------------------------------------

def test_a_slice_through_a_disc_is_assigned_to_it_and_one_between_discs_to_none():
    discs = _discs(0.0, -40.0)
    table = assign_slices([_plane(2.0), _plane(-20.0), _plane(-43.0)], discs, CFG)
    assert list(table.level) == ["D0", "", "D1"]
    np.testing.assert_allclose(table.distance_mm, [2.0, 20.0, 3.0])
    np.testing.assert_allclose(table.angle_deg, 0.0, atol=1e-9)


def test_distance_limit_is_inclusive_and_configurable():
    discs = _discs(0.0)
    assert list(assign_slices([_plane(7.0), _plane(7.5)], discs, CFG).level) == ["D0", ""]
    wide = AxialConfig.from_config({"max_distance_mm": 8.0})
    assert list(assign_slices([_plane(7.5)], discs, wide).level) == ["D0"]


def test_a_slice_angled_past_the_limit_is_assigned_to_none():
    discs = _discs(0.0)
    planes = [_plane(0.0, 15.0), _plane(0.0, 25.0)]
    table = assign_slices(planes, discs, CFG)
    assert list(table.level) == ["D0", ""]
    np.testing.assert_allclose(table.angle_deg, [15.0, 25.0], atol=1e-9)
    assert list(assign_slices(planes, discs, AxialConfig.from_config({"max_angle_deg": 30.0})).level) == ["D0", "D0"]
    # the angle is to the disc plane: a tilted disc and a slice tilted alike are parallel
    tilted = _discs(0.0, axis=np.array([0.0, np.sin(np.radians(25.0)), -np.cos(np.radians(25.0))]))
    assert assign_slices([_plane(0.0, 25.0)], tilted, CFG).angle_deg.iloc[0] < 1e-6


def test_a_disc_outside_the_slice_field_of_view_is_not_assigned():
    assert list(assign_slices([_plane(0.0, x=100.0)], _discs(0.0), CFG).level) == [""]


def test_the_nearest_of_two_discs_wins():
    wide = AxialConfig.from_config({"max_distance_mm": 30.0})
    assert list(assign_slices([_plane(-15.0), _plane(-25.0)], _discs(0.0, -40.0), wide).level) == ["D0", "D1"]


def test_three_central_slices():
    assert central_three(3) == slice(0, 3)
    assert central_three(4) == slice(0, 3)  # slices 1-3
    assert central_three(5) == slice(1, 4)  # slices 2-4
    assert central_three(7) == slice(2, 5)
    with pytest.raises(ValueError, match="at least 3"):
        central_three(2)


def _planes_of_files(paths: list[Path]) -> tuple[list[SlicePlane], list[int]]:
    planes, numbers = [], []
    for path in paths:
        h = read_header(path)
        row, col, _ = orthonormal_axes(h["iop"])
        (dr, dc), n_rows, n_cols = h["pixel_spacing"], h["rows"], h["cols"]
        centre = np.array(h["ipp"]) + (n_cols - 1) / 2 * dc * row + (n_rows - 1) / 2 * dr * col
        planes.append(SlicePlane(centre, row, col, n_cols * dc / 2, n_rows * dr / 2))
        numbers.append(int(h["instance_number"]))
    return planes, numbers


def test_demo_axial_slices_are_assigned_to_the_disc_they_were_planned_through(tiny_cohort):
    """Against the demo's ground truth: disc centres and axes (landmarks.csv), and the disc each axial slice was
    planned through (studies.csv, axial_t2_levels by InstanceNumber)."""
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    marks = pd.read_csv(tiny_cohort / "truth" / "landmarks.csv")
    marks = marks[marks.structure == "disc"]
    planned, assigned = [], []
    for study in studies.itertuples():
        discs = marks[marks.series_uid == study.sag_t2_series_uid]
        assert len(discs) == 6
        planes, numbers = _planes_of_files(sorted((tiny_cohort / study.axial_t2_dir).iterdir()))
        planned_levels = study.axial_t2_levels.split(";")
        table = assign_slices(planes, discs, CFG)
        planned += [planned_levels[n - 1] for n in numbers]
        assigned += list(table.level)
    planned, assigned = np.array(planned), np.array(assigned)
    hit = assigned != ""
    assert (assigned[hit] == planned[hit]).all()
    assert hit.mean() > 0.95, f"{hit.mean():.3f} of the demo's axial slices assigned to a disc"
    assert set(planned) == {"T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"}  # every lumbar disc covered


# --- ingest: the second series and its accounting ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_ingest(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ingest_second")
    ingest_dicom(tiny_cohort / "dicom", IngestOutputs.in_folder(out), pn.load_key(tiny_cohort / "pseudonym.key"),
                 ClassifyRules.from_config(), workers=2)
    return out


def test_ingest_keeps_each_studys_axial_series_and_accounts_for_its_files(tiny_cohort, second_ingest):
    out = second_ingest
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    manifest = pd.read_parquet(out / "manifest.parquet")
    second = pd.read_parquet(out / "second_series.parquet")
    assert set(second.scan_id) == set(manifest.scan_id) and second.series.nunique() == len(studies)
    assert (second.groupby("scan_id").block.count() == 6).all()  # one block per lumbar disc
    assert set(second.plane) == {"axial"} and set(second.weighting) == {"T2"}
    assert sorted(p.name for p in (out / "second").iterdir()) == sorted(Path(v).name for v in second.volume)
    files = pd.read_parquet(out / "files.parquet").set_index("file")
    axial_files = [str(p.relative_to(tiny_cohort / "dicom")) for d in studies.axial_t2_dir
                   for p in (tiny_cohort / d).iterdir()]
    assert (files.loc[axial_files, "status"] == "used").all()
    assert files.loc[axial_files, "reason"].str.startswith("in second series").all()
    summary = pd.read_json(out / "summary.json", typ="series")
    assert summary["used"] == manifest.n_source_files.sum() + second.n_source_files.sum()
    assert summary["used"] + summary["skipped"] + summary["quarantined"] == summary["files"] == len(files)
    identity = set(pd.read_csv(tiny_cohort / "truth" / "subjects.csv", dtype=str).patient_id)
    text = (out / "second_series.csv").read_text() + " ".join(p.name for p in (out / "second").iterdir())
    assert not [i for i in identity if i in text]
    # every axial slice the demo wrote is in one block of its study's series, as many per block as it planned
    assert sorted(second.groupby("scan_id").size_z.sum()) == sorted(len(v.split(";")) for v in studies.axial_t2_levels)
    image = sitk.ReadImage(str(out / second.volume.iloc[0]))
    assert image.GetSize()[2] == second.size_z.iloc[0] and second.groupby("scan_id").size_z.nunique().eq(1).all()


def test_without_second_series_the_axial_files_are_skipped_with_the_reason(tiny_cohort, tmp_path):
    rules = ClassifyRules.from_config({"second_series": False})
    ingest_dicom(tiny_cohort / "dicom", IngestOutputs.in_folder(tmp_path), pn.load_key(tiny_cohort / "pseudonym.key"),
                 rules, workers=2)
    assert pd.read_parquet(tmp_path / "second_series.parquet").empty
    files = pd.read_parquet(tmp_path / "files.parquet").set_index("file")
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv")
    axial = [str(p.relative_to(tiny_cohort / "dicom")) for p in (tiny_cohort / studies.axial_t2_dir.iloc[0]).iterdir()]
    assert (files.loc[axial, "status"] == "skipped").all()
    assert files.loc[axial, "reason"].str.contains("plane axial not in").all()


# --- the stage: native slices, the fallback and its marking ----------------------------------------------------------

def _block(path: Path, zs: list[float], value: float) -> None:
    """An axial block of 32 x 32 pixels of 2 mm centred on x = y = 0 at heights ``zs`` (equally spaced), a bright
    square in the middle, and in it a brighter 8 mm marker at a place of each slice's own (slice k: columns
    10 + 2k to 13 + 2k), which tells the slices apart."""
    array = np.zeros((len(zs), 32, 32), np.float32)
    array[:, 8:24, 8:24] = value
    for k in range(len(zs)):
        array[k, 10:14, 10 + 2 * k:14 + 2 * k] = 2 * value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, abs(zs[1] - zs[0])))
    image.SetOrigin((-31.0, -31.0, zs[0]))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # rows along +x, columns along +y, normal +z (head)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


# A sagittal label map of scan A: 1 mm voxels in y (columns, posterior) and z (rows, down), 3 mm in x (slices, to the
# right); voxel centres at x = 29.5 - 3k, y = -40.5 + i, z = 20.5 - j.
LABEL_ORIGIN, LABEL_SPACING = (29.5, -40.5, 20.5), (1.0, 1.0, 3.0)
LABEL_DIRECTION = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # columns of the matrix: +y, -z, -x
# The disc L3-L4 as a box of voxels whose extent (voxel centres +- half a voxel) is x -8..16, y -12..4, z -3..3: its
# linearly interpolated indicator is >= 0.5 exactly inside (a cut's pixels lie >= 1.5 mm from its faces).
L34_BOX = ((-8.0, 16.0), (-12.0, 4.0), (-3.0, 3.0))


def _label_map(path: Path) -> None:
    label = np.zeros((20, 81, 81), np.uint8)  # (k: x, j: z, i: y)
    label[5:13, 18:24, 29:45] = levels.DISC_LABELS["L3-L4"]  # x -6.5..14.5, z 2.5..-2.5, y -11.5..3.5 (centres)
    label[5:13, 10:18, 29:45] = levels.VERTEBRA_LABELS["L4"]  # above it (another label, not cut)
    label[3:15, 58:64, 25:55] = levels.DISC_LABELS["L4-L5"]  # around z = -40, not covered by the axial series
    image = sitk.GetImageFromArray(label)
    image.SetOrigin(LABEL_ORIGIN)
    image.SetSpacing(LABEL_SPACING)
    image.SetDirection(LABEL_DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _stage(tmp_path: Path, label_maps: dict[str, str | None]) -> tuple[pd.DataFrame, np.ndarray]:
    """Scan A: discs at z 0 (covered by 4 axial slices), -40 (not covered) and -75 (flagged by extraction); scan B:
    no axial series. ``label_maps``: the manifest's label_map of each scan. The stage's index and the axial.npy it
    read."""
    index = pd.DataFrame([
        {"array": "vertebrae", "row": 0, "scan_id": "A", "level": "L1", "flag": ""},
        {"array": "discs", "row": 0, "scan_id": "A", "level": "L3-L4", "flag": ""},
        {"array": "discs", "row": 1, "scan_id": "A", "level": "L4-L5", "flag": ""},
        {"array": "discs", "row": 2, "scan_id": "A", "level": "L5-S1", "flag": "no reference"},
        {"array": "discs", "row": 3, "scan_id": "B", "level": "L3-L4", "flag": ""},
    ])
    index.to_parquet(tmp_path / "index.parquet")
    axial = np.full((4, 3, 16, 16), 0.25, np.float16)
    axial[2] = 0
    np.save(tmp_path / "axial.npy", axial)
    _structures().to_parquet(tmp_path / "structures.parquet")
    _block(tmp_path / "second" / "sA_0.nii.gz", [-4.5, -1.5, 1.5, 4.5], 1000.0)  # 4 slices through L3-L4
    _block(tmp_path / "second" / "sA_1.nii.gz", [-22.0, -19.0], 1000.0)  # between the discs
    pd.DataFrame([{"scan_id": "A", "study_id": "ses-A", "series": "sA", "block": b, "volume": f"second/sA_{b}.nii.gz"}
                  for b in (0, 1)]).to_parquet(tmp_path / "second_series.parquet")
    for name in {n for n in label_maps.values() if n}:
        _label_map(tmp_path / name)
    pd.DataFrame({"scan_id": list(label_maps), "label_map": list(label_maps.values())}).to_parquet(
        tmp_path / "manifest.parquet")
    out = {name: tmp_path / "out" / f"{name}.{'parquet' if name in ('index', 'assignment') else 'npy'}"
           for name in ("slices", "masks", "second_sample", "index", "assignment")}
    table = axial_slices(tmp_path / "index.parquet", tmp_path / "axial.npy", tmp_path / "structures.parquet",
                         tmp_path / "second_series.parquet", tmp_path / "second", tmp_path / "manifest.parquet", out,
                         CFG, 0.5, 2.0)
    return table, axial


def _structures() -> pd.DataFrame:
    return pd.DataFrame([{"scan_id": s, "kind": "disc", "level": level, "x": 0.0, "y": 0.0, "z": z,
                          "axis_x": 0.0, "axis_y": 0.0, "axis_z": -1.0, "ap_x": 0.0, "ap_y": -1.0, "ap_z": 0.0,
                          "depth_mm": 32.0}
                         for s, level, z in (("A", "L3-L4", 0.0), ("A", "L4-L5", -40.0), ("A", "L5-S1", -75.0),
                                             ("B", "L3-L4", 0.0))])


def test_native_slices_where_covered_resliced_elsewhere_and_none_for_flagged_discs(tmp_path):
    table, axial = _stage(tmp_path, {"A": None, "B": None})
    assert list(table.row) == [0, 1, 2, 3]
    assert list(table.source) == ["native", "resliced", "none", "resliced"]
    assert list(table.n_slices) == [4, 0, 0, 0]
    assert table.slices.iloc[0] == "0:3;0:2;0:1"  # of 4 slices ordered down the spine (z falling), slices 1-3
    # ... and its second sample, slices 2-4 (block slices 2, 1, 0): one slice further down, scaled alike
    assert list(table.second_sample) == [True, False, False, False]
    slices = np.load(tmp_path / "out" / "slices.npy")
    assert slices.shape == axial.shape and slices.dtype == np.float16
    np.testing.assert_array_equal(slices[[1, 3]], axial[[1, 3]])
    assert not slices[2].any()
    # native: the bright square cut at the resliced pixel size (32 mm / (0.5 x 16) = 4 mm), matched in intensity
    native = slices[0].astype(np.float32)
    assert not np.array_equal(native, axial[0])
    np.testing.assert_allclose(np.median(native[native > 0]), 0.25, rtol=1e-2)
    assert (native[:, 8, 8] > 0).all() and native[:, 0, 0].max() == 0  # 32 mm square inside a 64 mm field
    second = np.load(tmp_path / "out" / "second_sample.npy")
    assert second.shape == axial.shape and second.dtype == np.float16 and not second[1:].any()
    np.testing.assert_array_equal(second[0, :2], slices[0, 1:])
    assert second[0, 2].any() and not any(np.array_equal(second[0, 2], s) for s in slices[0])
    assignment = pd.read_parquet(tmp_path / "out" / "assignment.parquet")
    assert len(assignment) == 6
    assert list(assignment.level) == ["L3-L4"] * 4 + ["", ""]
    assert list(assignment.disc_row) == [0] * 4 + [-1, -1]
    assert assignment.central.sum() == 3
    assert (assignment.loc[assignment.level == "", "distance_mm"] >= 18.0).all()
    # no label map: no masks
    masks = np.load(tmp_path / "out" / "masks.npy")
    assert masks.shape == axial.shape and masks.dtype == np.uint8 and not masks.any()
    assert not table.has_mask.any()


def test_the_disc_mask_of_a_native_slice_lies_where_the_disc_crosses_it(tmp_path):
    """The slices used are z = 4.5, 1.5, -1.5 (down the spine); their pixels lie, by the resliced stack's axes, at
    y = 4 (r - 7.5) (rows anterior to posterior, +y) and x = -4 (c - 7.5) (columns right to left, -x). The mask must
    be the pixels inside the disc's box: none at z = 4.5, rows 5-8 and columns 4-9 at z = +-1.5."""
    table, _ = _stage(tmp_path, {"A": "labels/A.nii.gz", "B": None})
    masks = np.load(tmp_path / "out" / "masks.npy")
    assert table.source.iloc[0] == "native" and table.has_mask.iloc[0]
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    x, y = -4.0 * (c - 7.5), 4.0 * (r - 7.5)
    (x0, x1), (y0, y1), (z0, z1) = L34_BOX
    for s, z in enumerate((4.5, 1.5, -1.5)):
        inside = (x0 < x) & (x < x1) & (y0 < y) & (y < y1) & (z0 < z < z1)
        np.testing.assert_array_equal(masks[0, s], inside.astype(np.uint8), err_msg=f"slice {s} (z = {z})")
    expected = np.zeros((3, 16, 16), np.uint8)
    expected[1:, 5:9, 4:10] = 1
    np.testing.assert_array_equal(masks[0], expected)


def test_the_resliced_fallbacks_mask_is_the_indicator_resliced_as_the_image(tmp_path):
    table, _ = _stage(tmp_path, {"A": "labels/A.nii.gz", "B": None})
    masks = np.load(tmp_path / "out" / "masks.npy")
    image = sitk.ReadImage(str(tmp_path / "labels" / "A.nii.gz"))
    indicator = (sitk.GetArrayFromImage(image) == levels.DISC_LABELS["L4-L5"]).astype(np.float32)
    disc = next(_structures().iloc[[1]].itertuples())
    expected = axial_stack(indicator, image, disc, (16, 16), 2.0, 0.5) >= 0.5
    assert table.source.iloc[1] == "resliced" and table.has_mask.iloc[1] and expected.any()
    np.testing.assert_array_equal(masks[1], expected.astype(np.uint8))
    # flagged (no slices) and without a label map: no mask, zeros
    assert list(table.has_mask) == [True, True, False, False]
    assert not masks[2:].any()
    index = pd.read_csv(tmp_path / "out" / "index.csv")
    assert list(index.has_mask) == [True, True, False, False]


def test_the_stage_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "stages.axial_slices", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "--max-angle-deg" in result.stdout and "--second-series" in result.stdout
    assert "--manifest" in result.stdout and "--out-masks" in result.stdout and "--axial-spacing-mm" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "stages.axial_slices", "--index", str(ROOT / "README.md"),
                          "--axial", str(ROOT / "README.md"), "--structures", str(ROOT / "README.md"),
                          "--second-series", str(ROOT / "README.md"), "--manifest", str(ROOT / "README.md"),
                          "--out-slices", "a", "--out-masks", "m", "--out-second-sample", "s", "--out-index", "b",
                          "--out-assignment", "c"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "go together" in bad.stderr


def test_slice_planes_of_a_block(tmp_path):
    _block(tmp_path / "b.nii.gz", [0.0, 3.0, 6.0], 1.0)
    planes = slice_planes(sitk.ReadImage(str(tmp_path / "b.nii.gz")))
    np.testing.assert_allclose([p.centre for p in planes], [[0, 0, 0], [0, 0, 3], [0, 0, 6]], atol=1e-6)
    assert planes[0].half_row_mm == 32.0
