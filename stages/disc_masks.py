"""Stage disc_masks: the disc's label map cut like the volumes the downstream models read, for the
attention-inside-the-disc score.

A disc sample is read as the disc's own volume (``--disc-input disc``, probes.disc_input's default: the disc
classifier of Jamaludin et al. 2017) or as the body above and the body below the disc (``--disc-input bodies``,
stages/evaluation/probe_data.py). For each test sample whose scan has a label map (``has_mask``; the masks of the
others are empty and they are left out of the score), the disc's voxels (its label in the map) are cut with exactly
the crop of each volume the model reads (the same centre, spine axis, pixel size and slices as extract,
stages/anatomy/crops.py ``crop``: the disc's structure row and ``extract.disc_size``, or each body's row and
``extract.vertebra_size``; linear interpolation, then thresholded at 0.5): masks aligned voxel for voxel with the
model's input. (Ingest copies a label map only when its grid equals the volume's: size, origin, spacing and
direction; so the structures' voxel coordinates hold for it too.)

Run:
    python -m stages.disc_masks --manifest results/ingest/manifest.parquet \\
        --structures results/localise/structures.parquet --volumes results/splits/volumes.parquet \\
        --gradcam-task grade --disc-input disc --disc-size 48 64 9 --width-fraction 0.5 \\
        --out results/report/gradcam/disc_masks.npz
    (the two bodies: ``--disc-input bodies --vertebra-size 64 64 9`` instead)

The label maps are the files the manifest names (column ``label_map``, relative to the manifest's folder).

Writes ``disc_masks.npz``: every downstream test sample of the task, ``masks`` uint8, ``(n, 1, S, H, W)`` aligned
with the disc volume (disc input) or ``(n, 2, S, H, W)`` with the upper and the lower body (bodies input),
``has_mask`` (n,), ``disc_input`` and ``sample_*`` columns: scan_id, level, label, and ``row`` (the disc's row of
``extract/discs.npy``) or ``upper`` and ``lower`` (rows of ``extract/vertebrae.npy``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.anatomy.crops import crop
from stages.core import cli, levels
from stages.evaluation.probe_data import TASKS, task_samples

log = logging.getLogger("disc_masks")


DISC_INPUTS = ("disc", "bodies")


def scan_masks(label: np.ndarray, image: sitk.Image, structures: pd.DataFrame, samples: pd.DataFrame,
               size: tuple[int, int, int], width_fraction: float) -> np.ndarray:
    """``(n, 2, S, H, W)`` masks of one scan's disc samples read as two bodies: the disc of each sample cut with the
    crop of its upper and of its lower body (``size``: extract.vertebra_size). ``label``: the label map as an array
    (slices, rows, columns) on ``image``'s grid."""
    bodies = structures[structures.kind == "vertebra"].set_index("level")
    out = np.zeros((len(samples), 2, size[2], size[0], size[1]), dtype=np.uint8)
    for i, level in enumerate(samples.level):
        disc = (label == levels.DISC_LABELS[level]).astype(np.float32)
        for j, body in enumerate(level.split("-")):
            row = next(bodies.loc[[body]].itertuples())
            cut, _ = crop(disc, image, row, size, width_fraction)
            out[i, j] = cut >= 0.5
    return out


def scan_disc_masks(label: np.ndarray, image: sitk.Image, structures: pd.DataFrame, samples: pd.DataFrame,
                    size: tuple[int, int, int], width_fraction: float) -> np.ndarray:
    """``(n, 1, S, H, W)`` masks of one scan's disc samples read as the disc volume: the disc of each sample cut with
    the disc's own crop, as extract cuts ``discs.npy`` (``size``: extract.disc_size)."""
    discs = structures[structures.kind == "disc"].set_index("level")
    out = np.zeros((len(samples), 1, size[2], size[0], size[1]), dtype=np.uint8)
    for i, level in enumerate(samples.level):
        if level not in discs.index:
            raise ValueError(f"{samples.scan_id.iloc[i]}: no disc {level} in the structures table (localise), "
                             "though the disc volume was extracted")
        disc = (label == levels.DISC_LABELS[level]).astype(np.float32)
        cut, _ = crop(disc, image, next(discs.loc[[level]].itertuples()), size, width_fraction)
        out[i, 0] = cut >= 0.5
    return out


