"""Segmentation metrics per structure (Cao et al. 2022's Table 2: DSC, PPV, LTPR, LFPR), with bootstrap intervals
over subjects.

For one scan and one structure class (the vertebral bodies, the discs; a label of the label maps), with P the
predicted voxels of the class and G the true ones:

- DSC = 2 |P n G| / (|P| + |G|) (1 when both are empty, 0 when one is);
- PPV = |P n G| / |P| (undefined when nothing is predicted);
- LTPR, the detection true-positive rate: the share of the true structures (connected components of G) that some
  predicted voxel overlaps;
- LFPR, the detection false-positive rate: the share of the predicted components (of P) that overlap no true voxel.

Over a set of scans DSC and PPV are the mean of the scans' values (a scan where PPV is undefined is left out of its
mean), LTPR and LFPR pool the structures of every scan (detected over all true structures, false over all predicted
components). Intervals: percentile bootstrap over subjects (a subject's scans are drawn together).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from stages.evaluation.metrics import bootstrap_interval

TALLY_COLUMNS = ("intersection", "predicted", "truth", "true_structures", "detected", "predicted_structures",
                 "false_structures")
METRICS = ("dice", "ppv", "ltpr", "lfpr")


@dataclass(frozen=True)
class Tally:
    """The counts of one scan and one structure class that its metrics are made of."""

    intersection: int
    predicted: int
    truth: int
    true_structures: int
    detected: int
    predicted_structures: int
    false_structures: int


def tally(predicted: np.ndarray, truth: np.ndarray) -> Tally:
    """The counts of boolean masks ``predicted`` and ``truth`` of one class (same shape; components are face
    connected)."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction and truth differ in shape: {predicted.shape} and {truth.shape}")
    true_labels, n_true = ndimage.label(truth)
    predicted_labels, n_predicted = ndimage.label(predicted)
    detected = len(np.setdiff1d(np.unique(true_labels[predicted]), [0]))
    overlapping = len(np.setdiff1d(np.unique(predicted_labels[truth]), [0]))
    return Tally(intersection=int((predicted & truth).sum()), predicted=int(predicted.sum()), truth=int(truth.sum()),
                 true_structures=int(n_true), detected=int(detected), predicted_structures=int(n_predicted),
                 false_structures=int(n_predicted - overlapping))


def tally_scan(predicted: np.ndarray, truth: np.ndarray, classes: dict[str, int]) -> pd.DataFrame:
    """One row of counts per structure class (``classes``: name -> label) of one scan's label maps."""
    return pd.DataFrame([{"structure": name, **asdict(tally(predicted == label, truth == label))}
                         for name, label in classes.items()])


def scan_metrics(counts: pd.DataFrame) -> pd.DataFrame:
    """``counts`` (rows of :data:`TALLY_COLUMNS`) with each row's DSC and PPV (NaN where undefined)."""
    counts = counts.copy()
    both = counts.predicted + counts.truth
    counts["dice"] = np.where(both > 0, 2 * counts.intersection / both.where(both > 0, 1), 1.0)
    predicted = counts.predicted.where(counts.predicted > 0, 1)
    counts["ppv"] = np.where(counts.predicted > 0, counts.intersection / predicted, np.nan)
    return counts


def summarise(counts: pd.DataFrame) -> dict[str, float]:
    """The four metrics over the scans of ``counts`` (one structure class; :func:`scan_metrics` columns)."""
    def ratio(num: str, den: str) -> float:
        total = counts[den].sum()
        return float(counts[num].sum() / total) if total > 0 else float("nan")

    return {"dice": float(counts.dice.mean()) if len(counts) else float("nan"),
            "ppv": float(counts.ppv.mean()) if counts.ppv.notna().any() else float("nan"),
            "ltpr": ratio("detected", "true_structures"), "lfpr": ratio("false_structures", "predicted_structures")}


def bootstrap(counts: pd.DataFrame, n_boot: int, level: float, seed: int) -> pd.DataFrame:
    """Per structure class: each metric over every scan of ``counts`` (columns ``subject_id``, ``structure`` and
    :data:`TALLY_COLUMNS`) and its percentile interval over ``n_boot`` resamplings of the subjects
    (:func:`stages.evaluation.metrics.bootstrap_interval`)."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    rows = []
    for structure, group in scan_metrics(counts).groupby("structure", sort=False):
        group = group.reset_index(drop=True)
        groups = [np.asarray(r) for r in group.groupby("subject_id").indices.values()]
        column = {c: group[c].to_numpy(dtype=float) for c in ("dice", "ppv", *TALLY_COLUMNS)}
        statistics = {   # summarise's metrics on the rows r, on arrays (a bootstrap evaluates them many times)
            "dice": lambda r: float(column["dice"][r].mean()) if len(r) else float("nan"),
            "ppv": lambda r: float(np.nanmean(column["ppv"][r])) if np.isfinite(column["ppv"][r]).any()
            else float("nan"),
            "ltpr": lambda r: _ratio(column["detected"][r], column["true_structures"][r]),
            "lfpr": lambda r: _ratio(column["false_structures"][r], column["predicted_structures"][r])}
        for metric in METRICS:
            value, low, high = bootstrap_interval(groups, statistics[metric], n_boot, level, seed)
            rows.append({"structure": structure, "metric": metric, "value": value, "ci_low": low, "ci_high": high,
                         "scans": group.scan_id.nunique() if "scan_id" in group else len(group),
                         "subjects": len(groups)})
    return pd.DataFrame(rows, columns=["structure", "metric", "value", "ci_low", "ci_high", "scans", "subjects"])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    total = denominator.sum()
    return float(numerator.sum() / total) if total > 0 else float("nan")
