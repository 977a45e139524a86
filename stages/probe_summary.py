"""Stage probe_summary: the results table of every probe job, its summary with confidence intervals, the label
subsets, and the label-efficiency figure of merit.

- ``results.parquet`` / ``.csv``: one row per (model, head, task, label subset, seed) with every metric and the size
  of the training set (subjects, scans, samples).
- ``summary.parquet`` / ``.csv``: per (model, head, task, subset) and metric, the mean and standard deviation over
  the seeds and a percentile bootstrap interval that resamples the test subjects (a subject's samples move together)
  and the seeds: each replicate draws as many test subjects and seeds as there are, with replacement, and averages
  the metric over the drawn seeds.
- ``label_efficiency_differences.parquet`` / ``.csv``: for each task, each (model, head) other than the reference and
  each label subset, the difference of the headline metric (average class accuracy for the grade, ROC AUC for
  herniation, accuracy for the level) from that of the model trained from scratch on every label (``scratch`` at
  fraction 1.0, whatever its head): the model at fraction f minus scratch at 1.0, each averaged over its seeds, with a
  paired percentile bootstrap interval over the test subjects (each replicate draws the test subjects with
  replacement, a subject's samples together, and scores both models on the same draw; seeds are averaged, not
  resampled; both models must have been scored on the same test samples), and a verdict by non-inferiority:
  "matches" when the interval's lower end is above -``probes.match_margin`` (in the metric's units), else "below
  scratch at all labels" when its upper end is below 0, else "inconclusive".
- ``label_efficiency.csv`` / ``.parquet`` / ``.json``: the figure of merit, for each task and each other (model,
  head): the smallest label subset that matches, with its subjects, scans and share of scratch's scans, or "not
  reached" (Jamaludin et al. 2017: 667 vs 976 scans; Hou et al. 2023: 1,024 vs 3,036 labels; Cao et al. 2022: 70% vs
  100%), with the difference and interval there (not reached: at the largest subset tried).
- ``subsets.parquet`` / ``.csv``: the label subsets (seed, fraction, subject).
- ``predictions.parquet``: every job's test predictions (for the ROC curves and confusion matrices of the report).

Run (the workflow names every file; each job is known by its folder, stages.evaluation.probe_data.RUN_FOLDER):
    python -m stages.probe_summary --metrics results/probes/runs/*/*/*/*/metrics.json \\
        --predictions results/probes/runs/*/*/*/*/predictions.parquet --subjects results/splits/subjects.parquet \\
        --results results/probes/results.parquet --summary results/probes/summary.parquet \\
        --efficiency results/probes/label_efficiency.csv \\
        --efficiency-differences results/probes/label_efficiency_differences.parquet \\
        --subsets results/probes/subsets.parquet --all-predictions results/probes/predictions.parquet \\
        --models siamese random scratch supervised
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
from scipy import sparse

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
        for m, drawn in draws.items():
            v = np.nanmean([x[m] for x in values]) if any(np.isfinite(x[m]) for x in values) else np.nan
            if np.isfinite(v):
                drawn.append(float(v))
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


# --- The label-efficiency figure of merit ---------------------------------------------------------------------------

SAMPLE_KEYS = ["subject_id", "scan_id", "level"]
MATCHES, BELOW, INCONCLUSIVE, UNDEFINED = "matches", "below scratch at all labels", "inconclusive", "undefined"
# The verdict's rule, word for word as README.md states it (tests/test_probe_summary.py checks that it does).
MATCH_RULE = ("a (model, head) matches scratch at all labels at a label fraction when the lower end of the "
              "interval of its difference is above -`probes.match_margin`")


def verdict(difference: float, low: float, high: float, margin: float) -> str:
    """The verdict on one difference (model at a fraction minus scratch at every label) and its interval: ``MATCHES``
    by non-inferiority, ``low > -margin`` (:data:`MATCH_RULE`); else ``BELOW`` when ``high < 0``; else
    ``INCONCLUSIVE`` (also when there is no interval, ``probes.bootstrap`` 0); ``UNDEFINED`` when the metric is not
    defined on the test part (an AUC with one class)."""
    if margin < 0:
        raise ValueError(f"match_margin must be >= 0, got {margin}")
    if not np.isfinite(difference):
        return UNDEFINED
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    if low > -margin:
        return MATCHES
    return BELOW if high < 0 else INCONCLUSIVE


def _aligned(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """``frames`` (test predictions) sorted by sample; ValueError unless all hold the same test samples."""
    for frame in frames:
        missing = [k for k in SAMPLE_KEYS + ["label", "predicted"] if k not in frame]
        if missing:
            raise ValueError(f"test predictions without column(s) {missing}")
    out = [f.sort_values(SAMPLE_KEYS, kind="stable").reset_index(drop=True) for f in frames]
    first = out[0][SAMPLE_KEYS].to_numpy()
    for other in out[1:]:
        keys = other[SAMPLE_KEYS].to_numpy()
        if keys.shape != first.shape or not (keys == first).all():
            only = sorted(set(map(tuple, first)) ^ set(map(tuple, keys)))
            where = (f"e.g. (subject_id, scan_id, level) {only[0]} is in one only" if only
                     else "the same samples, some repeated")
            raise ValueError(f"not scored on the same test samples ({len(first)} vs {len(keys)} samples; {where})")
    return out


def _tallies(metric: str, frame: pd.DataFrame, subject_of: np.ndarray, n_subjects: int,
             ) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """One job's test predictions as two (subjects, k) count matrices from which :func:`_weighted_metric` gets
    ``metric`` for any weighting of the subjects: accuracy: correct and all samples (k = 1); average class accuracy:
    correct and all samples of each true class; ROC AUC: positives and negatives at each distinct score, ascending."""
    truth, predicted = frame.label.to_numpy(), frame.predicted.to_numpy()
    if metric == "accuracy":
        column, a, b = np.zeros(len(frame), dtype=int), (truth == predicted).astype(float), np.ones(len(frame))
    elif metric == "average_class_accuracy":
        _, column = np.unique(truth, return_inverse=True)
        a, b = (truth == predicted).astype(float), np.ones(len(frame))
    elif metric == "auc":
        if "p_1" not in frame:
            raise ValueError("ROC AUC needs the score column p_1 in the test predictions")
        _, column = np.unique(frame["p_1"].to_numpy(dtype=float), return_inverse=True)
        positive = truth.astype(bool)
        a, b = positive.astype(float), (~positive).astype(float)
    else:
        raise ValueError(f"no paired bootstrap for metric {metric!r} (headline metrics: accuracy, "
                         "average_class_accuracy, auc)")
    shape = (n_subjects, int(column.max()) + 1 if len(column) else 1)
    return (sparse.csr_matrix((a, (subject_of, column)), shape=shape),
            sparse.csr_matrix((b, (subject_of, column)), shape=shape))


def _weighted_metric(metric: str, tallies: tuple[sparse.csr_matrix, sparse.csr_matrix],
                     weights: np.ndarray) -> np.ndarray:
    """``metric`` on the test set in which subject s appears ``weights[r, s]`` times, for each row r of weights
    (subjects, as a bootstrap replicate draws them); NaN where it is not defined."""
    a, b = ((t.T @ weights.T).T for t in tallies)      # (replicates, k)
    if metric == "accuracy":
        return a[:, 0] / b[:, 0]
    if metric == "average_class_accuracy":               # mean recall over the true classes present
        present = b > 0
        return np.where(present, a / np.where(present, b, 1), 0).sum(1) / present.sum(1)
    below = np.cumsum(b, axis=1) - b                     # AUC: negatives scoring lower, ties counting one half
    pairs = a.sum(1) * b.sum(1)
    return np.where(pairs > 0, (a * (below + 0.5 * b)).sum(1) / np.where(pairs > 0, pairs, 1), np.nan)


def _seed_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the seeds (axis 0) of the finite values; NaN where none is."""
    finite = np.isfinite(values)
    count = finite.sum(0)
    return np.where(count > 0, np.where(finite, values, 0).sum(0) / np.maximum(count, 1), np.nan)


