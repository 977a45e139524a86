"""Metrics of the downstream tasks, as the papers report them, and their confidence intervals.

- Disc degeneration (Pfirrmann grade, multi-class): the average class accuracy of Jamaludin et al. 2017 (section 4.2),
  the mean of the diagonal of the row-normalised confusion matrix (the recall of each grade present, averaged).
- Disc herniation (binary): accuracy, sensitivity, specificity and ROC AUC, as in Hou et al. 2023.
- Confidence intervals: a percentile bootstrap that resamples test *subjects* (a subject's discs move together,
  since they are not independent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts ``C[i, j]`` of true ``labels[i]`` predicted as ``labels[j]``."""
    index = {label: k for k, label in enumerate(labels.tolist())}
    out = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()):
        if t not in index or p not in index:
            raise ValueError(f"label {t if t not in index else p!r} is not among {labels.tolist()}")
        out[index[t], index[p]] += 1
    return out


def average_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of the share of that class predicted correctly."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("no samples")
    labels = np.unique(np.concatenate([y_true, y_pred]))
    matrix = confusion(y_true, y_pred, labels).astype(float)
    present = matrix.sum(axis=1) > 0
    return float(np.mean(np.diag(matrix)[present] / matrix.sum(axis=1)[present]))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney statistic, from average ranks); NaN when one class is absent."""
    y = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0        # 1-based average rank of each distinct value
    ranks = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold of ``score`` (tied scores move together), from (0, 0) to
    (1, 1); the area under them is :func:`roc_auc`."""
    y = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=float)
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both classes in the truth")
    order = np.argsort(-score, kind="stable")
    y, score = y[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]       # the last sample of each tied group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()]


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, sensitivity (recall of the positives), specificity (recall of the negatives) at ``threshold``, and
    the ROC AUC of ``score`` (NaN where the truth has one class only)."""
    y = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=float)
    if len(y) == 0 or len(y) != len(score):
        raise ValueError(f"need as many scores as labels, got {len(score)} and {len(y)}")
    predicted = score >= threshold
    positives, negatives = y.sum(), (~y).sum()
    return {
        "accuracy": float((predicted == y).mean()),
        "sensitivity": float((predicted & y).sum() / positives) if positives else float("nan"),
        "specificity": float((~predicted & ~y).sum() / negatives) if negatives else float("nan"),
        "auc": roc_auc(y, score),
    }


def bootstrap_interval(groups: list[np.ndarray], statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and percentile interval of ``statistic`` over resampled groups.

    ``groups`` holds one integer array of sample indices per test subject; each replicate draws as many subjects
    as there are, with replacement, and evaluates ``statistic`` on the concatenation of their indices. Replicates
    where the statistic is undefined (NaN, e.g. one class only) are dropped.
    """
    point, low, high = bootstrap_intervals(groups, lambda idx: np.array([statistic(idx)]), n_boot, level, seed)
    return point[0], float(low[0]), float(high[0])


def bootstrap_intervals(groups: list[np.ndarray], statistic: Callable[[np.ndarray], np.ndarray], n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`bootstrap_interval` of a statistic with several values (one resample of the groups serves them all):
    point estimates, lower and upper bounds, each an array like ``statistic``'s; a value undefined (NaN) in a
    replicate is dropped from that value's interval only."""
    if not groups:
        raise ValueError("no groups to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    point = np.asarray(statistic(np.concatenate(groups)), dtype=float)
    values = np.full((n_boot, point.size), np.nan)
    for b in range(n_boot):
        pick = rng.integers(len(groups), size=len(groups))
        values[b] = statistic(np.concatenate([groups[k] for k in pick]))
    tail = (1 - level) / 2 * 100
    low, high = np.full(point.size, np.nan), np.full(point.size, np.nan)
    for j in range(point.size):
        finite = values[np.isfinite(values[:, j]), j]
        if finite.size:
            low[j], high[j] = np.percentile(finite, [tail, 100 - tail])
    return point, low, high
