"""Stage axial_slices: each disc's three axial slices from the scan's own axial series (Hou et al. 2023), the slices
resliced from the sagittal volume where there is none.

Run:
    python -m stages.axial_slices --index results/extract/index.parquet --axial results/extract/axial.npy \\
        --structures results/localise/structures.parquet --second-series results/ingest/second_series.parquet \\
        --second-volumes results/ingest/second --manifest results/ingest/manifest.parquet --width-fraction 0.5 \\
        --axial-spacing-mm 2 --max-distance-mm 7 --max-angle-deg 20 --out-slices results/axial/slices.npy \\
        --out-masks results/axial/masks.npy --out-index results/axial/index.parquet \\
        --out-assignment results/axial/assignment.parquet

What happens, scan by scan: every slice of the study's second series (ingest.second_series; its volumes, one per
block) is assigned to a disc level of the sagittal localisation, or to none (stages/anatomy/axial.py: distance to the
disc centre, angle to the disc plane, inside the field of view). A disc with at least 3 slices gets its three central
ones (of 5: 2-4; of 4: 1-3, and 2-4 as its second sample), cut around the disc centre at the resliced stack's pixel size and orientation and
``--axial``'s size, their intensities scaled so that their median over the pixels the resliced stack covers equals
the resliced stack's (which extraction normalised to the neighbouring vertebral bodies): source ``native``. Any other
disc keeps the resliced stack of ``--axial`` (source ``resliced``), or zeros where extraction flagged the disc
(source ``none``). Without --second-series (a volumes cohort) every disc is ``resliced``.

Where the scan has a label map (the file the manifest names, relative to its folder: ingest copies one only when its
grid equals the sagittal volume's), the disc's label (``levels.DISC_LABELS``) is cut on exactly the pixels of each
of the disc's three slices: for a native slice, the label map sampled at the world coordinates of the slice's pixels
(the disc's indicator interpolated linearly, then >= 0.5); for the resliced ones, the indicator resliced by the
``axial_stack`` call extraction made (``--axial-spacing-mm``, ``--width-fraction``). These are the masks of the
attention score of the simclr model's Grad-CAM (stages/axial_masks.py).

Writes:
    --out-slices      float16 (n_discs, 3, Ha, Wa): row i is disc row i of extract's discs.npy and axial.npy (the
                      ``row`` of the index's disc rows, and of kind "disc" in the splits stage's volumes.parquet)
    --out-masks       uint8 (n_discs, 3, Ha, Wa): the disc's mask on each of those slices (zeros where has_mask is
                      False)
    --out-second-sample  float16 (n_discs, 3, Ha, Wa): slices 2-4 of a disc with 4 native slices (Hou et al.'s
                      second sample of it, scaled as the first; second_sample in the index), zeros for any other disc
    --out-index       one row per disc row: row, scan_id, level, source (native | resliced | none), n_slices (the
                      slices assigned to the disc), series and slices (block:slice of the three used), scale,
                      has_mask (the scan has a label map and the disc has slices: source not none), second_sample
                      (Parquet; a CSV copy beside it)
    --out-assignment  one row per axial slice: scan_id, study_id, series, block, slice (in its block), level ("" for
                      none), distance_mm and angle_deg (to that disc, or to the nearest), disc_row (-1 when none),
                      central (one of the three used) (Parquet; a CSV copy beside it)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from stages.anatomy.axial import (
    ASSIGNMENT_COLUMNS,
    INDEX_COLUMNS,
    AxialConfig,
    assign_slices,
    central_three,
    cut_mask,
    cut_slice,
    match_intensity,
    resliced_mask,
    slice_planes,
)
from stages.archive.manifest import scan_file, write_table
from stages.core import cli, levels

log = logging.getLogger("axial_slices")

OUTPUTS = {
    "slices": "Three axial slices per disc row, float16 (n_discs, 3, Ha, Wa).",
    "masks": "The disc's label on those slices, uint8 (n_discs, 3, Ha, Wa) (zeros without a label map).",
    "second_sample": "Slices 2-4 of each disc with 4 native slices (its second sample), float16 (n_discs, 3, Ha, Wa); "
                     "zeros for every other disc.",
    "index": "One row per disc row: its source (native | resliced | none) (Parquet; a CSV copy beside it).",
    "assignment": "One row per axial slice: its disc level or none (Parquet; a CSV copy beside it).",
}


def _vec(row: pd.Series, name: str) -> np.ndarray:
    return np.array([row[f"{name}_x"], row[f"{name}_y"], row[f"{name}_z"]], dtype=float)


def disc_indicator(label: np.ndarray, level: str) -> np.ndarray:
    """The disc ``level``'s voxels in a label map array: 1.0 inside, 0.0 outside (float32, to interpolate)."""
    return (label == levels.DISC_LABELS[level]).astype(np.float32)


