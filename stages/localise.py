"""Stage localise: the vertebral bodies T12-S1 and discs T12-L1 to L5-S1 of every scan, by level.

A scan with a label map is localised from it (centre, spine axis, height, depth, width per level). A scan without
one, or whose subject's label maps are withheld (``localise.withhold_label_fraction``, so that the demo runs both
paths), is localised by the learned localiser (``stages.anatomy.localiser``); on withheld scans its result is compared with
the label map: centre error in mm (mean, 95th percentile) and level-labelling accuracy. A scan without a usable label
map that has rows in ingest's landmark table (``landmarks.parquet``, a user's table of level centres) is localised
from them instead of by the learned localiser (stages.anatomy.landmarks), and compared with its label map likewise when that
is withheld. Scans where localisation fails or is doubtful (missing levels, a transitional vertebra, levels out of
order, implausible spacing) are listed in ``flags.csv`` with the reason, and later stages skip them.

Run:
    python -m stages.localise --ingest results/ingest --model results/localise/model/localiser.pt \\
        --out results/localise --threads 2

Writes ``structures.parquet`` / ``.csv`` (one row per scan and structure; see stages.anatomy.spine_structures),
``flags.csv`` (scan_id, source, reason), ``evaluation.csv`` (per withheld structure: error, level correct, source:
learned or landmarks) and ``evaluation.json`` (the summary figures, with the number of scans from each source).
"""

from __future__ import annotations

import argparse
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from stages.anatomy.landmarks import structures_from_landmarks
from stages.anatomy.localiser import (
    HeatmapUNet,
    LocaliseConfig,
    compare,
    predict_heatmaps,
    structures_from_heatmaps,
    withheld_subjects,
)
from stages.anatomy.spine_structures import COLUMNS, check_structures, slice_normal, structures_from_label_map
from stages.core import cli
from stages.core.shards import concat_tables, resolve_shard, shard_block

log = logging.getLogger("localise")


