"""Stage probe_summary: the results table of every probe job, its summary with confidence intervals, the label
subsets, and the label-efficiency figure of merit.

- ``results.parquet`` / ``.csv``: one row per (model, head, task, label subset, seed) with every metric and the size
  of the training set (subjects, scans, samples).
- ``summary.parquet`` / ``.csv``: per (model, head, task, subset) and metric, the mean and standard deviation over
  the seeds and a percentile bootstrap interval that resamples the test subjects (a subject's samples move together)
  and the seeds: each replicate draws as many test subjects and seeds as there are, with replacement, and averages
  the metric over the drawn seeds.
- ``label_efficiency.csv`` / ``.json``: for each task and each other model and head, the smallest label subset whose
  mean headline metric (average class accuracy for the grade, ROC AUC for herniation, accuracy for the level)
  reaches that of the model trained from scratch on every label (Jamaludin et al. 2017: 667 vs 976 scans; Hou et
  al. 2023: 1,024 vs 3,036 labels; Cao et al. 2022: 70% vs 100%), or "not reached".
- ``subsets.parquet`` / ``.csv``: the label subsets (seed, fraction, subject).
- ``predictions.parquet``: every job's test predictions (for the ROC curves and confusion matrices of the report).

Run (the workflow names every file; each job is known by its folder, stages.evaluation.probe_data.RUN_FOLDER):
    python -m stages.probe_summary --metrics results/probes/runs/*/*/*/*/metrics.json \\
        --predictions results/probes/runs/*/*/*/*/predictions.parquet --subjects results/splits/subjects.parquet \\
        --results results/probes/results.parquet --summary results/probes/summary.parquet \\
        --efficiency results/probes/label_efficiency.csv --subsets results/probes/subsets.parquet \\
        --all-predictions results/probes/predictions.parquet --models siamese random scratch supervised
Each Parquet table gets its CSV beside it (same name, .csv), and the figure of merit its JSON (.json) and Parquet.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli
from stages.evaluation.metrics import average_class_accuracy, binary_metrics
from stages.evaluation.probe_data import TASKS, label_subset, run_of

log = logging.getLogger("probe_summary")
METRICS = {"grade": ("average_class_accuracy", "accuracy"),
           "herniation": ("auc", "accuracy", "sensitivity", "specificity", "average_class_accuracy"),
           "level": ("accuracy", "average_class_accuracy")}
REFERENCE_MODEL = "scratch"


def task_metrics(task: str, truth: np.ndarray, predicted: np.ndarray, score: np.ndarray | None) -> dict[str, float]:
    """Every metric of ``task`` for one set of predictions."""
    out = {"accuracy": float((truth == predicted).mean()),
           "average_class_accuracy": average_class_accuracy(truth, predicted)}
    if TASKS[task].binary and score is not None:
        out.update(binary_metrics(truth, score))
    return out


def bootstrap(task: str, per_seed: list[pd.DataFrame], n_boot: int, level: float,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every metric over test subjects and seeds (see the module's doc)."""
    if n_boot == 0 or not per_seed:
        return {}
    first = per_seed[0]
    for other in per_seed[1:]:
        if not (other[["subject_id", "scan_id", "level"]].to_numpy() == first[["subject_id", "scan_id", "level"]]
                .to_numpy()).all() or len(other) != len(first):
            raise ValueError("the seeds' predictions are not of the same test samples in the same order")
    subjects = first.subject_id.to_numpy()
    names = np.unique(subjects)
    members = [np.flatnonzero(subjects == s) for s in names]
    arrays = [(p.label.to_numpy(), p.predicted.to_numpy(), p["p_1"].to_numpy() if TASKS[task].binary else None)
              for p in per_seed]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRICS[task]}
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(len(members), size=len(members))])
        chosen = rng.integers(len(arrays), size=len(arrays))
        values = [task_metrics(task, arrays[k][0][idx], arrays[k][1][idx],
                               None if arrays[k][2] is None else arrays[k][2][idx]) for k in chosen]
        for m in draws:
            v = np.nanmean([x[m] for x in values]) if any(np.isfinite(x[m]) for x in values) else np.nan
            if np.isfinite(v):
                draws[m].append(float(v))
    tail = (1 - level) / 2 * 100
    return {m: tuple(float(q) for q in np.percentile(v, [tail, 100 - tail])) if v else (np.nan, np.nan)
            for m, v in draws.items()}


def job_files(metrics: list[Path], predictions: list[Path]) -> dict[tuple, tuple[Path, Path]]:
    """Each probe job's (metrics.json, predictions.parquet), keyed by (model, task, fraction, seed) as its folder
    names them; every job needs both files."""
    keyed = [{(r["model"], r["task"], r["fraction"], r["seed"]): p for p in files for r in [run_of(p)]}
             for files in (metrics, predictions)]
    unpaired = sorted(set(keyed[0]) ^ set(keyed[1]))
    if unpaired:
        raise ValueError(f"probe jobs without both metrics and predictions: {unpaired[:3]}")
    return {key: (path, keyed[1][key]) for key, path in keyed[0].items()}


