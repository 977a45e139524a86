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

Run:
    python -m stages.probe_summary --runs results/probes/runs --splits results/splits --out results/probes \\
        --models siamese random scratch supervised
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli
from stages.evaluation.metrics import average_class_accuracy, binary_metrics
from stages.evaluation.probe_data import TASKS, label_subset, run_folder

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


def load_runs(runs: Path, models: list[str], tasks: list[str], fractions: list[float],
              seeds: int) -> tuple[pd.DataFrame, dict[tuple, pd.DataFrame]]:
    """The results table and every job's test predictions, keyed by (model, head, task, fraction, seed)."""
    rows, predictions, missing = [], {}, []
    for model in models:
        for task in tasks:
            for fraction in fractions:
                for seed in range(seeds):
                    folder = runs / run_folder(model, task, fraction, seed)
                    if not (folder / "metrics.json").exists():
                        missing.append(str(folder))
                        continue
                    job = json.loads((folder / "metrics.json").read_text())
                    preds = pd.read_parquet(folder / "predictions.parquet")
                    for head, m in job["heads"].items():
                        rows.append({"model": model, "head": head, "task": task, "fraction": fraction, "seed": seed,
                                     "n_subjects": job["n_subjects"], "n_scans": job["n_scans"],
                                     "n_train": job["n_train"], "n_test": job["n_test"],
                                     **{k: m.get(k, np.nan) for k in METRICS[task]}})
                        predictions[(model, head, task, fraction, seed)] = preds[preds["head"] == head]
    if not rows:
        raise ValueError(f"no probe results under {runs}")
    frame = pd.DataFrame(rows)
    for model in models:
        if model not in set(frame.model):
            raise ValueError(f"no probe results of model {model!r} under {runs}")
    ran = {(m, t) for m, t in zip(frame.model, frame.task)}
    partial = [f for f in missing if (f.split("/")[-4], f.split("/")[-3]) in ran]
    if partial:   # a (model, task) that ran for some subsets but not others; whole (model, task) gaps are by design
        log.warning("%d expected probe job(s) have no results, e.g. %s", len(partial), partial[0])
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


def run(runs: Path, splits: Path, out: Path, models: list[str], section: dict[str, Any],
        probe_seed: int) -> dict[str, Any]:
    cfg = section
    results, predictions = load_runs(runs, models, cfg["tasks"], cfg["label_fractions"], cfg["seeds"])
    summary = summarise(results, predictions, cfg["bootstrap"], cfg["ci_level"])
    efficiency = label_efficiency(summary)
    subjects = pd.read_parquet(splits / "subjects.parquet")
    subsets = pd.DataFrame([{"seed": s, "fraction": f, "subject_id": subject}
                            for s in range(cfg["seeds"]) for f in sorted(cfg["label_fractions"])
                            for subject in label_subset(subjects, f, s, probe_seed)])
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("results", results), ("summary", summary), ("label_efficiency", efficiency),
                        ("subsets", subsets)):
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
    all_predictions(predictions).to_parquet(out / "predictions.parquet", index=False)
    (out / "label_efficiency.json").write_text(json.dumps(efficiency.to_dict("records"), indent=2) + "\n")
    for row in efficiency.itertuples():
        log.info("%s, %s (%s head): %s; reference %s = %.3f", row.task, row.model, row.head, row.verdict,
                 row.reference, row.reference_value)
    return {"jobs": int(results.groupby(["model", "task", "fraction", "seed"]).ngroups), "rows": len(results)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.probe_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=cli.existing_folder, required=True, help="Folder of the probe jobs' outputs.")
    parser.add_argument("--splits", type=cli.existing_folder, required=True, help="Output folder of the splits stage.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
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
    run(args.runs, args.splits, args.out, args.models, section, args.probe_seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
