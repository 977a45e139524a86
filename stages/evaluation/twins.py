"""The classical twin design (Neale and Cardon 1992; Falconer and Mackay 1996): a trait's variance is the sum of an
additive genetic part ``a``, a part of the environment twins share ``c`` and a unique part ``e``. Monozygotic (MZ)
twins share all of ``a``, dizygotic (DZ) twins half of it on average, both all of ``c``:

    var = a + c + e,    cov(MZ twins) = a + c,    cov(DZ twins) = a / 2 + c,

heritability h2 = a / var, c2 = c / var, e2 = e / var. :func:`fit_ace` fits the three parts and the mean by maximum
likelihood, pairs as bivariate normal and singletons (or twins whose co-twin has no value) as univariate normal;
:func:`falconer` gives the moment estimates h2 = 2 (r_MZ - r_DZ), c2 = 2 r_DZ - r_MZ, e2 = 1 - r_MZ from intraclass
correlations. Intervals and the SNP scan: stages/evaluation/genetics.py; inherited genotypes for the demo cohort:
stages/demo/genome.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

ZYGOSITIES = ("MZ", "DZ")
GENETIC_SHARE = {"MZ": 1.0, "DZ": 0.5}  # share of the additive genetic part a pair has in common


@dataclass(frozen=True)
class TwinData:
    """One trait's values arranged by family: complete MZ and DZ pairs (n x 2) and everyone else (singletons, twins
    of unknown zygosity, twins whose co-twin has no value)."""

    mz: np.ndarray
    dz: np.ndarray
    single: np.ndarray

    def counts(self) -> dict[str, int]:
        return {"mz_pairs": len(self.mz), "dz_pairs": len(self.dz), "singles": len(self.single)}


def twin_data(values: pd.Series, families: pd.DataFrame) -> tuple[TwinData, list[np.ndarray]]:
    """Arrange ``values`` (indexed by subject_id; NaN is no value) by ``families`` (columns subject_id, family_id,
    zygosity MZ/DZ/empty). Returns the data and, per family, the rows it contributes, as integer codes
    ``[kind, i]`` (kind 0 MZ pair, 1 DZ pair, 2 single) for :func:`subset`."""
    values = values.dropna()
    fam = families.drop_duplicates("subject_id").set_index("subject_id")
    table = pd.DataFrame({"value": values})
    table["family"] = [fam.family_id.get(s, s) if isinstance(fam.family_id.get(s, s), str) else s
                       for s in table.index] if "family_id" in fam else table.index
    zyg = fam.zygosity if "zygosity" in fam else pd.Series(dtype=object)
    table["zygosity"] = [str(zyg.get(s, "")).strip().upper() if pd.notna(zyg.get(s, np.nan)) else ""
                         for s in table.index]
    rows: dict[str, list[list[float]]] = {"MZ": [], "DZ": [], "single": []}
    groups = []
    for _, members in table.groupby("family", sort=True):
        codes = []
        kinds = set(members.zygosity)
        if len(members) >= 2 and len(kinds) == 1 and (kind := kinds.pop()) in ZYGOSITIES:
            codes.append([ZYGOSITIES.index(kind), len(rows[kind])])
            rows[kind].append(members.value.iloc[:2].tolist())
            rest = members.value.iloc[2:]
        else:
            rest = members.value
        for v in rest:
            codes.append([2, len(rows["single"])])
            rows["single"].append([v])
        groups.append(np.array(codes, dtype=int))
    data = TwinData(np.array(rows["MZ"], dtype=float).reshape(-1, 2), np.array(rows["DZ"], dtype=float).reshape(-1, 2),
                    np.array(rows["single"], dtype=float).reshape(-1))
    return data, groups


def subset(data: TwinData, codes: np.ndarray) -> TwinData:
    """The pairs and singles named by ``codes`` (rows ``[kind, i]`` of :func:`twin_data`), repeats kept."""
    codes = np.asarray(codes, dtype=int).reshape(-1, 2)
    return TwinData(data.mz[codes[codes[:, 0] == 0, 1]], data.dz[codes[codes[:, 0] == 1, 1]],
                    data.single[codes[codes[:, 0] == 2, 1]])


def ace_loglik(a: float, c: float, e: float, mean: float, data: TwinData) -> float:
    """Log-likelihood of the ACE model: pairs bivariate normal with variance a + c + e and covariance a + c (MZ) or
    a / 2 + c (DZ), singles univariate normal."""
    var = a + c + e
    total = 0.0
    for pairs, share in ((data.mz, GENETIC_SHARE["MZ"]), (data.dz, GENETIC_SHARE["DZ"])):
        if len(pairs):
            cov = share * a + c
            det = var * var - cov * cov
            d1, d2 = pairs[:, 0] - mean, pairs[:, 1] - mean
            quad = (var * (d1 * d1 + d2 * d2) - 2 * cov * d1 * d2) / det
            total += float(np.sum(-np.log(2 * np.pi) - 0.5 * np.log(det) - 0.5 * quad))
    if len(data.single):
        d = data.single - mean
        total += float(np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * d * d / var))
    return total


@dataclass(frozen=True)
class AceFit:
    h2: float
    c2: float
    e2: float
    variance: float
    mean: float
    loglik: float


GRID_STEP = 0.005   # of the (h2, c2) grid the profile likelihood is searched on


def profile_loglik(h2: np.ndarray, c2: np.ndarray, data: TwinData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ACE log-likelihood maximised over the mean and the total variance for each proportion pair (h2, c2)
    (arrays of one shape; e2 = 1 - h2 - c2 > 0): with the twins' correlations r = h2 + c2 (MZ) and h2 / 2 + c2 (DZ)
    fixed, the mean is the generalised least-squares mean (a pair weighs 2 / (1 + r), a single 1) and the variance
    the quadratic form over the number of values. Returns the log-likelihoods, the means and the variances."""
    h2, c2 = np.broadcast_arrays(np.asarray(h2, dtype=float), np.asarray(c2, dtype=float))
    shape = h2.shape
    h2, c2 = h2.reshape(-1, 1), c2.reshape(-1, 1)
    parts = [(data.mz, h2 + c2), (data.dz, h2 / 2 + c2)]
    weight = np.full(h2.shape, float(len(data.single)))
    total = np.full(h2.shape, float(data.single.sum()))
    for pairs, r in parts:
        weight = weight + 2 * len(pairs) / (1 + r)
        total = total + pairs.sum() / (1 + r)
    mean = total / weight
    quad = ((data.single[None, :] - mean) ** 2).sum(axis=1, keepdims=True)
    logdet = np.zeros(h2.shape)
    for pairs, r in parts:
        if len(pairs):
            d1, d2 = pairs[None, :, 0] - mean, pairs[None, :, 1] - mean
            quad = quad + ((d1 * d1 + d2 * d2 - 2 * r * d1 * d2) / (1 - r * r)).sum(axis=1, keepdims=True)
            logdet = logdet + len(pairs) * np.log(1 - r * r)
    n = len(data.single) + 2 * (len(data.mz) + len(data.dz))
    variance = quad / n
    loglik = -0.5 * n * (np.log(2 * np.pi * variance) + 1) - 0.5 * logdet
    return loglik.reshape(shape), mean.reshape(shape), variance.reshape(shape)