def load_runs(jobs: dict[tuple, tuple[Path, Path]], models: list[str], tasks: list[str], fractions: list[float],
              seeds: int) -> tuple[pd.DataFrame, dict[tuple, pd.DataFrame]]:
    """The results table and every job's test predictions, keyed by (model, head, task, fraction, seed), from
    ``jobs`` (:func:`job_files`), in the order of models, tasks, fractions and seeds."""
    rows, predictions, missing = [], {}, []
    for model in models:
        for task in tasks:
            for fraction in fractions:
                for seed in range(seeds):
                    if (model, task, fraction, seed) not in jobs:
                        missing.append((model, task, fraction, seed))
                        continue
                    metrics_file, predictions_file = jobs[(model, task, fraction, seed)]
                    job = json.loads(metrics_file.read_text())
                    preds = pd.read_parquet(predictions_file)
                    for head, m in job["heads"].items():
                        rows.append({"model": model, "head": head, "task": task, "fraction": fraction, "seed": seed,
                                     "n_subjects": job["n_subjects"], "n_scans": job["n_scans"],
                                     "n_train": job["n_train"], "n_test": job["n_test"],
                                     **{k: m.get(k, np.nan) for k in METRICS[task]}})
                        predictions[(model, head, task, fraction, seed)] = preds[preds["head"] == head]
    if not rows:
        raise ValueError(f"no probe results among the {len(jobs)} jobs given")
    frame = pd.DataFrame(rows)
    for model in models:
        if model not in set(frame.model):
            raise ValueError(f"no probe results of model {model!r}")
    ran = {(m, t) for m, t in zip(frame.model, frame.task)}
    partial = [job for job in missing if job[:2] in ran]
    if partial:   # a (model, task) that ran for some subsets but not others; whole (model, task) gaps are by design
        log.warning("%d expected probe job(s) have no results, e.g. (model, task, fraction, seed) %s", len(partial),
                    partial[0])
    return frame, predictions


def summarise(results: pd.DataFrame, predictions: dict[tuple, pd.DataFrame], n_boot: int,
              level: float) -> pd.DataFrame:
    rows = []
    for (model, head, task, fraction), group in results.groupby(["model", "head", "task", "fraction"], sort=False):
        seeds = sorted(group.seed)
        intervals = bootstrap(task, [predictions[(model, head, task, fraction, s)] for s in seeds], n_boot, level)
        for metric in METRICS[task]:
            values = group[metric].astype(float)
            low, high = intervals.get(metric, (np.nan, np.nan))
            rows.append({"model": model, "head": head, "task": task, "fraction": fraction,
                         "n_subjects": float(group.n_subjects.mean()), "n_scans": float(group.n_scans.mean()),
                         "n_train": float(group.n_train.mean()),
                         "metric": metric, "mean": float(values.mean()), "std": float(values.std(ddof=1))
                         if len(values) > 1 else np.nan, "ci_low": low, "ci_high": high, "seeds": len(seeds)})
    return pd.DataFrame(rows)


def label_efficiency(summary: pd.DataFrame) -> pd.DataFrame:
    """For each task: the smallest subset at which each (model, head) reaches scratch on every label."""
    rows = []
    for task, spec in TASKS.items():
        here = summary[(summary.task == task) & (summary.metric == spec.headline)]
        reference = here[here.model == REFERENCE_MODEL]
        if here.empty or reference.empty:
            continue
        if not (reference.fraction == 1.0).any():
            log.warning("%s: %s was not run on every label (fraction 1.0): no figure of merit", task,
                        REFERENCE_MODEL)
            continue
        full = reference[reference.fraction == 1.0].iloc[0]
        if not np.isfinite(full["mean"]):
            continue
        for (model, head), group in here[here.model != REFERENCE_MODEL].groupby(["model", "head"], sort=False):
            group = group.sort_values("fraction")
            reached = group[group["mean"] >= full["mean"]]
            first = reached.iloc[0] if len(reached) else None
            rows.append({
                "task": task, "metric": spec.headline, "model": model, "head": head,
                "reference": f"{REFERENCE_MODEL} at fraction {full.fraction:g}", "reference_value": full["mean"],
                "reference_subjects": full.n_subjects, "reference_scans": full.n_scans,
                "matched_at_fraction": None if first is None else float(first.fraction),
                "matched_subjects": None if first is None else float(first.n_subjects),
                "matched_scans": None if first is None else float(first.n_scans),
                "value_there": None if first is None else float(first["mean"]),
                "scan_share": None if first is None else float(first.n_scans / full.n_scans),
                "verdict": ("undefined (metric not defined on this test part)" if group["mean"].isna().all()
                            else "not reached with any subset") if first is None else
                f"matches with {first.n_scans:.0f} of {full.n_scans:.0f} scans ({first.fraction:g} of the subjects)",
            })
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)  # with its header when empty (no scratch baseline)


