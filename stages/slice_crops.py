"""Stage slice_crops: disc boxes on 2D sagittal slices -> disc crops (PNG) and a crop table (``cohort.source: crops``).

For sets that come as whole slices with one box per disc, such as the mid-sagittal slices of SPIDER (van der Graaf
et al., *Lumbar spine segmentation in MR images: a dataset and a public benchmark*, Scientific Data 11, 264 (2024),
CC BY 4.0: credit the authors wherever their slices or crops are used or shipped; see the README's "Real data:
SPIDER"). The disc table has one row per disc: ``image`` (a file in the images folder), ``subject``, ``sequence``
(the acquisition: T1 and T2 of one subject are two "studies", the positive pairs of self-supervision), ``level``
(L4-L5 etc.), the box (``x``, ``y``: its centre in pixels, origin top-left, a pixel covering [i, i + 1);
``box_width``, ``box_height``) and the labels ``pfirrmann`` and ``herniation`` (empty = not graded).

Each crop is the box enlarged by ``--context`` in both directions and then widened or heightened to the paper's
height:width of 1:2 (Jamaludin et al. 2017 cut discs as 112 x 224), centred on the box; the part of it outside the
image is zero. With the default 1.6, on the SPIDER slices (neighbouring discs about two box heights apart) a crop
keeps about half of each vertebral body above and below the disc (the median; from a fifth to all of it), as the
paper's disc volumes do. Pixels are written as read: 8-bit greyscale PNG (colour becomes the mean of its channels).

Every input row is accounted for: it is in the crop table (``source_row``: its line in the disc table), or in the
skipped table with the reason (missing or unreadable image, image not 8-bit, missing or non-numeric coordinate or
size, a box not wholly inside the image). Levels and labels are passed on as given: the ingest stage
(stages.ingest_crops) checks them and accounts for each row again in ``results/ingest/files.csv`` (SPIDER's T10-T11
and T11-T12 are outside the workflow's T12 ... S1 and quarantined there).

Run:
    python -m stages.slice_crops --discs ../shared/real_spider_sagittal/discs.csv \\
        --images ../shared/real_spider_sagittal/images --out-table spider/crops.csv --out-dir spider/crops

Writes --out-dir/{image stem}_{level}.png, --out-table (CSV: path relative to the table's folder, subject, study,
structure, level, pfirrmann, herniation, source_row; no time column: the rows of one subject are of one session)
and --out-skipped (CSV: source_row, image, subject, level, reason; default beside the table, ``*_skipped.csv``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.core import cli

log = logging.getLogger("slice_crops")

REQUIRED = ("image", "subject", "sequence", "level", "x", "y", "box_width", "box_height")
LABELS = ("pfirrmann", "herniation")
TABLE_COLUMNS = ["path", "subject", "study", "structure", "level", *LABELS, "source_row"]
SKIPPED_COLUMNS = ["source_row", "image", "subject", "level", "reason"]
DEFAULT_CONTEXT = 1.6
ASPECT = 2.0  # width / height of a disc crop (Jamaludin et al. 2017: 112 x 224)


@dataclass(frozen=True)
class Window:
    """A crop window in pixels: the first row and column (may be negative) and the size."""

    top: int
    left: int
    height: int
    width: int


def _round(value: float) -> int:
    """Half up (not to even): a box edge at 4.5 and one at 5.5 move the same way."""
    return math.floor(value + 0.5)


def crop_window(x: float, y: float, box_width: float, box_height: float, context: float = DEFAULT_CONTEXT,
                aspect: float = ASPECT) -> Window:
    """The box centred at (``x``, ``y``) enlarged by ``context``, then its shorter side grown until width / height is
    ``aspect``; centred on the box."""
    if context < 1:
        raise ValueError(f"context must be >= 1 (the crop holds the whole box), got {context}")
    if box_width <= 0 or box_height <= 0:
        raise ValueError(f"box size must be > 0, got {box_width} x {box_height}")
    width, height = context * box_width, context * box_height
    height = max(height, width / aspect)
    width = max(width, height * aspect)
    h, w = max(1, _round(height)), max(1, _round(width))
    return Window(top=_round(y - h / 2), left=_round(x - w / 2), height=h, width=w)


def box_inside(x: float, y: float, box_width: float, box_height: float, shape: tuple[int, int]) -> bool:
    """Whether the box lies wholly inside an image of ``shape`` (rows, columns)."""
    rows, cols = shape
    return x - box_width / 2 >= 0 and y - box_height / 2 >= 0 and x + box_width / 2 <= cols \
        and y + box_height / 2 <= rows


def cut(image: np.ndarray, window: Window) -> np.ndarray:
    """The ``window`` of a 2D ``image``, zero where it reaches outside the image."""
    out = np.zeros((window.height, window.width), image.dtype)
    rows, cols = image.shape
    r0, r1 = max(window.top, 0), min(window.top + window.height, rows)
    c0, c1 = max(window.left, 0), min(window.left + window.width, cols)
    if r0 < r1 and c0 < c1:
        out[r0 - window.top:r1 - window.top, c0 - window.left:c1 - window.left] = image[r0:r1, c0:c1]
    return out


def read_slice(path: Path) -> np.ndarray:
    """A 2D 8-bit greyscale image as (rows, columns) uint8, colour as the mean of its channels; ValueError (with the
    reason) for anything else."""
    if not path.is_file():
        raise ValueError("missing image")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ValueError("unreadable image") from None
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.rint(array[..., :3].mean(axis=-1))
    elif array.dtype != np.uint8:
        raise ValueError(f"not an 8-bit image ({array.dtype})")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"not a 2D image ({array.ndim} dimensions)")
    return array.astype(np.uint8)


def _number(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not a number")
    return number


def _label(value: str) -> str:
    """A label as a whole number's text ("3.0" -> "3"); anything else as given (the ingest stage judges it)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if math.isfinite(number) and number == int(number) else value


