"""stages.slice_crops: the crop window (box enlarged, then to height:width 1:2, centred), zero padding outside the
image, the crop table in the crop-table format, and every row accounted for (cut, or skipped with the reason).

Synthetic slices only; the real SPIDER slices run through the workflow in tests/test_spider.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import ROOT

from stages.slice_crops import TABLE_COLUMNS, Window, box_inside, crop_window, cut, slice_crops


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(image, isVector=image.ndim == 3), str(path))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_window_is_the_enlarged_box_at_one_to_two_centred_on_the_box():
    # a flat box: the width sets the size; a tall box: the height does
    assert crop_window(100, 50, 60, 20, context=1.5) == Window(top=28, left=55, height=45, width=90)  # 27.5 up
    assert crop_window(100, 50, 20, 20, context=2.0) == Window(top=30, left=60, height=40, width=80)
    # the box's pixels [y - h/2, y + h/2) stay centred when the sizes are odd (coordinates as in SPIDER: 14.5, 19)
    window = crop_window(561.5, 14.5, 89, 19, context=1.0)
    assert (window.top, window.height, window.left, window.width) == (-8, 45, 517, 89)
    with pytest.raises(ValueError, match="context must be >= 1"):
        crop_window(10, 10, 5, 5, context=0.5)
    with pytest.raises(ValueError, match="box size must be > 0"):
        crop_window(10, 10, 0, 5)


def test_cut_copies_the_window_and_pads_outside_with_zeros():
    image = np.arange(1, 101, dtype=np.uint8).reshape(10, 10)
    inside = cut(image, Window(2, 3, 4, 5))
    np.testing.assert_array_equal(inside, image[2:6, 3:8])
    corner = cut(image, Window(-2, 7, 4, 6))
    want = np.zeros((4, 6), np.uint8)
    want[2:, :3] = image[:2, 7:]
    np.testing.assert_array_equal(corner, want)
    assert not cut(image, Window(20, 20, 3, 3)).any()
    assert box_inside(5, 5, 10, 10, (10, 10)) and not box_inside(5, 5, 10.5, 10, (10, 10))


def test_every_row_is_cut_or_skipped_with_its_reason(tmp_path):
    rng = np.random.default_rng(0)
    slice_ = rng.integers(1, 255, (120, 160)).astype(np.uint8)
    _png(tmp_path / "images" / "a_t1.png", slice_)
    _png(tmp_path / "images" / "rgb.png", np.stack([slice_] * 3, axis=-1))  # colour: grey as the channels' mean
    _png(tmp_path / "images" / "wide.png", slice_.astype(np.uint16) * 100)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        ("a_t1.png", "s1", "t1", "L4-L5", "80", "60", "40", "16", "3.0", "0.0"),   # cut
        ("a_t1.png", "s1", "t1", "T11-T12", "80", "10", "40", "16", "", ""),       # cut (ingest judges the level)
        ("rgb.png", "s1", "t2", "L4-L5", "80", "60", "40", "16", "3", "1"),        # cut
        ("a_t1.png", "s1", "t1", "L5-S1", "150", "60", "40", "16", "2", "0"),      # box outside
        ("missing.png", "s2", "t1", "L4-L5", "80", "60", "40", "16", "2", "0"),    # missing image
        ("broken.png", "s2", "t1", "L4-L5", "80", "60", "40", "16", "2", "0"),     # unreadable
        ("wide.png", "s2", "t2", "L4-L5", "80", "60", "40", "16", "2", "0"),       # 16-bit
        ("a_t1.png", "s1", "t1", "L3-L4", "", "60", "40", "16", "2", "0"),         # no coordinate
        ("a_t1.png", "s1", "t1", "L2-L3", "80", "60", "40", "0", "2", "0"),        # empty box
    ]
    discs = pd.DataFrame(rows, columns=["image", "subject", "sequence", "level", "x", "y", "box_width", "box_height",
                                        "pfirrmann", "herniation"])
    table, skipped = slice_crops(discs, tmp_path / "images", tmp_path / "out" / "crops", tmp_path / "out")
    assert list(table.columns) == TABLE_COLUMNS
    assert table.source_row.tolist() == [2, 3, 4] and skipped.source_row.tolist() == [5, 6, 7, 8, 9, 10]
    reasons = skipped.reason.tolist()
    for reason, want in zip(reasons, ["box outside the image", "missing image", "unreadable image",
                                      "not an 8-bit image (uint16)", "x '' is not a number", "is not positive"]):
        assert want in reason, (reason, want)
    assert table.path.tolist() == ["crops/a_t1_L4-L5.png", "crops/a_t1_T11-T12.png", "crops/rgb_L4-L5.png"]
    assert table.study.tolist() == ["t1", "t1", "t2"] and set(table.structure) == {"disc"}
    assert table.pfirrmann.tolist() == ["3", "", "3"] and table.herniation.tolist() == ["0", "", "1"]
    crop = _read(tmp_path / "out" / "crops" / "a_t1_L4-L5.png")
    assert crop.dtype == np.uint8 and crop.shape == (32, 64)  # 40 x 16 box at 1.6: 64 wide, height 64 / 2
    np.testing.assert_array_equal(crop, slice_[60 - 16:60 + 16, 80 - 32:80 + 32])
    np.testing.assert_array_equal(_read(tmp_path / "out" / "crops" / "rgb_L4-L5.png"), crop)
    top = _read(tmp_path / "out" / "crops" / "a_t1_T11-T12.png")  # reaches above the image: zeros there
    assert not top[:6].any() and (top[6:] == slice_[:26, 48:112]).all()


def test_duplicate_or_empty_levels_get_distinct_names(tmp_path):
    _png(tmp_path / "images" / "a.png", np.full((50, 50), 9, np.uint8))
    discs = pd.DataFrame([("a.png", "s", "t2", level, "25", "25", "10", "5", "", "") for level in ("L4-L5", "L4-L5",
                                                                                                    "")],
                         columns=["image", "subject", "sequence", "level", "x", "y", "box_width", "box_height",
                                  "pfirrmann", "herniation"])
    table, skipped = slice_crops(discs, tmp_path / "images", tmp_path / "crops", tmp_path)
    assert table.path.tolist() == ["crops/a_L4-L5.png", "crops/a_L4-L5_row3.png", "crops/a_row4.png"]
    assert skipped.empty


def test_cli_writes_the_table_and_the_skipped_rows(tmp_path):
    _png(tmp_path / "images" / "a.png", np.full((50, 50), 9, np.uint8))
    pd.DataFrame({"image": ["a.png", "a.png"], "subject": ["s", "s"], "sequence": ["t2", "t2"],
                  "level": ["L4-L5", "L5-S1"], "x": [25, 49], "y": [25, 40], "box_width": [10, 10],
                  "box_height": [5, 5], "pfirrmann": [2, 3], "herniation": [0, 0]}).to_csv(tmp_path / "discs.csv",
                                                                                        index=False)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stages.slice_crops", *args], check=False, capture_output=True,
                              text=True, cwd=ROOT)
    base = ["--discs", str(tmp_path / "discs.csv"), "--images", str(tmp_path / "images"),
            "--out-table", str(tmp_path / "t" / "crops.csv"), "--out-dir", str(tmp_path / "t" / "crops")]
    assert run("--help").returncode == 0
    done = run(*base)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(tmp_path / "t" / "crops.csv")) == 1
    skipped = pd.read_csv(tmp_path / "t" / "crops_skipped.csv")
    assert skipped.source_row.tolist() == [3] and "box outside the image" in skipped.reason.iloc[0]
    assert "1 skipped" in done.stderr
    bad = run(*base, "--context", "0.8")
    assert bad.returncode == 2 and "--context must be >= 1" in bad.stderr
    bad = run(*base[:4], "--out-table", str(tmp_path / "t.parquet"), *base[6:])
    assert bad.returncode == 2 and ".csv" in bad.stderr
    (tmp_path / "bad.csv").write_text("image,subject\na.png,s\n")
    bad = run("--discs", str(tmp_path / "bad.csv"), *base[2:])
    assert bad.returncode == 1 and "no column(s)" in bad.stderr
