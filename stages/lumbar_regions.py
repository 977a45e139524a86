"""Stage lumbar_regions: each scan's lumbar region (T12 to S1) on an isotropic grid, for MLSSCL's clips (Cao et al.
2022; stages/anatomy/regions.py says how the box is placed and how the scan is resampled).

Reads the scans the splits stage placed (one row per scan of ``--splits-volumes``, results/splits/volumes.parquet:
localisation-flagged scans are not there, see results/localise/flags.csv), their volumes and localised structures.

Run:
    python -m stages.lumbar_regions --manifest results/ingest/manifest.parquet --volumes results/ingest/volumes \\
        --structures results/localise/structures.parquet --splits-volumes results/splits/volumes.parquet \\
        --labels results/ingest/labels --out-array results/regions/regions.npy \\
        --out-labels results/regions/labels.npy --out-table results/regions/regions.parquet \\
        --out-flags results/regions/flags.csv --threads 2

Writes ``--out-array``, float16 ``(N, SI, AP, LR)`` (a memory map, filled scan by scan), with ``--labels`` (ingest's
label maps) ``--out-labels``, each region's label map on the same grid (uint8, nearest voxel; zeros for a scan
without one, ``has_labels`` False), ``--out-table`` (Parquet, a
CSV copy beside it): one row per region in the splits' volumes format (``row``, ``kind`` = region, ``level`` =
T12-S1, the scan, subject, study, family, self-supervision and downstream parts, the bodies that span it), which
pretraining's array store reads as it reads the vertebral bodies, and ``--out-flags``: every placed scan without a
region, and why (fewer than two bodies localised; no intensity to scale by). Every scan of the splits is in one of
the two.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from stages.anatomy.regions import RegionConfig, lumbar_region, region_labels
from stages.archive.manifest import add_ingest_inputs, scan_file, write_table
from stages.core import cli
from stages.core.levels import REGION_LEVEL
from stages.core.pool import worker_pool

log = logging.getLogger("lumbar_regions")

SCAN_COLUMNS = ["scan_id", "subject_id", "study_id", "days_since_first_study", "family_id", "ssl_part",
                "downstream_part"]
TABLE_COLUMNS = ["array", "row", *SCAN_COLUMNS[:4], "kind", "level", *SCAN_COLUMNS[4:], "top", "bottom",
                 "spacing_mm", "has_labels"]
OUTPUTS = {
    "array": "Lumbar regions, float16 (N, SI, AP, LR), isotropic.",
    "labels": "Their label maps on the same grids, uint8 (N, SI, AP, LR), VerSe labels; zeros without one.",
    "table": "One row per region, in the splits' volumes format (Parquet; a CSV copy beside it).",
    "flags": "The scans without a region, and why (CSV).",
}


def region_job(job: tuple[Path, Path | None, pd.DataFrame, RegionConfig]) -> tuple[np.ndarray, np.ndarray | None,
                                                                                    dict[str, Any], str]:
    """One scan's region, its label map on the same grid (None without one), where it spans, and its flag."""
    path, label_path, structures, cfg = job
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    region, frame, flag = lumbar_region(sitk.GetArrayFromImage(image), image, structures, cfg)
    span = {"top": frame.top, "bottom": frame.bottom} if frame is not None else {"top": "", "bottom": ""}
    labels = region_labels(sitk.ReadImage(str(label_path)), frame, cfg) if label_path and frame else None
    return region, labels, span, flag


def label_file(labels: Path | None, entry: Any) -> Path | None:
    """The label map a manifest entry names in ingest's label folder, or None (no folder, no map)."""
    if labels is None or not isinstance(entry, str) or not entry:
        return None
    return scan_file(labels, entry)


def placed_scans(splits_volumes: pd.DataFrame) -> pd.DataFrame:
    """One row per scan of the splits' volumes table, with its subject, study, family and parts, by scan id."""
    missing = sorted(set(SCAN_COLUMNS) - set(splits_volumes.columns))
    if missing:
        raise ValueError(f"the splits' volumes table lacks columns {missing}: is it results/splits/volumes.parquet?")
    scans = splits_volumes[SCAN_COLUMNS].drop_duplicates("scan_id")
    return scans.sort_values("scan_id").reset_index(drop=True)


