"""Stage localise: the vertebral bodies T12-S1 and discs T12-L1 to L5-S1 of every scan, by level.

A scan with a label map is localised from it (centre, spine axis, height, depth, width per level). A scan without
one, or whose subject's label maps are withheld (``localise.withhold_label_fraction``, so that the demo runs both
paths), is localised by the learned localiser (``stages.anatomy.localiser``); on withheld scans its result is compared with
the label map: centre error in mm (mean, 95th percentile) and level-labelling accuracy. A scan without a usable label
map that has rows in ingest's landmark table (``landmarks.parquet``, a user's table of level centres) is localised
from them instead of by the learned localiser (stages.anatomy.landmarks), and compared with its label map likewise when that
is withheld. Scans where localisation fails or is doubtful (missing levels, a transitional vertebra, levels out of
order, implausible spacing) are listed in ``flags.csv`` with the reason, and later stages skip them. A label map is
expected to hold only the levels its label scheme can name (``--label-scheme``, cohort.label_scheme, as ingest read
it; stages.archive.label_scheme.named_levels): SPIDER's masks have no sacrum label, so their scans are not flagged for
lacking S1 (extraction then cuts no S1 body). The learned localiser and landmarks must still find every level.

Run (one job; the workflow runs one per shard, ``--shard I --scans-per-shard P --out SHARD_DIR``, then
``--merge SHARD_DIR ...`` with the --out-* files):
    python -m stages.localise --manifest results/ingest/manifest.parquet --volumes results/ingest/volumes \\
        --labels results/ingest/labels --landmarks results/ingest/landmarks.parquet \\
        --weights stages/anatomy/weights/builtin_localiser.pt --threads 2 \\
        --out-structures results/localise/structures.parquet --out-flags results/localise/flags.csv \\
        --out-evaluation results/localise/evaluation.csv --out-summary results/localise/evaluation.json

Writes ``--out-structures`` (Parquet, a CSV copy beside it: one row per scan and structure; see
stages.anatomy.spine_structures), ``--out-flags`` (scan_id, source, reason), ``--out-evaluation`` (per withheld
structure: error, level correct, source: learned or landmarks) and ``--out-summary`` (JSON: the summary figures, with
the number of scans from each source).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from stages.anatomy.landmarks import structures_from_landmarks
from stages.anatomy.localiser import LocaliseConfig, compare, load_localiser, localise_image, withheld_subjects
from stages.anatomy.spine_structures import COLUMNS, check_structures, slice_normal, structures_from_label_map
from stages.archive.label_scheme import add_label_scheme_option, named_levels, scheme_from_args
from stages.archive.manifest import add_ingest_inputs, scan_file, write_table
from stages.core import cli, levels
from stages.core.pool import worker_pool
from stages.core.shards import add_shard_options, concat_tables, count_from_manifest, shard_block, shard_from_args

log = logging.getLogger("localise")


@dataclass(frozen=True)
class Folders:
    """Where a scan's files are: ingest's folders of volumes and of label maps."""

    volumes: Path
    labels: Path


def localise_scan(job: tuple[Folders, dict[str, Any], bool, Path | None, pd.DataFrame | None],
                  expected: Collection[str] | None = None) -> dict[str, Any]:
    """Structures, problems and (for withheld scans) the comparison with the label map, for one scan: from its label
    map (when ``use_label``), else from its landmarks (rows of ingest's landmarks.parquet, or None), else by the
    learned localiser. ``expected``: the levels a label map must hold (its scheme's, ``named_levels``; default all);
    landmarks and the learned localiser must find all."""
    folders, scan, use_label, model_path, marks = job
    torch.set_num_threads(1)
    result: dict[str, Any] = {"scan_id": scan["scan_id"], "evaluation": None}
    label_path = scan_file(folders.labels, scan["label_map"]) if scan["label_map"] else None
    volume_path = scan_file(folders.volumes, scan["volume"])
    if use_label:
        label = sitk.ReadImage(str(label_path))
        table = structures_from_label_map(label)
        result.update(source="label_map", structures=table,
                      problems=check_structures(table, set(np.unique(sitk.GetArrayViewFromImage(label))), expected))
        return result
    if marks is not None and len(marks):
        image = sitk.ReadImage(str(volume_path), sitk.sitkFloat32)
        table = structures_from_landmarks(image, marks)
        result.update(source="landmarks", structures=table, problems=check_structures(table))
        if label_path is not None:
            result["evaluation"] = compare(table, structures_from_label_map(sitk.ReadImage(str(label_path))),
                                           slice_normal(image))
        return result
    model, cfg = load_localiser(model_path) if model_path is not None else (None, None)
    if model is None:
        why = "no label map and no learned localiser" if model_path is None else \
            "no label map, and the localiser is untrained (no scan had a label map to train it on)"
        result.update(source="learned", structures=None, problems=[why])
        return result
    image = sitk.ReadImage(str(volume_path), sitk.sitkFloat32)
    table, problems = localise_image(model, cfg, image)
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


def read_landmarks(path: Path | None) -> dict[str, pd.DataFrame]:
    """Ingest's landmark table (landmarks.parquet; none given: no landmarks) by scan id."""
    if path is None:
        return {}
    return {scan_id: rows.reset_index(drop=True) for scan_id, rows in pd.read_parquet(path).groupby("scan_id")}


@dataclass(frozen=True)
class LocaliseOutputs:
    """What the stage writes: structures (Parquet, a CSV copy beside it), flags, evaluation (CSV), summary (JSON)."""

    structures: Path
    flags: Path
    evaluation: Path
    summary: Path

    @classmethod
    def in_folder(cls, folder: Path) -> LocaliseOutputs:
        """The outputs laid out in one folder as the workflow lays out results/localise (and a shard its folder)."""
        return cls(structures=folder / "structures.parquet", flags=folder / "flags.csv",
                   evaluation=folder / "evaluation.csv", summary=folder / "evaluation.json")


OUTPUTS = {
    "structures": "One row per scan and structure (Parquet; a CSV copy beside it).",
    "flags": "The scans later stages skip: scan_id, source, reason (CSV).",
    "evaluation": "Per withheld structure: error, level correct, source (CSV).",
    "summary": "The summary figures and the number of scans from each source (JSON).",
}


def run(manifest_file: Path, folders: Folders, landmarks: Path | None, out: LocaliseOutputs, cfg: LocaliseConfig,
        model_path: Path | None, workers: int, shard: tuple[int, int] = (0, 1),
        expected: Collection[str] | None = None) -> dict[str, Any]:
    """Localise the scans of shard ``shard`` = (i, n) of the manifest sorted by scan id (all of them by default);
    ``expected``: the levels a label map must hold (default all; see :func:`localise_scan`)."""
    unnamed = [name for name in levels.VERTEBRAE + levels.DISCS if expected is not None and name not in expected]
    if unnamed:
        log.info("not expected in label maps (their label scheme cannot name them): %s", ", ".join(unnamed))
    manifest = pd.read_parquet(manifest_file).sort_values("scan_id")
    manifest["label_map"] = manifest.label_map.fillna("")
    hidden = withheld_subjects(manifest.subject_id.tolist(), cfg.withhold_label_fraction, cfg.seed)
    manifest = manifest.iloc[shard_block(len(manifest), *shard)]
    marks = read_landmarks(landmarks)
    jobs = [(folders, scan, bool(scan["label_map"]) and scan["subject_id"] not in hidden, model_path,
             marks.get(scan["scan_id"])) for scan in manifest.to_dict("records")]
    from_landmarks = sum(not j[2] and j[4] is not None for j in jobs)
    structures, flags, evaluation = [], [], []
    with worker_pool(workers) as pool:
        scan_job = functools.partial(localise_scan, expected=expected)
        for scan, result in tqdm(zip(manifest.itertuples(), pool.map(scan_job, jobs)), total=len(jobs),
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


def write_outputs(out: LocaliseOutputs, table: pd.DataFrame, flags: pd.DataFrame, ev: pd.DataFrame,
                  counts: dict[str, int]) -> dict[str, Any]:
    """Structures, flags, evaluation and the summary (the counts and the comparisons summarised)."""
    write_table(table, out.structures)
    write_table(flags, out.flags, parquet=False)
    write_table(ev, out.evaluation, parquet=False)
    summary = {**counts, "flagged": int(flags.scan_id.nunique()),
               "learned_vs_withheld_labels": summarise(ev[ev.source == "learned"]),
               "landmarks_vs_withheld_labels": summarise(ev[ev.source == "landmarks"])}
    out.summary.parent.mkdir(parents=True, exist_ok=True)
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(scans)d scans: %(from_label_map)d from label maps, %(landmarks)d from landmarks, %(learned)d by the "
             "learned localiser, %(flagged)d flagged", summary)
    for source in ("learned", "landmarks"):
        if summary[f"{source}_vs_withheld_labels"].get("scans"):
            log.info("%s on withheld scans: %s", "learned localiser" if source == "learned" else "landmarks",
                     json.dumps(summary[f"{source}_vs_withheld_labels"]))
    return summary


def merge(shards: list[Path], out: LocaliseOutputs) -> dict[str, Any]:
    """The outputs of the shards' runs (folders of ``--shard`` runs), in shard order, as one run over the whole cohort
    would write them."""
    parts = [LocaliseOutputs.in_folder(s) for s in shards]
    table = concat_tables([part.structures for part in parts])
    flags = concat_tables([part.flags for part in parts]).reindex(columns=FLAG_COLUMNS)
    ev = concat_tables([part.evaluation for part in parts]).reindex(columns=EVALUATION_COLUMNS)
    summaries = [json.loads(part.summary.read_text()) for part in parts]
    counts = {name: int(sum(summary[name] for summary in summaries)) for name in COUNTS}
    log.info("merged %d shards", len(shards))
    return write_outputs(out, table, flags, ev, counts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localise", description=__doc__.split("\n\n")[0])
    inputs = parser.add_argument_group("inputs (the first three required but with --merge)")
    add_ingest_inputs(inputs, "manifest", "volumes", "labels", "landmarks", required=False)
    inputs.add_argument("--weights", type=cli.existing_file, default=None,
                        help="The learned localiser's weights (localise.model: the built-in "
                             "stages/anatomy/weights/builtin_localiser.pt, or localiser.pt of stages.localiser_train); "
                             "without them, scans without label maps or landmarks are flagged.")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (default: 1).")
    add_label_scheme_option(parser, "Label maps are expected to hold only the levels the scheme can name (spider: "
                                    "no S1, SPIDER has no sacrum label); the learned localiser and landmarks must "
                                    "find every level.")
    add_shard_options(parser, "the scans sorted by id")
    cli.add_section_options(parser, "localise")
    cli.add_output_options(parser, OUTPUTS, required=False, title="outputs (but with --shard)")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name in ("manifest", "volumes", "labels") if getattr(args, name) is None]
    if missing and not args.merge:
        parser.error(f"--{missing[0]} is required (but with --merge)")
    shard = shard_from_args(args, parser, count_from_manifest(args.manifest, args.scans_per_shard))
    cfg = LocaliseConfig.from_config(cli.section_from_args(args, "localise", parser))
    expected = named_levels(scheme_from_args(args, parser))
    out = LocaliseOutputs.in_folder(args.out) if shard else LocaliseOutputs(**cli.outputs_from_args(args, parser,
                                                                                                     OUTPUTS))
    cli.setup_logging(args.log, "localise")
    if args.merge:
        merge(args.merge, out)
    else:
        run(args.manifest, Folders(args.volumes, args.labels), args.landmarks, out, cfg, args.weights, args.threads,
            shard or (0, 1), expected)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
