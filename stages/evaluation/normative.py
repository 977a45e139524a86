"""A normative model of healthy discs in an encoder's representation, and how far each disc deviates from it.

The reference is the healthy discs (Pfirrmann grade at most ``healthy_max_grade``) of the downstream training
subjects. Their features are standardised and reduced by PCA (both fitted on the reference alone) to ``components``
dimensions; each level then gets its own mean and covariance there (Ledoit-Wolf shrinkage, which stays invertible
with few discs); a level with fewer than ``min_per_level`` reference discs uses the model of all levels pooled (said
in ``model_of``). A disc's deviation is its Mahalanobis distance to its level's model,
d = sqrt((z - mu)^T Sigma^{-1} (z - mu)).

How deviation rises with grade and age, on the held-out discs: the mean deviation per grade, Spearman's rho between
deviation and grade, and the least-squares slope of deviation on age (per decade), each with a percentile bootstrap
interval over subjects (a subject's discs are drawn together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stages.evaluation.metrics import bootstrap_interval

POOLED = "all levels"


@dataclass
class NormativeModel:
    """The fitted reference: standardisation, PCA, and per model (a level, or :data:`POOLED`) its mean and inverse
    covariance in PCA space, with the reference discs it was fitted on."""

    centre: np.ndarray
    scale: np.ndarray
    pca: Any
    means: dict[str, np.ndarray]
    precisions: dict[str, np.ndarray]
    counts: dict[str, int]

    def reduce(self, features: np.ndarray) -> np.ndarray:
        return self.pca.transform((np.asarray(features, dtype=np.float64) - self.centre) / self.scale)

    def model_of(self, level: str) -> str:
        return level if level in self.means else POOLED

    def deviation(self, features: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of ``features`` to the model of its level."""
        z = self.reduce(features)
        out = np.empty(len(z))
        for i, level in enumerate(levels):
            key = self.model_of(str(level))
            diff = z[i] - self.means[key]
            out[i] = float(np.sqrt(max(diff @ self.precisions[key] @ diff, 0.0)))
        return out


def fit_normative(features: np.ndarray, levels: np.ndarray, components: int, min_per_level: int) -> NormativeModel:
    """Fit the model on the reference discs' ``features`` ``(n, D)`` and their ``levels``."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA
    x = np.asarray(features, dtype=np.float64)
    levels = np.asarray(levels).astype(str)
    if len(x) < 3:
        raise ValueError(f"the normative model needs at least 3 healthy reference discs, got {len(x)}: raise "
                         "normative.healthy_max_grade or grade more training discs")
    centre, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    k = max(1, min(components, len(x) - 1, x.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit((x - centre) / scale)
    z = pca.transform((x - centre) / scale)
    means, precisions, counts = {}, {}, {}
    groups = [(POOLED, np.ones(len(z), dtype=bool))] + [
        (lv, levels == lv) for lv in sorted(set(levels)) if (levels == lv).sum() >= min_per_level]
    for name, chosen in groups:
        fit = LedoitWolf().fit(z[chosen])
        means[name], precisions[name], counts[name] = fit.location_, fit.precision_, int(chosen.sum())
    return NormativeModel(centre, scale, pca, means, precisions, counts)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def trend_figures(table: pd.DataFrame) -> dict[str, Any]:
    """Mean deviation per grade, Spearman's rho with grade and the slope per decade of age, of ``table``'s discs
    (columns ``deviation``, ``grade``, ``age_years``)."""
    graded = table[table.grade.notna()]
    return {"by_grade": {int(g): float(d.mean()) for g, d in graded.groupby("grade").deviation},
            "spearman_grade": _spearman(graded.deviation.to_numpy(), graded.grade.to_numpy(dtype=float)),
            "slope_per_decade": 10 * _slope(table.age_years.to_numpy(dtype=float), table.deviation.to_numpy())}


def bootstrap_trends(table: pd.DataFrame, n_boot: int, level: float, seed: int) -> dict[str, Any]:
    """:func:`trend_figures` of ``table`` (with ``subject_id``) and their percentile intervals over ``n_boot``
    resamplings of its subjects (:func:`stages.evaluation.metrics.bootstrap_interval`, the same draws for every
    figure)."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    table = table.reset_index(drop=True)
    deviation = table.deviation.to_numpy(dtype=float)
    grade = table.grade.to_numpy(dtype=float)
    age = table.age_years.to_numpy(dtype=float)
    groups = [np.asarray(rows) for rows in table.groupby("subject_id").indices.values()]
    point = trend_figures(table)

    def interval(statistic: Callable[[np.ndarray], float]) -> list[float | None]:
        _, low, high = bootstrap_interval(groups, statistic, n_boot, level, seed)
        return [low, high] if np.isfinite(low) else [None, None]

    def grade_mean(g: int) -> Callable[[np.ndarray], float]:
        def mean(rows: np.ndarray) -> float:
            chosen = deviation[rows][grade[rows] == g]
            return float(chosen.mean()) if len(chosen) else float("nan")
        return mean

    def rho(rows: np.ndarray) -> float:
        graded = ~np.isnan(grade[rows])
        return _spearman(deviation[rows][graded], grade[rows][graded])

    return {"ci_level": level, "replicates": n_boot, "subjects": len(groups), "discs": len(table),
            "by_grade": {g: {"mean": point["by_grade"][g], "ci": interval(grade_mean(g)),
                             "discs": int((table.grade == g).sum())} for g in sorted(point["by_grade"])},
            "spearman_grade": {"value": point["spearman_grade"], "ci": interval(rho)},
            "slope_per_decade": {"value": point["slope_per_decade"],
                                 "ci": interval(lambda rows: 10 * _slope(age[rows], deviation[rows]))}}