def crop_name(image: str, level: str, row: int, taken: set[str]) -> str:
    """``{image stem}_{level}.png``, or with ``_row{row}`` when the level is empty or the name is taken."""
    stem = Path(image).stem
    name = f"{stem}_{level}.png" if level else f"{stem}_row{row}.png"
    return f"{stem}_{level}_row{row}.png" if name in taken else name


def slice_crops(discs: pd.DataFrame, images: Path, out_dir: Path, table_dir: Path,
                context: float = DEFAULT_CONTEXT) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut every disc of ``discs`` (text columns, as read) from its slice in ``images`` into ``out_dir``; return the
    crop table (paths relative to ``table_dir``) and the skipped rows with their reasons."""
    missing = [c for c in REQUIRED if c not in discs]
    if missing:
        raise ValueError(f"the disc table has no column(s) {missing}; it has {list(discs.columns)}")
    if context < 1:
        raise ValueError(f"context must be >= 1 (the crop holds the whole box), got {context}")
    out_dir.mkdir(parents=True, exist_ok=True)
    slices: dict[str, np.ndarray | ValueError] = {}
    crops, skipped, taken = [], [], set()
    for n, rec in enumerate(discs.to_dict("records"), start=2):  # line 1 is the header
        image, level = str(rec["image"]).strip(), str(rec["level"]).strip()
        try:
            if not image:
                raise ValueError("missing image name")
            if image not in slices:
                try:
                    slices[image] = read_slice(images / image)
                except ValueError as err:  # reported on every row of that image
                    slices[image] = err
            pixels = slices[image]
            if isinstance(pixels, ValueError):
                raise pixels
            box = [_number(str(rec[c]).strip(), c) for c in ("x", "y", "box_width", "box_height")]
            if box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"box size {box[2]:g} x {box[3]:g} is not positive")
            if not box_inside(*box, pixels.shape):
                raise ValueError(f"box outside the image: centre ({box[0]:g}, {box[1]:g}), {box[2]:g} x {box[3]:g} "
                                 f"in an image of {pixels.shape[1]} x {pixels.shape[0]} pixels")
        except ValueError as err:
            skipped.append({"source_row": n, "image": image, "subject": rec["subject"], "level": level,
                            "reason": str(err)})
            continue
        name = crop_name(image, level, n, taken)
        taken.add(name)
        crop = cut(pixels, crop_window(*box, context=context))
        sitk.WriteImage(sitk.GetImageFromArray(crop), str(out_dir / name))
        path = Path(os.path.relpath(out_dir / name, table_dir)).as_posix()
        crops.append({"path": path, "subject": str(rec["subject"]).strip(), "study": str(rec["sequence"]).strip(),
                      "structure": "disc", "level": level,
                      **{k: _label(str(rec.get(k, "")).strip()) for k in LABELS}, "source_row": n})
    return pd.DataFrame(crops, columns=TABLE_COLUMNS), pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.slice_crops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--discs", type=cli.existing_file, required=True,
                        help="CSV, one row per disc: image, subject, sequence, level, x, y, box_width, box_height, "
                             "pfirrmann, herniation.")
    parser.add_argument("--images", type=cli.existing_folder, required=True, help="The folder of the slices.")
    parser.add_argument("--context", type=float, default=DEFAULT_CONTEXT,
                        help=f"The box is enlarged by this factor (>= 1), then to height:width 1:2 "
                             f"(default: {DEFAULT_CONTEXT}).")
    parser.add_argument("--out-table", type=Path, required=True, help="The crop table (CSV).")
    parser.add_argument("--out-dir", type=Path, required=True, help="Folder of the crops (PNG).")
    parser.add_argument("--out-skipped", type=Path, default=None,
                        help="The rows not cut, with the reason (CSV; default: beside the table, *_skipped.csv).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.context >= 1:
        parser.error(f"--context must be >= 1 (the crop holds the whole box), got {args.context}")
    if args.out_table.suffix.lower() != ".csv":
        parser.error(f"--out-table must be a .csv file, got {args.out_table}")
    skipped_path = args.out_skipped or args.out_table.with_name(args.out_table.stem + "_skipped.csv")
    cli.setup_logging(args.log, "slice_crops")
    discs = pd.read_csv(args.discs, dtype=str, keep_default_na=False)
    try:
        table, skipped = slice_crops(discs, args.images, args.out_dir, args.out_table.parent, args.context)
    except ValueError as err:
        log.error("%s: %s", args.discs, err)
        return 1
    args.out_table.parent.mkdir(parents=True, exist_ok=True)
    skipped_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out_table, index=False)
    skipped.to_csv(skipped_path, index=False)
    log.info("%d disc rows: %d crops in %s (%d subjects, %d acquisitions), %d skipped (%s)", len(discs), len(table),
             args.out_dir, table.subject.nunique(), len(set(zip(table.subject, table.study))), len(skipped),
             skipped_path)
    for reason, count in skipped.reason.str.split(":").str[0].value_counts().items():
        log.warning("skipped %d row(s): %s", count, reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