def fit_ace(data: TwinData, refine: bool = True) -> AceFit:
    """Maximum-likelihood ACE fit: the profile likelihood (:func:`profile_loglik`) on a grid of proportions h2, c2
    >= 0 with e2 > 0 (step :data:`GRID_STEP`), its best point then refined by a bounded local search (``refine``; a
    bootstrap replicate keeps the grid's). NaN fit with fewer than two MZ and two DZ pairs (A and C cannot be told
    apart: with MZ pairs alone any split of their covariance fits as well) or no spread."""
    from scipy.optimize import minimize

    everything = np.concatenate([data.mz.ravel(), data.dz.ravel(), data.single])
    nan = AceFit(*(float("nan"),) * 6)
    if min(len(data.mz), len(data.dz)) < 2 or np.ptp(everything) == 0:
        return nan
    steps = np.arange(0, 1 + GRID_STEP / 2, GRID_STEP)
    h2, c2 = np.meshgrid(steps, steps, indexing="ij")
    inside = h2 + c2 <= 1 - GRID_STEP / 2
    h2, c2 = h2[inside], c2[inside]
    loglik, _, _ = profile_loglik(h2, c2, data)
    best = int(np.argmax(loglik))
    point = np.array([h2[best], c2[best]])
    if refine:
        def negative(theta: np.ndarray) -> float:
            if theta.sum() >= 1 - 1e-6:
                return 1e12
            return -float(profile_loglik(theta[0], theta[1], data)[0])

        result = minimize(negative, point, method="L-BFGS-B", bounds=[(0, 1 - 1e-6)] * 2,
                          options={"ftol": 1e-13, "gtol": 1e-9})
        if result.fun <= -loglik[best]:
            point = result.x
    value, mean, variance = (float(v) for v in profile_loglik(point[0], point[1], data))
    return AceFit(h2=float(point[0]), c2=float(point[1]), e2=float(1 - point.sum()), variance=variance, mean=mean,
                  loglik=value)


def intraclass(pairs: np.ndarray) -> float:
    """Intraclass correlation of pairs: the Pearson correlation of the double-entered pairs (each pair in both
    orders), NaN with fewer than two pairs or no spread."""
    if len(pairs) < 2:
        return float("nan")
    x = np.concatenate([pairs[:, 0], pairs[:, 1]])
    y = np.concatenate([pairs[:, 1], pairs[:, 0]])
    if np.ptp(x) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def falconer(data: TwinData) -> dict[str, float]:
    """Falconer's estimates from the MZ and DZ intraclass correlations."""
    r_mz, r_dz = intraclass(data.mz), intraclass(data.dz)
    return {"r_mz": r_mz, "r_dz": r_dz, "h2": 2 * (r_mz - r_dz), "c2": 2 * r_dz - r_mz, "e2": 1 - r_mz}
