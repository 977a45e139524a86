"""Label maps numbered otherwise (cohort.label_scheme): SPIDER's masks and a user's mapping are read into the
workflow's VerSe numbering at ingest, values a scheme does not know are reported, and a scheme that finds no level is
said to, against tables written here by hand from SPIDER's stated convention (L5 = 1, L5-S1 = 201, canal 100). A level
a scheme cannot name (SPIDER's S1) is not missing in localise, and such a cohort is extracted without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import extract_folder, localise_folder, out_args

from stages import ingest, ingest_volumes, localise
from stages.anatomy.crops import ExtractConfig
from stages.anatomy.localiser import LocaliseConfig
from stages.anatomy.spine_structures import check_structures, structures_from_label_map
from stages.archive import label_scheme as ls
from stages.archive.manifest import IngestOutputs
from stages.core import levels
from stages.core.config import ConfigError, load_schema, validate_config

KEY = b"a label scheme key of sixteen bytes"

# SPIDER value -> VerSe label, written out from the convention (vertebrae from the bottom, L5 = 1; discs 200 + the
# vertebra above, L5-S1 = 201; canal 100; cut vertebrae 100 + n), not computed.
SPIDER_TO_VERSE = {
    0: 0,
    1: 24, 2: 23, 3: 22, 4: 21, 5: 20, 6: 19,            # L5, L4, L3, L2, L1, T12
    7: 0, 8: 0, 25: 0,                                   # T11, T10, ...: not levels of the workflow
    201: 124, 202: 123, 203: 122, 204: 121, 205: 120, 206: 119,   # L5-S1 ... T12-L1
    207: 0, 225: 0,                                      # T11-T12 and above
    100: 0,                                              # spinal canal
    101: 0, 106: 0, 107: 0,                              # vertebrae cut by the field of view
}


def test_spider_values_become_the_verse_labels_of_their_levels():
    values = np.array(list(SPIDER_TO_VERSE), dtype=np.uint16).reshape(1, 1, -1)
    out, check = ls.remap(values, ls.SPIDER)
    assert out.dtype == np.uint8
    assert dict(zip(values.ravel().tolist(), out.ravel().tolist())) == SPIDER_TO_VERSE
    assert check.unknown == () and check.problem == ""
    assert check.levels == ("T12", "L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


def test_every_value_spider_defines_is_known_and_nothing_else():
    defined = {0, 100} | set(range(1, 26)) | set(range(101, 126)) | set(range(201, 226))
    assert set(ls.SPIDER.table) | {0} == defined
    _, check = ls.remap(np.array([26, 126, 200, 226, 99, 1]), ls.SPIDER)
    assert check.unknown == (26.0, 99.0, 126.0, 200.0, 226.0)


def test_a_mapping_reads_its_values_sets_other_to_background_and_reports_the_rest():
    scheme = ls.scheme_from_config({"vertebra": {7: "L4", "8": "S1"}, "disc": {12: "L4-L5"}, "other": [3]})
    array = np.array([[[0, 7, 8, 12, 3, 5, 5, 2.5]]])
    out, check = ls.remap(array, scheme)
    assert out.ravel().tolist() == [0, 23, 26, 123, 0, 0, 0, 0]
    assert check.unknown == (2.5, 5.0) and check.levels == ("L4", "S1", "L4-L5")
    assert check.problem == "label values unknown to label scheme 'mapping', set to background: 5, 2.5"


def test_a_verse_reading_of_a_spider_mask_finds_no_level_and_says_so():
    spider_mask = np.array([[[0, 1, 2, 3, 4, 5, 6, 7, 100, 107, 201, 202, 203, 204, 205, 206]]], dtype=np.uint8)
    _, check = ls.remap(spider_mask, ls.VERSE)
    assert not check.usable and check.levels == ()
    assert check.problem.startswith("no level of the workflow")
    assert "'verse'" in check.problem and "values 1-7, 100, 107, 201-206" in check.problem
    assert ls.remap(spider_mask, ls.SPIDER)[1].usable


def test_verse_keeps_its_values_including_a_sixth_lumbar_vertebra():
    verse = np.array([[[0, 18, 19, 24, 25, 26, 119, 124]]], dtype=np.int16)
    out, check = ls.remap(verse, ls.VERSE)
    assert out.ravel().tolist() == verse.ravel().tolist() and check.problem == ""


@pytest.mark.parametrize(("value", "words"), [
    ("spidr", "cohort.label_scheme: unknown label scheme 'spidr'"),
    ({"vertebra": {1: "L6"}}, "value 1 names vertebra 'L6'"),
    ({"disc": {201: "L5"}}, "value 201 names disc 'L5'"),
    ({"disk": {201: "L5-S1"}}, "cohort.label_scheme.disk: not a kind"),
    ({"vertebra": {0: "L5"}}, "cohort.label_scheme.vertebra: 0 is not a label value"),
    ({"vertebra": {1: "L5"}, "other": [1]}, "cohort.label_scheme.other: value 1 is also under vertebra"),
    ({}, "an empty mapping"),
])
def test_a_bad_scheme_is_refused_naming_the_key(value, words):
    with pytest.raises(ls.LabelSchemeError) as err:
        ls.scheme_from_config(value)
    assert words in str(err.value)


@pytest.mark.parametrize("value", ["spidr", {"vertebra": {1: "L6"}}, {"disk": {}}, {"other": [0]}, 3])
def test_the_config_schema_refuses_a_bad_scheme_at_start_up(value):
    with pytest.raises(ConfigError, match=r"  cohort\.label_scheme"):
        validate_config({"cohort": {"label_scheme": value}})


def test_the_schema_accepts_the_three_forms_and_knows_the_workflows_level_names():
    for value in ("verse", "spider", {"vertebra": {1: "L5"}, "disc": {201: "L5-S1"}, "other": [100]}):
        assert validate_config({"cohort": {"label_scheme": value}})["cohort"]["label_scheme"] == value
    mapping = load_schema()["properties"]["cohort"]["properties"]["label_scheme"]["oneOf"][1]["properties"]
    assert tuple(mapping["vertebra"]["additionalProperties"]["enum"]) == levels.VERTEBRAE
    assert tuple(mapping["disc"]["additionalProperties"]["enum"]) == levels.DISCS


# The arguments each ingest stage needs besides --label-scheme (the stage's own parser reads the options).
STAGE_ARGS = {ingest: ["--key-file", "k"],
              ingest_volumes: ["--table", "t.csv", *out_args(IngestOutputs.in_folder(Path("x")))]}


@pytest.mark.parametrize("module", [ingest, ingest_volumes])
@pytest.mark.parametrize("value", ["verse", "spider", {"vertebra": {2: "L4", 1: "L5"}, "disc": {201: "L5-S1"},
                                                       "other": [100, 7]}])
def test_the_workflows_options_give_each_ingest_stage_the_configured_scheme(module, value):
    parser = module.build_parser()
    args = parser.parse_args([*STAGE_ARGS[module], *ls.scheme_options(value)])
    assert ls.scheme_from_args(args, parser) == ls.scheme_from_config(value)
    assert ls.scheme_from_args(parser.parse_args(STAGE_ARGS[module]), parser) == ls.VERSE


def test_a_bad_scheme_option_stops_the_stage_naming_it(capsys):
    parser = ingest_volumes.build_parser()
    args = parser.parse_args([*STAGE_ARGS[ingest_volumes], "--label-scheme", "1=vertebra:L6"])
    with pytest.raises(SystemExit):
        ls.scheme_from_args(args, parser)
    assert "--label-scheme: value 1 names vertebra 'L6'" in capsys.readouterr().err


# A sagittal stack of boxes, numbered as SPIDER numbers them: bodies 6 (T12) at the top down to 1 (L5), each disc
# 200 + the body above it below that body, a vertebra cut by the top of the field of view (107), the canal (100)
# behind them; no sacrum. Rows run down the spine.
BODY_ROWS, DISC_ROWS, TOP = 8, 3, 10


def _spider_mask(extra: int | None = None) -> np.ndarray:
    mask = np.zeros((5, 100, 40), dtype=np.uint8)      # (slices, rows, columns)
    mask[:, 0:6, 8:24] = 107
    mask[:, 2:96, 28:34] = 100
    row = TOP
    for n in range(6, 0, -1):
        mask[:, row:row + BODY_ROWS, 8:24] = n
        mask[:, row + BODY_ROWS:row + BODY_ROWS + DISC_ROWS, 9:23] = 200 + n
        row += BODY_ROWS + DISC_ROWS
    if extra is not None:
        mask[2, 98, 2] = extra
    return mask


def _volume_cohort(root):
    """Two volumes with SPIDER-numbered masks (one holding a value SPIDER does not define) and their table."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for name, extra in (("a", 150), ("b", None)):
        mask = sitk.GetImageFromArray(_spider_mask(extra))
        mask.SetSpacing((0.9, 0.9, 4.0))
        image = sitk.Cast(mask, sitk.sitkFloat32) + 10.0
        sitk.WriteImage(image, str(root / "images" / f"{name}.mha"))
        sitk.WriteImage(mask, str(root / "masks" / f"{name}.mha"))
        rows.append({"image": f"images/{name}.mha", "mask": f"masks/{name}.mha", "subject": name.upper()})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)