def run(manifest_file: Path, structures_file: Path, volumes_file: Path, task: str, size: tuple[int, int, int],
        width_fraction: float, out: Path, disc_input: str = "disc") -> dict[str, Any]:
    """The masks of the task's test samples as the model reading ``disc_input`` sees them; ``size``: the crop size
    of that input (extract.disc_size for the disc, extract.vertebra_size for the bodies), (height, width, slices)."""
    if TASKS[task].kind != "disc":
        raise ValueError(f"task {task!r} is not a disc task: the score needs a disc (grade or herniation)")
    if disc_input not in DISC_INPUTS:
        raise ValueError(f"disc_input must be one of {DISC_INPUTS}, got {disc_input!r}")
    manifest = pd.read_parquet(manifest_file)
    structures = pd.read_parquet(structures_file)
    samples, _ = task_samples(pd.read_parquet(volumes_file), TASKS[task], disc_input)
    samples = samples[samples.downstream_part == "test"].reset_index(drop=True)
    label_of = dict(zip(manifest.scan_id, manifest.label_map.fillna("")))
    has_mask = samples.scan_id.map(lambda s: bool(label_of.get(s, ""))).to_numpy(dtype=bool)
    if not has_mask.all():
        log.warning("%d of %d test samples (%d scans) have no label map: left out of the attention score",
                    int((~has_mask).sum()), len(samples), samples.scan_id[~has_mask].nunique())
    views, cut = (1, scan_disc_masks) if disc_input == "disc" else (2, scan_masks)
    masks = np.zeros((len(samples), views, size[2], size[0], size[1]), dtype=np.uint8)
    for scan_id, group in samples[has_mask].groupby("scan_id", sort=False):
        image = sitk.ReadImage(str(manifest_file.parent / label_of[scan_id]))
        label = sitk.GetArrayFromImage(image)
        masks[group.index.to_numpy()] = cut(label, image, structures[structures.scan_id == scan_id], group, size,
                                            width_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = {"row": np.int64} if disc_input == "disc" else {"upper": np.int64, "lower": np.int64}
    columns = {"scan_id": str, "level": str, "label": np.int64, **rows}
    np.savez_compressed(out, masks=masks, has_mask=has_mask, disc_input=np.array(disc_input),
                        **{f"sample_{c}": samples[c].to_numpy().astype(t) for c, t in columns.items()})
    empty = int((has_mask & (masks.reshape(len(masks), -1).sum(1) == 0)).sum()) if len(masks) else 0
    if empty:
        log.warning("%d sample(s) have an empty disc mask (the disc lies outside the %s)", empty,
                    "disc's crop" if disc_input == "disc" else "both bodies' crops")
    summary = {"samples": len(samples), "scans": int(samples.scan_id.nunique()), "without_label_map":
               int((~has_mask).sum()), "empty_masks": empty, "disc_input": disc_input}
    log.info("disc masks of %d test samples (%d scans), cut as the %s", summary["samples"], summary["scans"],
             "disc volume" if disc_input == "disc" else "two bodies")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.disc_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=cli.existing_file, required=True,
                        help="ingest/manifest.parquet (the label maps it names are read, relative to it).")
    parser.add_argument("--structures", type=cli.existing_file, required=True,
                        help="localise/structures.parquet (the discs' and bodies' crop geometry).")
    parser.add_argument("--volumes", type=cli.existing_file, required=True, help="splits/volumes.parquet.")
    parser.add_argument("--gradcam-task", dest="task", choices=sorted(t for t, s in TASKS.items() if s.kind == "disc"),
                        default="grade", help="reports.gradcam_task: the disc task whose test samples are cut "
                                              "(default grade).")
    parser.add_argument("--disc-input", choices=DISC_INPUTS, default="disc",
                        help="probes.disc_input: what the models read, the disc volume or the two bodies around it "
                             "(default disc).")
    parser.add_argument("--disc-size", type=cli.positive_int, nargs=3, metavar=("HEIGHT", "WIDTH", "SLICES"),
                        help="extract.disc_size (--disc-input disc).")
    parser.add_argument("--vertebra-size", type=cli.positive_int, nargs=3,
                        metavar=("HEIGHT", "WIDTH", "SLICES"), help="extract.vertebra_size (--disc-input bodies).")
    parser.add_argument("--width-fraction", type=float, required=True, help="extract.width_fraction.")
    parser.add_argument("--out", type=Path, required=True, help="The .npz file to write.")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.width_fraction <= 1:
        parser.error(f"--width-fraction must be in (0, 1], got {args.width_fraction}")
    size = args.disc_size if args.disc_input == "disc" else args.vertebra_size
    if size is None:
        parser.error(f"--disc-input {args.disc_input} needs --{'disc' if args.disc_input == 'disc' else 'vertebra'}"
                     "-size (the crop size of the volumes the models read)")
    cli.setup_logging(args.log, "disc_masks")
    run(args.manifest, args.structures, args.volumes, args.task, tuple(size), args.width_fraction, args.out,
        args.disc_input)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