def lumbar_regions(manifest_file: Path, volumes: Path, structures_file: Path, splits_volumes: Path, array: Path,
                   table_file: Path, flags_file: Path, cfg: RegionConfig, workers: int = 1, labels: Path | None = None,
                   labels_array: Path | None = None) -> pd.DataFrame:
    """Write the regions of the scans of ``splits_volumes`` (see the module's docstring), and with ``labels``
    (ingest's label folder) and ``labels_array`` their label maps on the same grids; returns the table."""
    scans = placed_scans(pd.read_parquet(splits_volumes))
    manifest = pd.read_parquet(manifest_file).set_index("scan_id")
    unknown = sorted(set(scans.scan_id) - set(manifest.index))
    if unknown:
        raise ValueError(f"{len(unknown)} scan(s) of the splits are not in {manifest_file} (first: {unknown[:3]}): "
                         "the splits and the ingest are from different runs")
    structures = pd.read_parquet(structures_file)
    by_scan = dict(tuple(structures.groupby("scan_id")))
    empty = structures.iloc[:0]
    array.parent.mkdir(parents=True, exist_ok=True)
    outputs = {array: np.float16, **({labels_array: np.uint8} if labels_array is not None else {})}
    out = {path: np.lib.format.open_memmap(path, "w+", dtype, (len(scans), *cfg.shape))
           for path, dtype in outputs.items()}
    label_maps = manifest.label_map if "label_map" in manifest else pd.Series("", index=manifest.index)
    jobs = ((scan_file(volumes, manifest.loc[s, "volume"]),
             label_file(labels if labels_array is not None else None, label_maps.get(s)), by_scan.get(s, empty), cfg)
            for s in scans.scan_id)
    rows, flags = [], []
    with worker_pool(workers) as pool:
        for scan, (region, label, span, flag) in tqdm(zip(scans.itertuples(index=False), pool.map(region_job, jobs)),
                                                      total=len(scans), desc="scans", mininterval=5):
            if flag:
                flags.append({"scan_id": scan.scan_id, "reason": flag})
                continue
            out[array][len(rows)] = region
            if labels_array is not None:
                out[labels_array][len(rows)] = label if label is not None else 0
            rows.append({"array": "regions", "row": len(rows), **scan._asdict(), "kind": "region",
                         "level": REGION_LEVEL, **span, "spacing_mm": cfg.spacing_mm,
                         "has_labels": label is not None and bool(label.any())})
    for path, memmap in out.items():
        memmap.flush()
    del out, memmap
    if len(rows) < len(scans):   # the flagged scans' slots were never written: the arrays hold the regions only
        for path in outputs:
            np.save(path, np.load(path, mmap_mode="r")[:len(rows)].copy())
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    write_table(table, table_file)
    flags_file.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(flags, columns=["scan_id", "reason"]).to_csv(flags_file, index=False)
    log.info("%d scans: %d lumbar regions of %s voxels at %.2f mm, %d without one (%s)", len(scans), len(table),
             "x".join(map(str, cfg.shape)), cfg.spacing_mm, len(flags), flags_file)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.lumbar_regions", description=__doc__.split("\n\n")[0])
    add_ingest_inputs(parser, "manifest", "volumes")
    add_ingest_inputs(parser, "labels", required=False)
    parser.add_argument("--structures", type=cli.existing_file, required=True,
                        help="structures.parquet of the localise stage.")
    parser.add_argument("--splits-volumes", type=cli.existing_file, required=True,
                        help="volumes.parquet of the splits stage (the scans, their subjects and parts).")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (default: 1).")
    cli.add_section_options(parser, "regions")
    cli.add_output_options(parser, {k: v for k, v in OUTPUTS.items() if k != "labels"})
    cli.add_output_options(parser, {"labels": OUTPUTS["labels"] + " With --labels."}, required=False,
                           title="optional outputs")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = RegionConfig.from_config(cli.section_from_args(args, "regions", parser))
    out = {**cli.outputs_from_args(args, parser, {k: v for k, v in OUTPUTS.items() if k != "labels"}),
           "labels": args.out_labels}
    cli.setup_logging(args.log, "lumbar_regions")
    if (args.labels is None) != (args.out_labels is None):
        parser.error("--labels (ingest's label maps) and --out-labels (their regions) go together")
    lumbar_regions(args.manifest, args.volumes, args.structures, args.splits_volumes, out["array"], out["table"],
                   out["flags"], cfg, args.threads, args.labels, out["labels"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