def test_a_spider_cohort_is_ingested_with_its_levels_and_its_unknown_values_reported(tmp_path):
    _volume_cohort(tmp_path / "spider")
    out = tmp_path / "out"
    summary = ingest_volumes.ingest_volumes(tmp_path / "spider" / "cohort.csv", IngestOutputs.in_folder(out), KEY,
                                            label_scheme=ls.SPIDER)
    assert summary["with_label_map"] == 2
    assert summary["label_maps_with_unknown_values"] == 1 and summary["label_maps_without_level"] == 0
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).sort_values("subject_id")
    files = pd.read_csv(out / "files.csv").set_index("series")
    for scan in manifest.itertuples():
        mask = _spider_mask()
        expected = np.vectorize(SPIDER_TO_VERSE.get)(mask)
        copied = sitk.GetArrayFromImage(sitk.ReadImage(str(out / scan.label_map)))
        np.testing.assert_array_equal(copied, expected)   # the stray 150 is background too
        reason = files.loc[scan.scan_id, "reason"]
        if scan.label_problem:
            assert scan.label_problem == "label values unknown to label scheme 'spider', set to background: 150"
            assert reason.endswith("; label map masks/a.mha: " + scan.label_problem)
        else:
            assert reason == f"in volume {scan.scan_id}"
    assert manifest.label_problem.astype(bool).sum() == 1

    structures = structures_from_label_map(sitk.ReadImage(str(out / manifest.label_map.iloc[0])))
    bodies, discs = structures[structures.kind == "vertebra"], structures[structures.kind == "disc"]
    assert bodies.level.tolist() == ["T12", "L1", "L2", "L3", "L4", "L5"]          # no sacrum in SPIDER
    assert discs.level.tolist() == list(levels.DISCS)
    centre_rows = TOP + np.arange(6) * (BODY_ROWS + DISC_ROWS) + (BODY_ROWS - 1) / 2
    np.testing.assert_allclose(bodies.j, centre_rows)
    np.testing.assert_allclose(discs.j, centre_rows + (BODY_ROWS + DISC_ROWS) / 2)