def load_model(path: Path) -> tuple[HeatmapUNet | None, LocaliseConfig]:
    """The localiser saved by stages.localiser_train; None when it could not be trained (no label maps)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    cfg = LocaliseConfig(**saved["config"])
    if saved["state_dict"] is None:
        return None, cfg
    model = HeatmapUNet(cfg.width)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), cfg


def localise_scan(job: tuple[Path, dict[str, Any], bool, Path | None, pd.DataFrame | None]) -> dict[str, Any]:
    """Structures, problems and (for withheld scans) the comparison with the label map, for one scan: from its label
    map (when ``use_label``), else from its landmarks (rows of ingest's landmarks.parquet, or None), else by the
    learned localiser."""
    ingest, scan, use_label, model_path, marks = job
    torch.set_num_threads(1)
    result: dict[str, Any] = {"scan_id": scan["scan_id"], "evaluation": None}
    label_path = ingest / scan["label_map"] if scan["label_map"] else None
    if use_label:
        label = sitk.ReadImage(str(label_path))
        table = structures_from_label_map(label)
        result.update(source="label_map", structures=table,
                      problems=check_structures(table, set(np.unique(sitk.GetArrayViewFromImage(label)))))
        return result
    if marks is not None and len(marks):
        image = sitk.ReadImage(str(ingest / scan["volume"]), sitk.sitkFloat32)
        table = structures_from_landmarks(image, marks)
        result.update(source="landmarks", structures=table, problems=check_structures(table))
        if label_path is not None:
            result["evaluation"] = compare(table, structures_from_label_map(sitk.ReadImage(str(label_path))),
                                           slice_normal(image))
        return result
    model, cfg = load_model(model_path) if model_path is not None else (None, None)
    if model is None:
        why = "no label map and no learned localiser" if model_path is None else \
            "no label map, and the localiser is untrained (no scan had a label map to train it on)"
        result.update(source="learned", structures=None, problems=[why])
        return result
    image = sitk.ReadImage(str(ingest / scan["volume"]), sitk.sitkFloat32)
    heat = predict_heatmaps(model, sitk.GetArrayFromImage(image), cfg.image_size)
    table, problems = structures_from_heatmaps(heat, image, cfg.peak_threshold)
    problems += check_structures(table) if len(table) else []
    result.update(source="learned", structures=table, problems=problems)
    if label_path is not None:
        result["evaluation"] = compare(table, structures_from_label_map(sitk.ReadImage(str(label_path))),
                                       slice_normal(image))
    return result


def summarise(evaluation: pd.DataFrame) -> dict[str, Any]:
    if evaluation.empty:
        return {"scans": 0}
    found = evaluation.error_mm.dropna()
    return {"scans": int(evaluation.scan_id.nunique()), "structures": len(evaluation),
            "detected_fraction": float(len(found) / len(evaluation)),
            "mean_error_mm": float(found.mean()) if len(found) else None,
            "p95_error_mm": float(np.percentile(found, 95)) if len(found) else None,
            "mean_in_plane_error_mm": float(evaluation.in_plane_error_mm.dropna().mean()) if len(found) else None,
            "level_accuracy": float(evaluation.level_correct.mean()),
            "by_kind": {k: {"mean_error_mm": float(g.error_mm.mean()), "level_accuracy": float(g.level_correct.mean())}
                        for k, g in evaluation.groupby("kind")}}


def read_landmarks(ingest: Path) -> dict[str, pd.DataFrame]:
    """Ingest's landmark table (landmarks.parquet; absent from older ingest outputs) by scan id."""
    path = ingest / "landmarks.parquet"
    if not path.is_file():
        return {}
    return {scan_id: rows.reset_index(drop=True) for scan_id, rows in pd.read_parquet(path).groupby("scan_id")}


def run(ingest: Path, out: Path, cfg: LocaliseConfig, model_path: Path | None, workers: int,
        shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Localise the scans of shard ``shard`` = (i, n) of the manifest sorted by scan id (all of them by default)."""
    manifest = pd.read_parquet(ingest / "manifest.parquet").sort_values("scan_id")
    manifest["label_map"] = manifest.label_map.fillna("")
    hidden = withheld_subjects(manifest.subject_id.tolist(), cfg.withhold_label_fraction, cfg.seed)
    manifest = manifest.iloc[shard_block(len(manifest), *shard)]
    marks = read_landmarks(ingest)
    jobs = [(ingest, scan, bool(scan["label_map"]) and scan["subject_id"] not in hidden, model_path,
             marks.get(scan["scan_id"])) for scan in manifest.to_dict("records")]
    from_landmarks = sum(not j[2] and j[4] is not None for j in jobs)
    structures, flags, evaluation = [], [], []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for scan, result in tqdm(zip(manifest.itertuples(), pool.map(localise_scan, jobs)), total=len(jobs),
                                 desc="scans", mininterval=5):
            if result["structures"] is not None and len(result["structures"]):
                structures.append(result["structures"].assign(scan_id=scan.scan_id, subject_id=scan.subject_id,
                                                              source=result["source"]))
            flags += [{"scan_id": scan.scan_id, "source": result["source"], "reason": p} for p in result["problems"]]
            if result["evaluation"] is not None:
                evaluation.append(result["evaluation"].assign(scan_id=scan.scan_id, source=result["source"]))
    front = ["scan_id", "subject_id", "source"]
    table = pd.concat(structures, ignore_index=True) if structures else pd.DataFrame(columns=front + COLUMNS)
    table = table[front + [c for c in table.columns if c not in front]]
    ev = pd.concat(evaluation, ignore_index=True) if evaluation else pd.DataFrame(columns=EVALUATION_COLUMNS)
    from_labels = int(sum(j[2] for j in jobs))
    counts = {"scans": len(manifest), "from_label_map": from_labels, "landmarks": int(from_landmarks),
              "learned": len(jobs) - from_labels - int(from_landmarks)}
    return write_outputs(out, table, pd.DataFrame(flags, columns=FLAG_COLUMNS), ev, counts)


EVALUATION_COLUMNS = ["scan_id", "kind", "level", "error_mm", "in_plane_error_mm", "level_correct", "source"]
FLAG_COLUMNS = ["scan_id", "source", "reason"]
COUNTS = ("scans", "from_label_map", "landmarks", "learned")


def write_outputs(out: Path, table: pd.DataFrame, flags: pd.DataFrame, ev: pd.DataFrame,
                  counts: dict[str, int]) -> dict[str, Any]:
    """structures.*, flags.csv, evaluation.csv and evaluation.json (the counts and the comparisons summarised)."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "structures.parquet", index=False)
    table.to_csv(out / "structures.csv", index=False)
    flags.to_csv(out / "flags.csv", index=False)
    ev.to_csv(out / "evaluation.csv", index=False)
    summary = {**counts, "flagged": int(flags.scan_id.nunique()),
               "learned_vs_withheld_labels": summarise(ev[ev.source == "learned"]),
               "landmarks_vs_withheld_labels": summarise(ev[ev.source == "landmarks"])}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(scans)d scans: %(from_label_map)d from label maps, %(landmarks)d from landmarks, %(learned)d by the "
             "learned localiser, %(flagged)d flagged", summary)
    for source in ("learned", "landmarks"):
        if summary[f"{source}_vs_withheld_labels"].get("scans"):
            log.info("%s on withheld scans: %s", "learned localiser" if source == "learned" else "landmarks",
                     json.dumps(summary[f"{source}_vs_withheld_labels"]))
    return summary


def merge(shards: list[Path], out: Path) -> dict[str, Any]:
    """The outputs of the shards' runs, in shard order, as one run over the whole cohort would write them."""
    table = concat_tables([s / "structures.parquet" for s in shards])
    flags = concat_tables([s / "flags.csv" for s in shards]).reindex(columns=FLAG_COLUMNS)
    ev = concat_tables([s / "evaluation.csv" for s in shards]).reindex(columns=EVALUATION_COLUMNS)
    parts = [json.loads((s / "evaluation.json").read_text()) for s in shards]
    counts = {name: int(sum(part[name] for part in parts)) for name in COUNTS}
    log.info("merged %d shards", len(shards))
    return write_outputs(out, table, flags, ev, counts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingest", type=Path, default=None, help="Output folder of the ingest stage (required "
                        "unless --merge).")
    parser.add_argument("--model", type=Path, default=None,
                        help="The learned localiser (localiser.pt of stages.localiser_train); without it, scans "
                             "without label maps are flagged.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (default: 1).")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="Localise only shard I of N (from 0) of the scans sorted by id (default: 0/1, all).")
    parser.add_argument("--scans-per-shard", type=cli.positive_int, default=None, metavar="P",
                        help="With --shard I (no /N): N = ceil(scans in the manifest / P), as the workflow splits.")
    parser.add_argument("--merge", type=cli.existing_folder, nargs="+", default=None, metavar="SHARD_DIR",
                        help="Instead of localising: merge the outputs of these shard runs, in this order, into --out.")
    cli.add_section_options(parser, "localise")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        cli.setup_logging(args.log, "localise")
        merge(args.merge, args.out)
        return 0
    if args.ingest is None:
        parser.error("--ingest is required (unless --merge)")
    if not (args.ingest / "manifest.parquet").is_file():
        parser.error(f"--ingest {args.ingest} has no manifest.parquet")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model} is not a file")
    try:
        n_scans = len(pd.read_parquet(args.ingest / "manifest.parquet", columns=["scan_id"]))
        shard = resolve_shard(args.shard, args.scans_per_shard, n_scans)
    except (ValueError, OSError) as err:
        parser.error(f"--shard: {err}")
    cfg = LocaliseConfig.from_config(cli.section_from_args(args, "localise", parser))
    cli.setup_logging(args.log, "localise")
    run(args.ingest, args.out, cfg, args.model, args.threads, shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
