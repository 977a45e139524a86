"""Stage extract_crops: the crops of a crop-table cohort -> the extract stage's array store and index.

The crops ingested by stages.ingest_crops are brought to the extraction sizes (``extract.vertebra_size``,
``extract.disc_size``): each slice is resized with its aspect ratio kept so that it fits the height x width, and
zero-padded around; the slices are centred and zero-padded (or the central ones kept) to the number of slices, so a
2D crop becomes a volume with the image on its middle slice and zeros on the others (Jamaludin et al. 2017 zero-pad
scans with fewer slices). Intensities are normalised as the extract stage does, where the acquisition allows it: the
median intensity of the neighbouring vertebral bodies' cores (bodies above and below; a disc's two bodies) becomes
0.5; a crop without neighbouring bodies in its acquisition is normalised by its own core's median (per image). A
crop that has neither (its core is empty) is flagged in the index's ``flag`` column with the reason and left as zeros
in its array, never NaN (the splits stage leaves flagged volumes out).

Crops are not resliced: ``axial.npy`` (the Hou et al. 2023 path) holds zeros for them, and the index's ``source`` is
``crop_table`` (centres and pixel sizes unknown: NaN).

Run:
    python -m stages.extract_crops --crop-table results/ingest/crops.parquet --crops results/ingest/crops \\
        --out-vertebrae results/extract/vertebrae.npy --out-discs results/extract/discs.npy \\
        --out-axial results/extract/axial.npy --out-index results/extract/index.parquet

Writes the arrays and the index (Parquet, a CSV copy beside it) exactly as stages.extract does, one acquisition at a
time through memory maps (the cohort is never held in memory).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import zoom

from stages.anatomy.crops import (
    EXTRACT_OUTPUTS,
    INDEX_COLUMNS,
    ExtractConfig,
    ExtractOutputs,
    neighbour_reference,
    normalise,
)
from stages.archive.manifest import scan_file, write_table
from stages.core import cli, levels

log = logging.getLogger("extract_crops")

ORDER = {name: i for i, name in enumerate(levels.VERTEBRAE + levels.DISCS)}
EMPTY = "no intensity to normalise by: no neighbouring vertebral body in the acquisition and no signal in the crop's core"


def fit(image: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """(S, H, W) image -> ``size`` (height, width, slices) as (slices, height, width): aspect-preserving resize of
    each slice to fit, zero padding around it, slices centred and zero-padded or cut to the central ones."""
    height, width, slices = size
    s, h, w = image.shape
    factor = min(height / h, width / w)
    new_h, new_w = max(1, min(height, round(h * factor))), max(1, min(width, round(w * factor)))
    resized = zoom(image, (1, new_h / h, new_w / w), order=1, grid_mode=True, mode="nearest") \
        if (new_h, new_w) != (h, w) else image
    out = np.zeros((slices, height, width), np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    keep = min(s, slices)
    src0, dst0 = (s - keep) // 2, (slices - keep) // 2
    out[dst0:dst0 + keep, top:top + new_h, left:left + new_w] = resized[src0:src0 + keep, :new_h, :new_w]
    return out


def core_median(volume: np.ndarray) -> float:
    """Median positive intensity of the middle 60% of height and width over the central (up to 3) filled slices."""
    filled = np.flatnonzero(volume.reshape(len(volume), -1).max(axis=1) > 0)
    if not len(filled):
        return float("nan")
    mid = filled[len(filled) // 2]
    lo, hi = max(mid - 1, filled[0]), min(mid + 2, filled[-1] + 1)
    _, h, w = volume.shape
    rows = slice(int(0.2 * h), max(int(0.8 * h), int(0.2 * h) + 1))
    cols = slice(int(0.2 * w), max(int(0.8 * w), int(0.2 * w) + 1))
    core = volume[lo:hi, rows, cols]
    values = core[core > 0]
    return float(np.median(values)) if values.size else float("nan")


def extract_crops(crop_table: Path, crop_folder: Path, out: ExtractOutputs, cfg: ExtractConfig) -> pd.DataFrame:
    """The crops of ``crop_table`` (crops.parquet of stages.ingest_crops; the images in ``crop_folder``) brought to the
    extraction sizes and normalised, into ``out``."""
    crops = pd.read_parquet(crop_table)
    crops = crops.assign(_order=crops.level.map(ORDER)).sort_values(["scan_id", "_order"]).reset_index(drop=True)
    for path in (out.vertebrae, out.discs, out.axial, out.index):
        path.parent.mkdir(parents=True, exist_ok=True)
    (h, w, s), (hd, wd, sd), (ha, wa) = cfg.vertebra_size, cfg.disc_size, cfg.axial_size
    n_bodies, n_discs = int((crops.kind == "vertebra").sum()), int((crops.kind == "disc").sum())
    arrays = {"vertebrae": np.lib.format.open_memmap(out.vertebrae, "w+", np.float16, (n_bodies, s, h, w)),
              "discs": np.lib.format.open_memmap(out.discs, "w+", np.float16, (n_discs, sd, hd, wd)),
              "axial": np.lib.format.open_memmap(out.axial, "w+", np.float16, (n_discs, 3, ha, wa))}
    arrays["axial"][:] = 0
    slots = {"vertebrae": 0, "discs": 0}
    index = []
    per_image = 0
    for scan_id, group in crops.groupby("scan_id", sort=True):
        volumes = {}
        for crop in group.itertuples():
            size = cfg.vertebra_size if crop.kind == "vertebra" else cfg.disc_size
            volumes[crop.level] = fit(np.load(scan_file(crop_folder, crop.file)), size)
        medians = {level: core_median(v) for level, v in volumes.items()}
        bodies = {lv: m for lv, m in medians.items() if lv in levels.VERTEBRAE and np.isfinite(m)}
        for crop in group.itertuples():
            reference = neighbour_reference(crop.level, crop.kind, {k: v for k, v in bodies.items() if k != crop.level})
            if not np.isfinite(reference):  # no neighbouring body in this acquisition: the crop's own intensity
                reference = medians[crop.level]
                per_image += 1
            (volume,), scale, flag = normalise([volumes[crop.level]], reference, EMPTY)
            array = "vertebrae" if crop.kind == "vertebra" else "discs"
            slot = slots[array]
            slots[array] += 1
            arrays[array][slot] = volume
            index.append({"array": array, "row": slot, "scan_id": scan_id, "subject_id": crop.subject_id,
                          "study_id": crop.study_id, "days_since_first_study": crop.days_since_first_study,
                          "source": "crop_table", "kind": crop.kind, "level": crop.level, "x": np.nan, "y": np.nan,
                          "z": np.nan, "step_mm": np.nan, "scale": scale, "flag": flag})
    for array in arrays.values():
        array.flush()
    table = pd.DataFrame(index, columns=INDEX_COLUMNS)
    write_table(table, out.index)
    log.info("%d vertebral bodies and %d discs from %d acquisitions; %d crops normalised by their own intensity "
             "(no neighbouring body in their acquisition)", n_bodies, n_discs, crops.scan_id.nunique(), per_image)
    flagged = table[table.flag != ""]
    if len(flagged):
        log.warning("%d crop(s) flagged and left as zeros: %s (e.g. %s %s)", len(flagged), EMPTY,
                    flagged.scan_id.iloc[0], flagged.level.iloc[0])
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.extract_crops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop-table", type=cli.existing_file, required=True,
                        help="crops.parquet of stages.ingest_crops (one row per crop).")
    parser.add_argument("--crops", type=cli.existing_folder, required=True,
                        help="The folder of crops stages.ingest_crops wrote.")
    cli.add_section_options(parser, "extract")
    cli.add_output_options(parser, EXTRACT_OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = ExtractConfig.from_config(cli.section_from_args(args, "extract", parser))
    out = ExtractOutputs(**cli.outputs_from_args(args, parser, EXTRACT_OUTPUTS))
    cli.setup_logging(args.log, "extract_crops")
    extract_crops(args.crop_table, args.crops, out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