def test_a_spider_cohort_read_as_verse_uses_no_mask_and_counts_them(tmp_path):
    _volume_cohort(tmp_path / "spider")
    out = tmp_path / "out"
    summary = ingest_volumes.ingest_volumes(tmp_path / "spider" / "cohort.csv", IngestOutputs.in_folder(out), KEY)
    assert summary["with_label_map"] == 0 and summary["label_maps_without_level"] == 2
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert manifest.label_problem.str.startswith("no level of the workflow").all()
    assert manifest.label_problem.str.contains("under label scheme 'verse' in values 1-6, 100, 107").all()
    assert not list((out / "labels").iterdir())


# What a scheme can name, and what localise therefore expects in a label map: SPIDER has no sacrum label.
def test_the_levels_a_scheme_can_name_are_those_it_maps_to():
    everything = levels.VERTEBRAE + levels.DISCS
    assert ls.named_levels(ls.VERSE) == everything
    assert ls.named_levels(ls.SPIDER) == tuple(name for name in everything if name != "S1")
    mapping = ls.scheme_from_config({"vertebra": {1: "L5", 2: "L4"}, "disc": {201: "L5-S1"}, "other": [100]})
    assert ls.named_levels(mapping) == ("L4", "L5", "L5-S1")


def test_localise_reads_the_scheme_of_the_workflow_and_defaults_to_every_level():
    parser = localise.build_parser()
    args = parser.parse_args(ls.scheme_options("spider"))
    assert ls.named_levels(ls.scheme_from_args(args, parser)) == ls.named_levels(ls.SPIDER)
    assert ls.scheme_from_args(parser.parse_args([]), parser) == ls.VERSE


