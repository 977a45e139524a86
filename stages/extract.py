"""Stage extract: cut the small volumes every later stage trains on (Jamaludin et al. 2017, section 2.1).

For each scan that localisation did not flag: 7 vertebral-body volumes (T12 to S1) and 6 disc volumes (T12-L1 to
L5-S1), or those of them its structures hold (a SPIDER mask has no S1: no S1 body volume, the rest as usual), each
H x W x S (height x width x slices; the paper: 224 x 224 x 9 for a body, 112 x 224 x 9 for a disc), centred on the
structure's own middle slice (so scoliosis does not misalign them), slices zero-padded where the scan has too few,
the in-plane crop rotated to the local axis of the spine (rows run down the spine, columns from anterior to
posterior) and rescaled so that the structure's antero-posterior width spans ``width_fraction`` of the crop width.
Intensities are divided so that the median intensity of the vertebral bodies above and below is 0.5 (the one there is
when the other is missing: L5 alone for L5-S1 without S1). For the Hou et al. 2023 path, each disc also gets 3 slices
through its centre resliced perpendicular to the spine (axial).

Run (one job; the workflow runs one per shard, ``--shard I --scans-per-shard P --out SHARD_DIR``, then
``--merge SHARD_DIR ...`` with the --out-* files):
    python -m stages.extract --manifest results/ingest/manifest.parquet --volumes results/ingest/volumes \\
        --structures results/localise/structures.parquet --flags results/localise/flags.csv --threads 2 \\
        --out-vertebrae results/extract/vertebrae.npy --out-discs results/extract/discs.npy \\
        --out-axial results/extract/axial.npy --out-index results/extract/index.parquet

Writes ``--out-vertebrae`` (N, S, H, W), ``--out-discs`` (N, S, Hd, W), ``--out-axial`` (N, 3, Ha, Wa), float16
arrays written slot by slot through memory maps (the cohort is never held in memory), and ``--out-index`` (Parquet,
a CSV copy beside it): one row per extracted volume (array, row, scan, subject, study, days since first study, kind,
level, centre, source of the localisation, pixel size, normalisation factor, flag). A volume whose intensities cannot
be normalised (no vertebral body found around it: no reference intensity) is flagged there with the reason, its
factor NaN and its slot left as zeros, never NaN; the splits stage leaves flagged volumes out.
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

from stages.anatomy.crops import (
    ARRAYS,
    EXTRACT_OUTPUTS,
    INDEX_COLUMNS,
    ExtractConfig,
    ExtractOutputs,
    axial_stack,
    body_medians,
    crop,
    neighbour_reference,
    normalise,
)
from stages.archive.manifest import add_ingest_inputs, scan_file, write_table
from stages.core import cli, levels
from stages.core.pool import worker_pool
from stages.core.shards import (
    add_shard_options,
    concat_arrays,
    count_from_manifest,
    shard_block,
    shard_from_args,
)

log = logging.getLogger("extract")


def extract_scan(job: tuple[Path, pd.DataFrame, ExtractConfig]) -> dict[str, Any]:
    """The crops of one scan's structures, top to bottom, normalised (a crop that cannot be: zeros, and the reason in
    its row's ``flag``); a level its structures lack has none."""
    volume_path, structures, cfg = job
    image = sitk.ReadImage(str(volume_path), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(image)
    medians = body_medians(volume, image, structures)
    out: dict[str, Any] = {"vertebrae": [], "discs": [], "axial": [], "rows": []}
    for kind, names, size, key in (("vertebra", levels.VERTEBRAE, cfg.vertebra_size, "vertebrae"),
                                   ("disc", levels.DISCS, cfg.disc_size, "discs")):
        table = structures[structures.kind == kind].set_index("level")
        for name in (n for n in names if n in table.index):
            row = next(table.loc[[name]].itertuples())
            array, step = crop(volume, image, row, size, cfg.width_fraction)
            crops = [array]
            if kind == "disc":
                crops.append(axial_stack(volume, image, row, cfg.axial_size, cfg.axial_spacing_mm, cfg.width_fraction))
            crops, scale, flag = normalise(crops, neighbour_reference(name, kind, medians))
            out[key].append(crops[0])
            out["axial"] += crops[1:]
            out["rows"].append({"kind": kind, "level": name, "x": row.x, "y": row.y, "z": row.z,
                                "step_mm": step, "scale": scale, "flag": flag})
    return out


def extract(manifest_file: Path, volumes: Path, structures_file: Path, flags_file: Path, out: ExtractOutputs,
            cfg: ExtractConfig, workers: int = 1, shard: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """Extract the unflagged scans (``flags_file``) of shard ``shard`` = (i, n) of the manifest sorted by scan id (all
    by default), from their volumes in the folder ``volumes`` and their structures (``structures_file``)."""
    manifest = pd.read_parquet(manifest_file).sort_values("scan_id")
    manifest = manifest.iloc[shard_block(len(manifest), *shard)]
    structures = pd.read_parquet(structures_file)
    flags = pd.read_csv(flags_file)
    usable = manifest[~manifest.scan_id.isin(flags.scan_id)].sort_values("scan_id").reset_index(drop=True)
    log.info("%d scans%s, %d flagged by localisation and skipped, %d to extract", len(manifest),
             f" (shard {shard[0]} of {shard[1]})" if shard[1] > 1 else "", len(manifest) - len(usable), len(usable))
    for path in (out.vertebrae, out.discs, out.axial, out.index):
        path.parent.mkdir(parents=True, exist_ok=True)
    n = len(usable)
    n_bodies, n_discs = structure_counts(structures[structures.scan_id.isin(usable.scan_id)])
    (h, w, s), (hd, wd, sd), (ha, wa) = cfg.vertebra_size, cfg.disc_size, cfg.axial_size
    shapes = {"vertebrae": (n_bodies, s, h, w), "discs": (n_discs, sd, hd, wd), "axial": (n_discs, 3, ha, wa)}
    if n == 0:  # nothing usable: empty arrays and index, said in the log (and in the localise flags)
        for name, shape in shapes.items():
            np.save(getattr(out, name), np.zeros(shape, np.float16))
        empty = pd.DataFrame(columns=INDEX_COLUMNS)
        write_table(empty, out.index)
        log.warning("no scan to extract: every scan was flagged by localisation (see its flags.csv)")
        return empty
    arrays = {name: np.lib.format.open_memmap(getattr(out, name), "w+", np.float16, shape)
              for name, shape in shapes.items()}
    jobs = ((scan_file(volumes, scan.volume), structures[structures.scan_id == scan.scan_id], cfg) for scan in usable.itertuples())
    index = []
    slots = {"vertebrae": 0, "discs": 0}  # the next free slot of each array: scan after scan, top to bottom
    with worker_pool(workers) as pool:
        for scan, result in tqdm(zip(usable.itertuples(), pool.map(extract_scan, jobs)), total=n, desc="scans",
                                 mininterval=5):
            source = structures.loc[structures.scan_id == scan.scan_id, "source"].iloc[0]
            counters = {"vertebra": 0, "disc": 0}
            for row in result["rows"]:
                j = counters[row["kind"]]
                counters[row["kind"]] += 1
                array = "vertebrae" if row["kind"] == "vertebra" else "discs"
                slot = slots[array]
                slots[array] += 1
                arrays[array][slot] = result[array][j]
                if row["kind"] == "disc":
                    arrays["axial"][slot] = result["axial"][j]
                index.append({"array": array, "row": slot, "scan_id": scan.scan_id, "subject_id": scan.subject_id,
                              "study_id": scan.study_id, "days_since_first_study": scan.days_since_first_study,
                              "source": source, **row})
    for array in arrays.values():
        array.flush()
    table = pd.DataFrame(index, columns=INDEX_COLUMNS)
    write_table(table, out.index)
    log.info("extracted %d vertebral bodies and %d discs from %d scans", (table.kind == "vertebra").sum(),
             (table.kind == "disc").sum(), n)
    log_flagged(table)
    return table


def structure_counts(structures: pd.DataFrame) -> tuple[int, int]:
    """How many vertebral bodies and discs (of the workflow's levels, one per scan and level) ``structures`` holds:
    the rows of the arrays :func:`extract_scan` fills for them (7 and 6 per scan when no level is missing)."""
    unique = structures.drop_duplicates(["scan_id", "kind", "level"])
    return (int(((unique.kind == "vertebra") & unique.level.isin(levels.VERTEBRAE)).sum()),
            int(((unique.kind == "disc") & unique.level.isin(levels.DISCS)).sum()))


def log_flagged(index: pd.DataFrame) -> None:
    """Warn about the volumes the index flags (zeros in the arrays, left out by the splits stage), per reason."""
    flags = index["flag"] if "flag" in index else pd.Series("", index=index.index)
    flagged = index[flags.fillna("") != ""]
    for reason, group in flagged.groupby("flag"):
        log.warning("%d volume(s) of %d scan(s) flagged and left as zeros: %s (e.g. %s %s)", len(group),
                    group.scan_id.nunique(), reason, group.scan_id.iloc[0], group.level.iloc[0])


def merge(shards: list[Path], out: ExtractOutputs) -> pd.DataFrame:
    """The shards' array stores and indexes (folders of ``--shard`` runs), in shard order, as one run over the whole
    cohort would write them (arrays copied through memory maps, a chunk at a time)."""
    parts = [ExtractOutputs.in_folder(s) for s in shards]
    for path in (out.vertebrae, out.discs, out.axial, out.index):
        path.parent.mkdir(parents=True, exist_ok=True)
    offsets = {name: concat_arrays([getattr(part, name) for part in parts], getattr(out, name)) for name in ARRAYS}
    tables = []
    for i, part in enumerate(parts):
        table = pd.read_parquet(part.index)
        if len(table):
            table["row"] = table.row + table.array.map({"vertebrae": offsets["vertebrae"][i],
                                                        "discs": offsets["discs"][i]})
            tables.append(table)
    index = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=INDEX_COLUMNS)
    write_table(index, out.index)
    log.info("merged %d shards: %d vertebral bodies and %d discs", len(shards), (index.kind == "vertebra").sum(),
             (index.kind == "disc").sum())
    log_flagged(index)
    if index.empty:
        log.warning("no scan to extract: every scan was flagged by localisation (see its flags.csv)")
    return index


INPUTS = ("manifest", "volumes", "structures", "flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.extract", description=__doc__.split("\n\n")[0])
    inputs = parser.add_argument_group("inputs (required but with --merge)")
    add_ingest_inputs(inputs, "manifest", "volumes", required=False)
    inputs.add_argument("--structures", type=cli.existing_file, default=None,
                        help="structures.parquet of the localise stage.")
    inputs.add_argument("--flags", type=cli.existing_file, default=None,
                        help="flags.csv of the localise stage (flagged scans are skipped).")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (default: 1).")
    add_shard_options(parser, "the scans sorted by id")
    cli.add_section_options(parser, "extract")
    cli.add_output_options(parser, EXTRACT_OUTPUTS, required=False, title="outputs (but with --shard)")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name in INPUTS if getattr(args, name) is None]
    if missing and not args.merge:
        parser.error(f"--{missing[0]} is required (but with --merge)")
    shard = shard_from_args(args, parser, count_from_manifest(args.manifest, args.scans_per_shard))
    cfg = ExtractConfig.from_config(cli.section_from_args(args, "extract", parser))
    out = ExtractOutputs.in_folder(args.out) if shard else ExtractOutputs(
        **cli.outputs_from_args(args, parser, EXTRACT_OUTPUTS))
    cli.setup_logging(args.log, "extract")
    if args.merge:
        merge(args.merge, out)
    else:
        extract(args.manifest, args.volumes, args.structures, args.flags, out, cfg, args.threads, shard or (0, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
