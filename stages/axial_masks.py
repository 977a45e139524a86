"""Stage axial_masks: the disc's masks on the axial slices a simclr model reads (Hou et al. 2023), for the
attention-inside-the-disc score of its Grad-CAM.

The simclr encoder and its probes read the axial_slices stage's ``slices.npy``: per disc, the three central slices of
the study's own axial series through the disc, or the slices resliced from the sagittal volume where there is none
(its index's ``source``: native | resliced | none). That stage cuts the disc's label map on exactly the pixels of
each of those slices (``masks.npy``, aligned with ``slices.npy``; stages/axial_slices.py says how); this stage picks
the rows of the downstream test discs of the task. A disc whose scan has no label map, or whose slices extraction
flagged, has ``has_mask`` False in that index (its masks are empty) and is left out of the score.

Run:
    python -m stages.axial_masks --axial-index results/axial/index.parquet --axial-masks results/axial/masks.npy \\
        --volumes results/splits/volumes.parquet --gradcam-task herniation --axial-spacing-mm 2 \\
        --out results/report/gradcam/axial_masks.npz

Writes ``axial_masks.npz``: every downstream test disc of the task (the disc samples, whatever probes.disc_input
says: the axial probes read the disc's row), ``masks`` uint8 ``(n, 3, 1, Ha, Wa)`` (the 3 slices, cranial first,
as 3 inputs of one slice each: stages/gradcam.py), ``has_mask`` (n,), ``disc_input`` ("axial"),
``axial_spacing_mm`` (extract.axial_spacing_mm: the resliced slices' spacing; native slices keep their series'), and
``sample_*`` columns: scan_id, level, label, row (the disc's row of ``axial/slices.npy``, extract's disc row) and
source (the slices': native, resliced or none).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli
from stages.evaluation.probe_data import TASKS, task_samples

log = logging.getLogger("axial_masks")


def run(index_file: Path, masks_file: Path, volumes_file: Path, task: str, spacing_mm: float,
        out: Path) -> dict[str, Any]:
    """The masks of the task's test discs on their axial slices: their rows of the axial_slices stage's masks."""
    if TASKS[task].kind != "disc":
        raise ValueError(f"task {task!r} is not a disc task: the score needs a disc (grade or herniation)")
    index = pd.read_parquet(index_file).sort_values("row").reset_index(drop=True)
    every = np.load(masks_file, mmap_mode="r")
    if every.ndim != 4 or every.shape[1] != 3 or len(index) != every.shape[0] or not (
            index.row.to_numpy() == np.arange(len(index))).all():
        raise ValueError(f"{masks_file} holds masks {every.shape}, {index_file} {len(index)} disc rows: they must be "
                         "(n, 3, Ha, Wa) and rows 0 to n-1, as the axial_slices stage writes them")
    samples, _ = task_samples(pd.read_parquet(volumes_file), TASKS[task], "disc")
    samples = samples[samples.downstream_part == "test"].reset_index(drop=True)
    rows = samples.row.to_numpy(dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(index) or not (
            index.scan_id.to_numpy()[rows] == samples.scan_id.to_numpy()).all() or not (
            index.level.to_numpy()[rows] == samples.level.to_numpy()).all()):
        raise ValueError(f"the disc rows of {volumes_file} are not those of {index_file} (scan and level per row): "
                         "were they made from another extraction?")
    has_mask = index.has_mask.to_numpy(dtype=bool)[rows]
    if not has_mask.all():
        log.warning("%d of %d test discs (%d scans) have no disc mask (no label map, or no slices): left out of the "
                    "attention score", int((~has_mask).sum()), len(samples), samples.scan_id[~has_mask].nunique())
    masks = np.zeros((len(samples), 3, 1, *every.shape[2:]), dtype=np.uint8)
    masks[:, :, 0] = every[rows]
    masks[~has_mask] = 0
    samples["source"] = index.source.to_numpy()[rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = {"scan_id": str, "level": str, "label": np.int64, "row": np.int64, "source": str}
    np.savez_compressed(out, masks=masks, has_mask=has_mask, disc_input=np.array("axial"),
                        axial_spacing_mm=np.array(spacing_mm),
                        **{f"sample_{c}": samples[c].to_numpy().astype(t) for c, t in columns.items()})
    empty = int((has_mask & (masks.reshape(len(masks), -1).sum(1) == 0)).sum()) if len(masks) else 0
    if empty:
        log.warning("%d disc(s) have an empty mask in all 3 axial slices (the disc lies outside them)", empty)
    share = float(masks[has_mask].mean()) if has_mask.any() else float("nan")
    summary = {"samples": len(samples), "scans": int(samples.scan_id.nunique()),
               "without_label_map": int((~has_mask).sum()), "empty_masks": empty, "disc_share": share,
               "native": int((samples.source == "native").sum())}
    log.info("axial disc masks of %d test discs (%d scans, %d on native slices); the disc covers %.3f of the slices",
             summary["samples"], summary["scans"], summary["native"], share)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.axial_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--axial-index", type=cli.existing_file, required=True,
                        help="axial/index.parquet of the axial_slices stage (its has_mask and source columns).")
    parser.add_argument("--axial-masks", type=cli.existing_file, required=True,
                        help="axial/masks.npy of the axial_slices stage (the disc's masks on its slices).")
    parser.add_argument("--volumes", type=cli.existing_file, required=True, help="splits/volumes.parquet.")
    parser.add_argument("--gradcam-task", dest="task", choices=sorted(t for t, s in TASKS.items() if s.kind == "disc"),
                        default="grade", help="reports.gradcam_task: the disc task whose test discs are taken "
                                              "(default grade).")
    parser.add_argument("--axial-spacing-mm", type=float, required=True,
                        help="extract.axial_spacing_mm (recorded in the output).")
    parser.add_argument("--out", type=Path, required=True, help="The .npz file to write.")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.axial_spacing_mm > 0:
        parser.error(f"--axial-spacing-mm must be > 0, got {args.axial_spacing_mm}")
    cli.setup_logging(args.log, "axial_masks")
    run(args.axial_index, args.axial_masks, args.volumes, args.task, args.axial_spacing_mm, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