# A sagittal spine at a real scale (1 mm rows and columns, 4 mm slices), numbered as SPIDER numbers it: bodies 25 mm
# high, 30 mm deep, 33 mm apart, T12 (6) at the top to L5 (1), no sacrum. Each body has its own intensity, so the
# normalisation of every volume can be computed here from the rule (the median of the bodies above and below).
SPINE_TOP, SPINE_BODY, SPINE_DISC = 20, 25, 8
BODY_INTENSITY = {"T12": 100.0, "L1": 110.0, "L2": 120.0, "L3": 130.0, "L4": 140.0, "L5": 150.0}
DISC_INTENSITY, CANAL_INTENSITY = 60.0, 200.0
SAGITTAL = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # columns: i posterior (+y), j down (-z), k to the right (-x)


def _spider_spine(brighter: float) -> tuple[sitk.Image, sitk.Image]:
    """A SPIDER-numbered mask of T12-L5 and its discs (and canal, and a cut vertebra above) and an image whose
    bodies have BODY_INTENSITY + ``brighter``."""
    mask = np.zeros((5, 240, 64), dtype=np.uint8)      # (slices, rows down the spine, columns to posterior)
    image = np.zeros(mask.shape, dtype=np.float32)
    mask[:, 0:12, 10:40], image[:, 0:12, 10:40] = 107, 100.0
    mask[:, 5:235, 48:54], image[:, 5:235, 48:54] = 100, CANAL_INTENSITY
    row = SPINE_TOP
    for n, level in zip(range(6, 0, -1), levels.VERTEBRAE):
        body, disc = slice(row, row + SPINE_BODY), slice(row + SPINE_BODY, row + SPINE_BODY + SPINE_DISC)
        mask[:, body, 10:40], image[:, body, 10:40] = n, BODY_INTENSITY[level] + brighter
        mask[:, disc, 12:38], image[:, disc, 12:38] = 200 + n, DISC_INTENSITY
        row += SPINE_BODY + SPINE_DISC
    out = []
    for array in (image, mask):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((1.0, 1.0, 4.0))
        volume.SetDirection(SAGITTAL)
        out.append(volume)
    return out[0], out[1]