def scan_slices(scan_id: str, volumes: pd.DataFrame, folder: Path, discs: pd.DataFrame, rows: dict[str, int],
                resliced: dict[str, np.ndarray], cfg: AxialConfig, size: tuple[int, int], width_fraction: float,
                label: tuple[np.ndarray, sitk.Image] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """The assignment rows of one scan's second-series slices (``volumes``: its rows of second_series.parquet, in
    ``folder``), and per disc level with native slices (``discs``: the scan's discs in the localisation; ``rows``:
    level -> disc row; ``resliced``: level -> the normalised resliced stack of the discs extraction did not flag)
    the three slices, their scale and where they came from, and with the scan's ``label`` map (its array and image)
    the disc's masks on them."""
    blocks = []
    assignment: list[dict] = []
    for entry in volumes.itertuples():
        image = sitk.ReadImage(str(scan_file(folder, entry.volume)), sitk.sitkFloat32)
        array = sitk.GetArrayFromImage(image)
        planes = slice_planes(image)
        assigned = assign_slices(planes, discs, cfg)
        blocks.append((entry, image, array, planes))
        for k, hit in enumerate(assigned.itertuples()):
            assignment.append({"scan_id": scan_id, "study_id": entry.study_id, "series": entry.series,
                               "block": int(entry.block), "slice": k, "level": hit.level,
                               "distance_mm": hit.distance_mm, "angle_deg": hit.angle_deg,
                               "disc_row": rows.get(hit.level, -1) if hit.level else -1, "central": False,
                               "_block": len(blocks) - 1})
    native: dict[str, dict] = {}
    by_level = discs.set_index("level")
    for level in {a["level"] for a in assignment if a["level"]}:
        disc = by_level.loc[level]
        centre, axis, ap = disc[["x", "y", "z"]].to_numpy(float), _vec(disc, "axis"), _vec(disc, "ap")
        mine = [a for a in assignment if a["level"] == level]
        mine.sort(key=lambda a: float((blocks[a["_block"]][3][a["slice"]].centre - centre) @ axis))
        for a in mine:
            a["n"] = len(mine)
        if len(mine) < 3 or level not in resliced:
            continue
        used = mine[central_three(len(mine))]
        step = float(disc["depth_mm"]) / (width_fraction * size[1])
        stack = np.stack([cut_slice(blocks[a["_block"]][2], blocks[a["_block"]][1], a["slice"], centre, axis, ap,
                                    size, step) for a in used])
        scale = match_intensity(stack, resliced[level].astype(np.float32))
        if not np.isfinite(scale):
            continue
        with np.errstate(over="ignore"):
            scaled = (stack * scale).astype(np.float16)
        if not np.isfinite(scaled).all():
            continue
        for a in used:
            a["central"] = True
        native[level] = {"slices": scaled, "scale": scale, "n_slices": len(mine), "series": used[0]["series"],
                         "used": ";".join(f"{a['block']}:{a['slice']}" for a in used)}
        if len(mine) == 4:   # Hou et al.: 4 slices give two samples, slices 1-3 (the central three) and 2-4
            other = np.stack([cut_slice(blocks[a["_block"]][2], blocks[a["_block"]][1], a["slice"], centre, axis, ap,
                                        size, step) for a in mine[1:]])
            with np.errstate(over="ignore"):
                second = (other * scale).astype(np.float16)   # the first sample's scale: one disc, one series
            if np.isfinite(second).all():
                native[level]["second"] = second
        if label is not None:
            indicator = disc_indicator(label[0], level)
            native[level]["masks"] = np.stack([cut_mask(indicator, label[1], blocks[a["_block"]][1], a["slice"],
                                                        centre, axis, ap, size, step) for a in used])
    for a in assignment:
        a.pop("_block")
        a.pop("n", None)
    return assignment, native


def label_maps(manifest_file: Path) -> dict[str, Path]:
    """scan_id -> its label map (the file the manifest names, relative to the manifest's folder), for the scans that
    have one."""
    manifest = pd.read_parquet(manifest_file)
    return {s: manifest_file.parent / f for s, f in zip(manifest.scan_id, manifest.label_map.fillna("")) if f}


def axial_slices(index_file: Path, axial_file: Path, structures_file: Path, second_file: Path | None,
                 second_folder: Path | None, manifest_file: Path, out: dict[str, Path], cfg: AxialConfig,
                 width_fraction: float, spacing_mm: float) -> pd.DataFrame:
    """Run the stage (module docstring; ``out``: slices, masks, index and assignment, as OUTPUTS names them;
    ``spacing_mm``: extract.axial_spacing_mm); return the index."""
    if not 0 < width_fraction <= 1:
        raise ValueError(f"width_fraction must be in (0, 1], got {width_fraction}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm (extract.axial_spacing_mm) must be > 0, got {spacing_mm}")
    index = pd.read_parquet(index_file)
    discs = index[index.array == "discs"].sort_values("row").reset_index(drop=True)
    axial = np.load(axial_file, mmap_mode="r")
    if len(discs) != axial.shape[0] or (len(discs) and not (discs.row.to_numpy() == np.arange(len(discs))).all()):
        raise ValueError(f"{index_file} has {len(discs)} disc rows (numbered {discs.row.min() if len(discs) else '-'}"
                         f" on), {axial_file} {axial.shape[0]}: they must match, rows 0 to n-1")
    structures = pd.read_parquet(structures_file)
    structures = structures[(structures.kind == "disc") & structures.level.isin(levels.DISCS)]
    seconds = pd.read_parquet(second_file) if second_file is not None else pd.DataFrame(columns=["scan_id"])
    labels = label_maps(manifest_file)
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    size = (int(axial.shape[2]), int(axial.shape[3])) if axial.ndim == 4 else (0, 0)
    slices = np.lib.format.open_memmap(out["slices"], "w+", np.float16, axial.shape)
    masks = np.lib.format.open_memmap(out["masks"], "w+", np.uint8, axial.shape)
    second = np.lib.format.open_memmap(out["second_sample"], "w+", np.float16, axial.shape)
    flags = discs["flag"].fillna("") if "flag" in discs else pd.Series("", index=discs.index)
    rows_out = [{"row": int(d.row), "scan_id": d.scan_id, "level": d.level,
                 "source": "resliced" if flags.iloc[i] == "" else "none", "n_slices": 0, "series": "", "slices": "",
                 "scale": float("nan"), "has_mask": False, "second_sample": False}
                for i, d in enumerate(discs.itertuples())]
    slices[:] = axial
    masks[:] = 0
    second[:] = 0
    assignment: list[dict] = []
    scans = sorted(set(discs.scan_id) & set(seconds.scan_id))
    for scan_id in tqdm(sorted(set(discs.scan_id)), desc="scans", mininterval=5):
        mine = discs[discs.scan_id == scan_id]
        rows = dict(zip(mine.level, mine.row.astype(int)))
        scan_discs = structures[structures.scan_id == scan_id].drop_duplicates("level")
        label = None
        if scan_id in labels:
            image = sitk.ReadImage(str(labels[scan_id]))
            label = (sitk.GetArrayFromImage(image), image)
        native: dict[str, dict] = {}
        if scan_id in scans:
            resliced = {d.level: np.asarray(axial[int(d.row)]) for d in mine.itertuples() if flags.loc[d.Index] == ""}
            found, native = scan_slices(scan_id, seconds[seconds.scan_id == scan_id].sort_values("block"),
                                        second_folder, scan_discs, rows, resliced, cfg, size, width_fraction, label)
            assignment += found
            counts = pd.Series([a["level"] for a in found if a["level"]]).value_counts().to_dict() if found else {}
            for level, row in rows.items():
                rows_out[row]["n_slices"] = int(counts.get(level, 0))
        by_level = scan_discs.set_index("level")
        for level, row in rows.items():
            if level in native:
                slices[row] = native[level]["slices"]
                rows_out[row].update(source="native", series=native[level]["series"], slices=native[level]["used"],
                                     scale=native[level]["scale"], second_sample="second" in native[level])
                if "second" in native[level]:
                    second[row] = native[level]["second"]
            if label is None or rows_out[row]["source"] == "none":
                continue
            if level in native:
                masks[row] = native[level]["masks"]
            elif level in by_level.index:
                masks[row] = resliced_mask(disc_indicator(label[0], level), label[1],
                                           next(by_level.loc[[level]].itertuples()), size, spacing_mm, width_fraction)
            else:
                raise ValueError(f"{scan_id}: no disc {level} in {structures_file} (localise), though extraction "
                                 "cut its slices")
            rows_out[row]["has_mask"] = True
    slices.flush()
    masks.flush()
    second.flush()
    table = pd.DataFrame(rows_out, columns=INDEX_COLUMNS)
    write_table(table, out["index"])
    write_table(pd.DataFrame(assignment, columns=ASSIGNMENT_COLUMNS), out["assignment"])
    counts = table.source.value_counts().to_dict()
    log.info("%d disc rows: %d native (%d with a second sample), %d resliced, %d none; %d axial slices of %d scans, "
             "%d assigned to a disc", len(table), counts.get("native", 0), int(table.second_sample.sum()),
             counts.get("resliced", 0), counts.get("none", 0), len(assignment), len(scans),
             sum(1 for a in assignment if a["level"]))
    log.info("disc masks of %d disc rows (%d scans with a label map); the disc covers %.3f of their slices",
             int(table.has_mask.sum()), len(set(discs.scan_id) & set(labels)),
             float(masks[table.has_mask.to_numpy(bool)].mean()) if table.has_mask.any() else float("nan"))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.axial_slices", description=__doc__.split("\n\n")[0])
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--index", type=cli.existing_file, required=True, help="index.parquet of the extract stage.")
    inputs.add_argument("--axial", type=cli.existing_file, required=True,
                        help="axial.npy of the extract stage (the resliced stacks: size, fallback, intensity).")
    inputs.add_argument("--structures", type=cli.existing_file, required=True,
                        help="structures.parquet of the localise stage (disc centres, axes, depths).")
    inputs.add_argument("--second-series", type=cli.existing_file, default=None,
                        help="second_series.parquet of the ingest stage (omit: no axial series, all resliced).")
    inputs.add_argument("--second-volumes", type=cli.existing_folder, default=None,
                        help="The ingest stage's folder of second-series volumes (with --second-series).")
    inputs.add_argument("--manifest", type=cli.existing_file, required=True,
                        help="manifest.parquet of the ingest stage (the label maps it names are read, relative to it).")
    parser.add_argument("--width-fraction", type=float, default=0.5,
                        help="extract.width_fraction: the disc's AP depth spans this share of the width (default 0.5).")
    parser.add_argument("--axial-spacing-mm", type=float, default=2.0,
                        help="extract.axial_spacing_mm: the resliced slices' spacing, to reslice the label map as "
                             "extraction resliced the image (default 2).")
    cli.add_section_options(parser, "axial")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.second_series is None) != (args.second_volumes is None):
        parser.error("--second-series and --second-volumes go together")
    if not 0 < args.width_fraction <= 1:
        parser.error(f"--width-fraction must be in (0, 1], got {args.width_fraction}")
    if not args.axial_spacing_mm > 0:
        parser.error(f"--axial-spacing-mm must be > 0, got {args.axial_spacing_mm}")
    cfg = AxialConfig.from_config(cli.section_from_args(args, "axial", parser))
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    cli.setup_logging(args.log, "axial_slices")
    axial_slices(args.index, args.axial, args.structures, args.second_series, args.second_volumes, args.manifest, out,
                 cfg, args.width_fraction, args.axial_spacing_mm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