def paired_difference(task: str, model: list[pd.DataFrame], reference: list[pd.DataFrame], n_boot: int,
                      level: float, seed: int = 0) -> dict[str, float]:
    """The difference of ``task``'s headline metric, ``model`` minus ``reference`` (each a list of its seeds' test
    predictions, the metric averaged over the seeds), with a paired percentile bootstrap interval over the test
    subjects: replicate r draws as many subjects as there are, with replacement (``rng.integers(n, size=n)`` with
    ``rng = np.random.default_rng(seed)``, subjects in sorted order of their id), a subject's samples moving together,
    and scores both models on the same draw. Seeds are averaged, not resampled: the interval is over test subjects.
    Replicates where either metric is undefined are left out (``replicates`` counts those kept). ValueError unless
    every job was scored on the same test samples."""
    if not model or not reference:
        raise ValueError("paired_difference needs the predictions of at least one seed of each model")
    if n_boot < 0 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 0 and 0 < level < 1, got {n_boot} and {level}")
    frames = _aligned(model + reference)
    metric = TASKS[task].headline
    names, subject_of = np.unique(frames[0].subject_id.to_numpy(), return_inverse=True)
    tallies = [_tallies(metric, f, subject_of, len(names)) for f in frames]

    def difference(weights: np.ndarray) -> np.ndarray:
        values = np.stack([_weighted_metric(metric, t, weights) for t in tallies])
        return _seed_mean(values[:len(model)]) - _seed_mean(values[len(model):])

    point = float(difference(np.ones((1, len(names))))[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // max(max(t[0].shape[1] for t in tallies), len(names))))
    draws = []
    for start in range(0, n_boot, chunk):
        weights = np.stack([np.bincount(rng.integers(len(names), size=len(names)), minlength=len(names))
                            for _ in range(min(chunk, n_boot - start))]).astype(float)
        draws.append(difference(weights))
    kept = np.concatenate(draws) if draws else np.empty(0)
    kept = kept[np.isfinite(kept)]
    tail = (1 - level) / 2 * 100
    low, high = (float(q) for q in np.percentile(kept, [tail, 100 - tail])) if len(kept) else (np.nan, np.nan)
    return {"difference": point, "ci_low": low, "ci_high": high, "replicates": len(kept)}


def _seeds_of(predictions: dict[tuple, pd.DataFrame], model: str, head: str, task: str,
              fraction: float) -> list[pd.DataFrame]:
    return [p for (m, h, t, f, _), p in sorted(predictions.items(), key=lambda item: item[0][4])
            if (m, h, t, f) == (model, head, task, fraction)]


def efficiency_differences(summary: pd.DataFrame, predictions: dict[tuple, pd.DataFrame], n_boot: int, level: float,
                           margin: float, seed: int = 0) -> pd.DataFrame:
    """For each task, each (model, head) but the reference and each label fraction: the headline metric's difference
    from ``scratch`` at fraction 1.0 (whatever its head), its paired bootstrap interval (:func:`paired_difference`)
    and its :func:`verdict` at ``margin``. ``predictions`` are keyed as :func:`load_runs` keys them."""
    if margin < 0:
        raise ValueError(f"match_margin must be >= 0, got {margin}")
    if n_boot == 0:
        log.warning("probes.bootstrap is 0: no intervals, so no label fraction can be said to match scratch")
    rows = []
    for task, spec in TASKS.items():
        here = summary[(summary.task == task) & (summary.metric == spec.headline)]
        if here.empty or not (here.model == REFERENCE_MODEL).any():
            continue
        full = here[(here.model == REFERENCE_MODEL) & (here.fraction == 1.0)]
        if full.empty:
            log.warning("%s: %s was not run on every label (fraction 1.0): no figure of merit", task,
                        REFERENCE_MODEL)
            continue
        if len(full) > 1:
            raise ValueError(f"{task}: {REFERENCE_MODEL} at fraction 1.0 has {len(full)} heads "
                             f"({', '.join(full['head'])}); the reference must be one")
        ref = full.iloc[0]
        reference = _seeds_of(predictions, REFERENCE_MODEL, ref["head"], task, 1.0)
        name = f"{REFERENCE_MODEL} ({ref['head']}) at fraction 1"
        disagree = []
        for (model, head), group in here[here.model != REFERENCE_MODEL].groupby(["model", "head"], sort=False):
            for row in group.sort_values("fraction").itertuples():
                try:
                    paired = paired_difference(task, _seeds_of(predictions, model, head, task, row.fraction),
                                               reference, n_boot, level, seed)
                except ValueError as err:
                    raise ValueError(f"{task}: {model} ({head}) at fraction {row.fraction:g} vs {name}: {err}"
                                     ) from err
                if abs(row.mean - ref["mean"] - paired["difference"]) > 1e-6:
                    disagree.append((model, head, row.fraction))
                rows.append({"task": task, "metric": spec.headline, "model": model, "head": head,
                             "fraction": float(row.fraction), "n_subjects": float(row.n_subjects),
                             "n_scans": float(row.n_scans), "scan_share": float(row.n_scans / ref.n_scans),
                             "value": float(row.mean), "reference": name, "reference_value": float(ref["mean"]),
                             "reference_subjects": float(ref.n_subjects), "reference_scans": float(ref.n_scans),
                             **paired, "ci_level": level, "margin": margin,
                             "verdict": verdict(paired["difference"], paired["ci_low"], paired["ci_high"], margin)})
        if disagree:
            log.warning("%s: for %d comparison(s), e.g. %s, the difference of the jobs' reported means differs "
                        "from the one recomputed from their test predictions", task, len(disagree), disagree[0])
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


DIFFERENCE_COLUMNS = ["task", "metric", "model", "head", "fraction", "n_subjects", "n_scans", "scan_share", "value",
                      "reference", "reference_value", "reference_subjects", "reference_scans", "difference", "ci_low",
                      "ci_high", "replicates", "ci_level", "margin", "verdict"]


def label_efficiency(differences: pd.DataFrame) -> pd.DataFrame:
    """The figure of merit from :func:`efficiency_differences`: for each task and (model, head), the smallest label
    fraction whose verdict is ``MATCHES``, with its subjects, scans and share of scratch's scans, or "not reached";
    beside it the difference and interval at that fraction (not reached: at the largest fraction tried)."""
    missing = [c for c in DIFFERENCE_COLUMNS if c not in differences]
    if missing:
        raise ValueError(f"label_efficiency reads the table of efficiency_differences(summary, predictions, ...); "
                         f"this one lacks {missing}")
    rows = []
    for (task, model, head), group in differences.groupby(["task", "model", "head"], sort=False):
        group = group.sort_values("fraction")
        matched = group[group.verdict == MATCHES]
        first = matched.iloc[0] if len(matched) else None
        shown = group.iloc[-1] if first is None else first
        if first is not None:
            text = (f"matches with {first.n_scans:.0f} of {first.reference_scans:.0f} scans ({first.fraction:g} of "
                    "the subjects)")
        elif (group.verdict == UNDEFINED).all():
            text = "undefined (metric not defined on this test part)"
        else:
            text = f"not reached with any subset (at fraction {shown.fraction:g}: {shown.verdict})"
        rows.append({
            "task": task, "metric": shown.metric, "model": model, "head": head, "reference": shown.reference,
            "reference_value": shown.reference_value, "reference_subjects": shown.reference_subjects,
            "reference_scans": shown.reference_scans,
            "matched_at_fraction": None if first is None else float(first.fraction),
            "matched_subjects": None if first is None else float(first.n_subjects),
            "matched_scans": None if first is None else float(first.n_scans),
            "value_there": None if first is None else float(first.value),
            "scan_share": None if first is None else float(first.scan_share),
            "compared_at_fraction": float(shown.fraction), "difference": shown.difference, "ci_low": shown.ci_low,
            "ci_high": shown.ci_high, "ci_level": shown.ci_level, "margin": shown.margin,
            "fraction_verdict": shown.verdict, "verdict": text})
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)  # with its header when empty (no scratch baseline)


EFFICIENCY_COLUMNS = ["task", "metric", "model", "head", "reference", "reference_value", "reference_subjects",
                      "reference_scans", "matched_at_fraction", "matched_subjects", "matched_scans", "value_there",
                      "scan_share", "compared_at_fraction", "difference", "ci_low", "ci_high", "ci_level", "margin",
                      "fraction_verdict", "verdict"]


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
    differences: Path

    @classmethod
    def in_folder(cls, folder: Path) -> SummaryFiles:
        """The workflow's file names in one folder (for tests and scripts; the rule names each file)."""
        return cls(folder / "results.parquet", folder / "summary.parquet", folder / "label_efficiency.csv",
                   folder / "subsets.parquet", folder / "predictions.parquet",
                   folder / "label_efficiency_differences.parquet")


def run(jobs: dict[tuple, tuple[Path, Path]], subjects_file: Path, out: SummaryFiles, models: list[str],
        section: dict[str, Any], probe_seed: int) -> dict[str, Any]:
    """Collect ``jobs`` (:func:`job_files`) of ``models``; write ``out``."""
    cfg = section
    results, predictions = load_runs(jobs, models, cfg["tasks"], cfg["label_fractions"], cfg["seeds"])
    summary = summarise(results, predictions, cfg["bootstrap"], cfg["ci_level"])
    differences = efficiency_differences(summary, predictions, cfg["bootstrap"], cfg["ci_level"], cfg["match_margin"])
    efficiency = label_efficiency(differences)
    subjects = pd.read_parquet(subjects_file)
    subsets = pd.DataFrame([{"seed": s, "fraction": f, "subject_id": subject}
                            for s in range(cfg["seeds"]) for f in sorted(cfg["label_fractions"])
                            for subject in label_subset(subjects, f, s, probe_seed)])
    for path, frame in ((out.results, results), (out.summary, summary), (out.efficiency, efficiency),
                        (out.subsets, subsets), (out.differences, differences)):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path.with_suffix(".parquet"), index=False)
        frame.to_csv(path.with_suffix(".csv"), index=False)
    all_predictions(predictions).to_parquet(out.predictions, index=False)
    records = efficiency.astype(object).where(efficiency.notna(), None).to_dict("records")   # no NaN in JSON
    out.efficiency.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")
    for row in efficiency.itertuples():
        log.info("%s, %s (%s head): %s; difference %+.3f [%.3f, %.3f] at fraction %g; reference %s = %.3f",
                 row.task, row.model, row.head, row.verdict, row.difference, row.ci_low, row.ci_high,
                 row.compared_at_fraction, row.reference, row.reference_value)
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
    files.add_argument("--efficiency-differences", type=Path, required=True,
                       help="label_efficiency_differences.parquet: each (task, model, head, fraction)'s difference "
                            "from scratch on every label, its paired interval and verdict.")
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
    out = SummaryFiles(args.results, args.summary, args.efficiency, args.subsets, args.all_predictions,
                       args.efficiency_differences)
    run(job_files(args.metrics, args.predictions), args.subjects, out, args.models, section, args.probe_seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