def _spider_spine_cohort(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for name, brighter in (("p", 0.0), ("q", 20.0)):
        image, mask = _spider_spine(brighter)
        sitk.WriteImage(image, str(root / "images" / f"{name}_t2.mha"))
        sitk.WriteImage(mask, str(root / "masks" / f"{name}_t2.mha"))
        rows.append({"image": f"images/{name}_t2.mha", "mask": f"masks/{name}_t2.mha", "subject": name})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root / "cohort.csv"


def _expected_scale(kind: str, level: str, brighter: float) -> float:
    """0.5 over the median of the bodies around ``level`` that the mask has (no S1), written out from the rule."""
    column = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    if kind == "disc":
        around = level.split("-")
    else:
        i = column.index(level)
        around = [column[j] for j in (i - 1, i + 1) if 0 <= j < len(column)]
    return 0.5 / float(np.median([BODY_INTENSITY[b] + brighter for b in around if b in BODY_INTENSITY]))


def test_a_level_the_scheme_cannot_name_is_not_missing_but_every_other_check_stays():
    mask, _ = ls.remap_image(_spider_spine(0.0)[1], ls.SPIDER)
    table = structures_from_label_map(mask)
    spider = ls.named_levels(ls.SPIDER)
    assert check_structures(table) == ["missing vertebra level(s): S1"]
    assert check_structures(table, expected=spider) == []
    assert check_structures(table[table.level != "L3"], expected=spider) == ["missing vertebra level(s): L3"]
    assert check_structures(table[table.level != "L4-L5"], expected=spider) == ["missing disc level(s): L4-L5"]
    swapped = table.copy()
    l1, l4 = swapped.index[swapped.level == "L1"][0], swapped.index[swapped.level == "L4"][0]
    swapped.loc[[l1, l4], ["x", "y", "z"]] = swapped.loc[[l4, l1], ["x", "y", "z"]].to_numpy()
    assert "levels out of order along the spine" in check_structures(swapped, expected=spider)
    assert any("transitional" in p for p in check_structures(table, {25}, expected=spider))


def test_a_spider_cohort_is_localised_from_its_masks_without_s1_and_extracted(tmp_path):
    ingested = tmp_path / "ingest"
    ingest_volumes.ingest_volumes(_spider_spine_cohort(tmp_path / "spider"), IngestOutputs.in_folder(ingested), KEY,
                                  label_scheme=ls.SPIDER)
    manifest = pd.read_parquet(ingested / "manifest.parquet")
    assert (manifest.label_map != "").all() and (manifest.label_problem == "").all()

    # Read as if every level were expected (the verse default), each scan lacks S1 and nothing is extracted ...
    strict = localise_folder(ingested, tmp_path / "strict", LocaliseConfig.from_config(), None)
    assert strict["flagged"] == 2
    assert set(pd.read_csv(tmp_path / "strict" / "flags.csv").reason) == {"missing vertebra level(s): S1"}

    # ... with the levels SPIDER can name, no scan is flagged, and every body but S1 and every disc is extracted.
    summary = localise_folder(ingested, tmp_path / "localise", LocaliseConfig.from_config(), None,
                              expected=ls.named_levels(ls.SPIDER))
    assert summary["flagged"] == 0 and summary["from_label_map"] == 2
    assert pd.read_csv(tmp_path / "localise" / "flags.csv").empty
    extract = ExtractConfig.from_config({"vertebra_size": [32, 32, 5], "disc_size": [16, 32, 5],
                                         "axial_size": [16, 16]})
    index = extract_folder(ingested, tmp_path / "localise", tmp_path / "extract", extract)
    arrays = {name: np.load(tmp_path / "extract" / f"{name}.npy") for name in ("vertebrae", "discs", "axial")}
    assert arrays["vertebrae"].shape == (12, 5, 32, 32)
    assert arrays["discs"].shape == (12, 5, 16, 32) and arrays["axial"].shape == (12, 3, 16, 16)
    brighter = {}
    for scan, rows in index.groupby("scan_id"):
        assert rows.level[rows.kind == "vertebra"].tolist() == ["T12", "L1", "L2", "L3", "L4", "L5"]
        assert rows.level[rows.kind == "disc"].tolist() == list(levels.DISCS)
        assert (rows.flag == "").all()
        # Which scan is the brighter one (ids are pseudonyms): T12's scale is 0.5 over L1's intensity.
        brighter[scan] = 0.0 if rows[rows.level == "T12"].scale.iloc[0] == pytest.approx(0.5 / 110.0) else 20.0
        for row in rows.itertuples():
            assert row.scale == pytest.approx(_expected_scale(row.kind, row.level, brighter[scan]), rel=1e-6), \
                (row.kind, row.level)
        for row in rows[rows.kind == "vertebra"].itertuples():   # the slot holds this body: its middle, scaled
            middle = arrays["vertebrae"][row.row, 2, 16, 16]
            assert middle == pytest.approx((BODY_INTENSITY[row.level] + brighter[scan]) * row.scale, rel=2e-3)
    assert sorted(brighter.values()) == [0.0, 20.0]
    for name in ("vertebrae", "discs"):
        assert sorted(index.row[index.array == name]) == list(range(12))