EFFICIENCY_COLUMNS = ["task", "metric", "model", "head", "reference", "reference_value", "reference_subjects",
                      "reference_scans", "matched_at_fraction", "matched_subjects", "matched_scans", "value_there",
                      "scan_share", "verdict"]


def all_predictions(predictions: dict[tuple, pd.DataFrame]) -> pd.DataFrame:
    """Every job's test predictions in one table, keyed by model, head, task, fraction and seed (the class
    probability columns ``p_*`` of another task are empty)."""
    frames = [p.drop(columns="head").assign(model=m, head=h, task=t, fraction=f, seed=s)
              for (m, h, t, f, s), p in predictions.items()]
    table = pd.concat(frames, ignore_index=True)
    keys = ["model", "head", "task", "fraction", "seed"]
    return table[keys + [c for c in table.columns if c not in keys]]


@dataclass(frozen=True)
class SummaryFiles:
    """The tables this stage writes (the probe_summary rule's outputs); each Parquet table gets its CSV beside it,
    the figure of merit (CSV) its Parquet and JSON."""

    results: Path
    summary: Path
    efficiency: Path
    subsets: Path
    predictions: Path

    @classmethod
    def in_folder(cls, folder: Path) -> SummaryFiles:
        """The workflow's file names in one folder (for tests and scripts; the rule names each file)."""
        return cls(folder / "results.parquet", folder / "summary.parquet", folder / "label_efficiency.csv",
                   folder / "subsets.parquet", folder / "predictions.parquet")


def run(jobs: dict[tuple, tuple[Path, Path]], subjects_file: Path, out: SummaryFiles, models: list[str],
        section: dict[str, Any], probe_seed: int) -> dict[str, Any]:
    """Collect ``jobs`` (:func:`job_files`) of ``models``; write ``out``."""
    cfg = section
    results, predictions = load_runs(jobs, models, cfg["tasks"], cfg["label_fractions"], cfg["seeds"])
    summary = summarise(results, predictions, cfg["bootstrap"], cfg["ci_level"])
    efficiency = label_efficiency(summary)
    subjects = pd.read_parquet(subjects_file)
    subsets = pd.DataFrame([{"seed": s, "fraction": f, "subject_id": subject}
                            for s in range(cfg["seeds"]) for f in sorted(cfg["label_fractions"])
                            for subject in label_subset(subjects, f, s, probe_seed)])
    for path, frame in ((out.results, results), (out.summary, summary), (out.efficiency, efficiency),
                        (out.subsets, subsets)):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path.with_suffix(".parquet"), index=False)
        frame.to_csv(path.with_suffix(".csv"), index=False)
    all_predictions(predictions).to_parquet(out.predictions, index=False)
    out.efficiency.with_suffix(".json").write_text(json.dumps(efficiency.to_dict("records"), indent=2) + "\n")
    for row in efficiency.itertuples():
        log.info("%s, %s (%s head): %s; reference %s = %.3f", row.task, row.model, row.head, row.verdict,
                 row.reference, row.reference_value)
    return {"jobs": int(results.groupby(["model", "task", "fraction", "seed"]).ngroups), "rows": len(results)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.probe_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=cli.existing_file, nargs="+", required=True,
                        help="metrics.json of every probe job (in its folder: model/task/f{fraction}/seed{seed}).")
    parser.add_argument("--predictions", type=cli.existing_file, nargs="+", required=True,
                        help="predictions.parquet of every probe job.")
    parser.add_argument("--subjects", type=cli.existing_file, required=True,
                        help="subjects.parquet of the splits stage (for the label subsets).")
    files = parser.add_argument_group("outputs (a CSV is written beside each Parquet table)")
    files.add_argument("--results", type=Path, required=True, help="results.parquet: one row per job and head.")
    files.add_argument("--summary", type=Path, required=True, help="summary.parquet: means and intervals.")
    files.add_argument("--efficiency", type=Path, required=True,
                       help="label_efficiency.csv: the figure of merit (with .parquet and .json beside it).")
    files.add_argument("--subsets", type=Path, required=True, help="subsets.parquet: the label subsets.")
    files.add_argument("--all-predictions", type=Path, required=True, help="predictions.parquet of every job.")
    parser.add_argument("--models", nargs="+", required=True, help="Models to collect (as named in the runs folder).")
    parser.add_argument("--probe-seed", type=int, default=0, help="probe_training.seed (the label subsets' seed).")
    cli.add_section_options(parser, "probes")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    section = cli.section_from_args(args, "probes", parser)
    cli.setup_logging(args.log, "probe_summary")
    out = SummaryFiles(args.results, args.summary, args.efficiency, args.subsets, args.all_predictions)
    run(job_files(args.metrics, args.predictions), args.subjects, out, args.models, section, args.probe_seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
