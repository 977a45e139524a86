"""Stage localiser_slices: measure a localiser on real 2D sagittal slices with known disc centres and levels.

Each image (PNG or any greyscale format Pillow reads; rows head to feet, anterior on the left) is localised as a
one-slice volume. Its pixel spacing is unknown, so the image is given ``--fov-mm`` over its height (the localiser
uses millimetres only for its peak spacing and extents), and every error is judged relative to the spacing between
neighbouring discs. Per true disc of the levels the workflow labels (T12-L1 .. L5-S1):

- found: a predicted disc centre lies within half the local disc spacing (the mean distance to the true discs just
  above and below in the same image);
- level correct: that nearest predicted disc carries the true level;
- relative error: its distance over the local disc spacing.

Made for ``../shared/real_spider_sagittal`` (51 slices of 31 SPIDER patients: van der Graaf et al., Scientific Data
11, 264, 2024, CC BY 4.0; columns image, level, x, y).

Run:
    python -m stages.localiser_slices --discs ../shared/real_spider_sagittal/discs.csv \\
        --images ../shared/real_spider_sagittal/images --out-discs spider_discs.csv --out-summary spider.json

``--model`` defaults to the built-in weights. Writes ``--out-discs`` (one row per true disc) and ``--out-summary``
(JSON: found share, level accuracy, relative error, and the images where localisation failed, with the reason).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.anatomy.localiser import BUILTIN, load_localiser, localise_image, slice_image
from stages.core import cli, levels

log = logging.getLogger("localiser_slices")

DISC_COLUMNS = ["image", "level", "x", "y", "spacing_px", "found", "level_correct", "predicted_level", "error_px",
                "relative_error"]


def local_spacing(discs: pd.DataFrame) -> pd.Series:
    """Per disc row of one image: the mean distance to the discs just above and below it (by image row)."""
    ordered = discs.sort_values("y")
    xy = ordered[["x", "y"]].to_numpy(float)
    gaps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    above = np.concatenate([[np.nan], gaps])
    below = np.concatenate([gaps, [np.nan]])
    return pd.Series(np.nanmean(np.column_stack([above, below]), axis=1), index=ordered.index).reindex(discs.index)


def score_image(truth: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """The DISC_COLUMNS rows of one image's true discs (``image, level, x, y``, every level the table has) against
    the predicted disc rows (``level, i, j`` in pixels)."""
    truth = truth.assign(spacing_px=local_spacing(truth))
    truth = truth[truth.level.isin(levels.DISCS)]
    points = predicted[["i", "j"]].to_numpy(float)
    rows = []
    for t in truth.itertuples():
        row = {"image": t.image, "level": t.level, "x": t.x, "y": t.y, "spacing_px": t.spacing_px, "found": False,
               "level_correct": False, "predicted_level": "", "error_px": np.nan, "relative_error": np.nan}
        if len(points):
            distance = np.linalg.norm(points - [t.x, t.y], axis=1)
            nearest = int(np.argmin(distance))
            if distance[nearest] <= 0.5 * t.spacing_px:
                level = predicted.level.iloc[nearest]
                row.update(found=True, level_correct=bool(level == t.level), predicted_level=level,
                           error_px=float(distance[nearest]), relative_error=float(distance[nearest] / t.spacing_px))
        rows.append(row)
    return pd.DataFrame(rows, columns=DISC_COLUMNS)


def summarise(scored: pd.DataFrame, failures: dict[str, str], images: int) -> dict[str, Any]:
    found = scored[scored.found]
    return {"images": images, "discs": len(scored), "found": float(scored.found.mean()),
            "level_accuracy_of_found": float(found.level_correct.mean()) if len(found) else None,
            "found_at_right_level": float(scored.level_correct.mean()),
            "median_relative_error": float(found.relative_error.median()) if len(found) else None,
            "p90_relative_error": float(found.relative_error.quantile(0.9)) if len(found) else None,
            "images_failed": failures}


def run(discs_csv: Path, images: Path, model_path: Path, fov_mm: float) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Localise every image of the disc table and score its discs."""
    table = pd.read_csv(discs_csv, dtype={"level": str}, keep_default_na=False)
    missing = {"image", "level", "x", "y"} - set(table.columns)
    if missing:
        raise SystemExit(f"{discs_csv}: columns {sorted(missing)} missing")
    table = table[table.level != ""].astype({"x": float, "y": float})
    model, cfg = load_localiser(model_path)
    if model is None:
        raise SystemExit(f"{model_path} holds an untrained localiser")
    scored, failures = [], {}
    for name, truth in table.groupby("image", sort=True):
        pixels = np.asarray(Image.open(images / name).convert("F"), dtype=np.float32)
        predicted, problems = localise_image(model, cfg, slice_image(pixels, fov_mm / pixels.shape[0]))
        if problems:
            failures[name] = "; ".join(problems)
        scored.append(score_image(truth, predicted[predicted.kind == "disc"]))
    result = pd.concat(scored, ignore_index=True)
    return result, summarise(result, failures, table.image.nunique())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localiser_slices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--discs", type=cli.existing_file, required=True,
                        help="CSV with one row per disc: image, level, x, y (pixels, origin top-left).")
    parser.add_argument("--images", type=cli.existing_folder, required=True, help="Folder of the images.")
    parser.add_argument("--model", type=cli.existing_file, default=BUILTIN,
                        help="Localiser weights (default: the built-in ones).")
    parser.add_argument("--fov-mm", type=float, default=300.0,
                        help="Assumed height of every image in mm (default: 300, a lumbar sagittal field of view).")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="PyTorch threads (default: 1).")
    cli.add_output_options(parser, {"discs": "One row per true disc (CSV).", "summary": "The figures (JSON)."})
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.fov_mm > 0:
        parser.error(f"--fov-mm must be positive, got {args.fov_mm}")
    out = cli.outputs_from_args(args, parser, {"discs": "", "summary": ""})
    cli.setup_logging(args.log, "localiser_slices")
    torch.set_num_threads(args.threads)
    scored, summary = run(args.discs, args.images, args.model, args.fov_mm)
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    scored.to_csv(out["discs"], index=False)
    out["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d discs of %d images: found %.3f, level accuracy of found %s, median relative error %s",
             summary["discs"], summary["images"], summary["found"], summary["level_accuracy_of_found"],
             summary["median_relative_error"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
