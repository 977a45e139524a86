"""Twin heritability with intervals and genotype association of disc traits and embedding components (the
population programme's "statistically associate ... learned representations ... to genetic information"); the twin
models themselves are in stages/evaluation/twins.py.

:func:`heritability` gives the ACE and Falconer estimates with percentile intervals over resampled families.
:func:`snp_scan` tests each SNP (allele dosage 0/1/2) against a trait with covariates: by the Frisch-Waugh-Lovell
theorem the SNP's coefficient in y ~ covariates + SNP is that of the covariate-residualised y on the residualised
dosage; twins are not independent (an MZ pair is one genotype twice), so the model is fitted by generalised least
squares with each kind of family's correlation (MZ, DZ, other) estimated from the covariates-only model, and
Benjamini-Hochberg q values are taken over the SNPs. A robust (sandwich) standard error over the families was tried
first and rejected: with some 40 families and rare alleles it gave 7 times the nominal rate of p < 0.001 on the
demo's null SNPs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.evaluation.metrics import bootstrap_intervals
from stages.evaluation.population import with_q
from stages.evaluation.twins import TwinData, falconer, fit_ace, subset

ESTIMATES = ("h2", "c2", "e2", "falconer_h2", "r_mz", "r_dz")


def no_estimates() -> dict[str, float]:
    """Every estimate of :func:`heritability` and its bounds, NaN (a trait that is not analysed)."""
    return {k: float("nan") for name in ESTIMATES for k in (name, f"{name}_low", f"{name}_high")}


def heritability(data: TwinData, groups: list[np.ndarray], n_boot: int, level: float, seed: int) -> dict[str, float]:
    """ACE and Falconer estimates with percentile intervals over ``n_boot`` resamplings of families (``groups`` from
    :func:`twin_data`): keys h2, c2, e2 (ACE), falconer_h2, r_mz, r_dz, each with ``_low`` and ``_high``, and the
    numbers of pairs and singles."""

    def statistic(codes: np.ndarray) -> np.ndarray:
        part = subset(data, codes)
        fit, moments = fit_ace(part, refine=False), falconer(part)   # a replicate: the grid's optimum
        return np.array([fit.h2, fit.c2, fit.e2, moments["h2"], moments["r_mz"], moments["r_dz"]])

    out: dict[str, float] = dict(data.counts())
    if not groups:
        return out | no_estimates()
    point, low, high = bootstrap_intervals(groups, statistic, n_boot, level, seed)
    fit = fit_ace(data)                                                # the estimate itself: refined
    point[:3] = fit.h2, fit.c2, fit.e2
    for j, name in enumerate(ESTIMATES):
        out |= {name: float(point[j]), f"{name}_low": float(low[j]), f"{name}_high": float(high[j])}
    return out


def family_members(families: np.ndarray) -> list[np.ndarray]:
    """The row indices of each family's members (one pass over the rows)."""
    _, code = np.unique(np.asarray(families), return_inverse=True)
    order = np.argsort(code, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(code[order])) + 1)


def family_correlations(residuals: np.ndarray, families: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """The correlation of ``residuals`` between members of one family, per kind of family (``kinds``, one per
    subject: a family's kind is its first member's), among the families of two or more members: the mean product
    over ordered pairs of members over the mean square of those members (the double-entry intraclass correlation
    for pairs), both about the overall mean; cut to [0, 0.95]; 0 for a kind without such families."""
    r = residuals - residuals.mean()
    totals: dict[str, list[float]] = {}
    for members in family_members(families):
        if len(members) < 2:
            continue
        s = r[members]
        total = totals.setdefault(str(kinds[members[0]]), [0.0, 0.0, 0.0, 0.0])
        total[0] += float(s.sum() ** 2 - np.sum(s * s))      # the sum over ordered pairs i != j
        total[1] += len(members) * (len(members) - 1)
        total[2] += float(np.sum(s * s))
        total[3] += len(members)
    return {kind: float(np.clip((c / n) / (ss / m), 0.0, 0.95)) if ss > 0 else 0.0
            for kind, (c, n, ss, m) in totals.items()}


def whiten(values: np.ndarray, families: np.ndarray, kinds: np.ndarray, rho: dict[str, float]) -> np.ndarray:
    """``values`` (n x p) times Sigma^-1/2 of an exchangeable correlation within each family, Sigma = (1 - rho) I
    + rho J for a family of m members: (I - J/m) / sqrt(1 - rho) + (J/m) / sqrt(1 - rho + m rho)."""
    out = np.array(values, dtype=float, copy=True)
    for members in family_members(families):
        m = len(members)
        c = rho.get(str(kinds[members[0]]), 0.0)
        if m < 2 or c == 0:
            continue
        block = out[members]
        mean = block.mean(axis=0, keepdims=True)
        out[members] = (block - mean) / np.sqrt(1 - c) + mean / np.sqrt(1 - c + m * c)
    return out


def snp_scan(trait: np.ndarray, dosages: np.ndarray, covariates: np.ndarray, families: np.ndarray,
             snps: list[str], kinds: np.ndarray | None = None, min_minor_alleles: int = 5) -> pd.DataFrame:
    """Each SNP (a column of ``dosages``, NaN where not called) against ``trait`` adjusted for ``covariates``
    (n x k, an intercept added), by generalised least squares: members of a family are correlated (MZ twins carry
    one genotype twice), with an exchangeable correlation per kind of family (``kinds``: MZ, DZ, other) estimated
    from the covariates-only model's residuals (:func:`family_correlations`); model and data are whitened with it
    (:func:`whiten`) and each SNP's coefficient per allele, standard error, t and two-sided p (on F - k - 2 degrees
    of freedom, F families, k covariates) come from least squares on the whitened data (by Frisch-Waugh-Lovell: the
    covariates are partialled out once for all SNPs). BH q values over the SNPs tested. A SNP's missing dosages are set to its mean (its call
    rate is reported); a SNP with fewer than ``min_minor_alleles`` copies of its minor allele in the sample is not
    tested (NaN; rare variants in a small cohort rest on a few families)."""
    from scipy.stats import t as student

    y = np.asarray(trait, dtype=float)
    n = len(y)
    g = np.asarray(dosages, dtype=float).reshape(n, -1)
    x = np.column_stack([np.ones(n), np.asarray(covariates, dtype=float).reshape(n, -1)])
    families = np.asarray(families)
    kinds = np.full(n, "family", dtype=object) if kinds is None else np.asarray(kinds, dtype=object)
    called = np.isfinite(g)
    freq = np.nanmean(np.where(called, g, np.nan), axis=0) / 2 if called.any() else np.full(g.shape[1], np.nan)
    g = np.where(called, g, 2 * freq)
    minor = np.minimum(g.sum(axis=0), 2 * n - g.sum(axis=0))
    null_resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    rho = family_correlations(null_resid, families, kinds)
    wy, wx, wg = (whiten(v, families, kinds, rho) for v in (y[:, None], x, g))
    # Frisch-Waugh-Lovell: residualise the whitened trait and every whitened SNP on the whitened covariates once
    q, _ = np.linalg.qr(wx)
    ry = (wy - q @ (q.T @ wy))[:, 0]
    rg = wg - q @ (q.T @ wg)
    ss = np.sum(rg * rg, axis=0)
    ok = (ss > 1e-9 * n) & (minor >= min_minor_alleles)
    beta = np.where(ok, rg.T @ ry / np.where(ok, ss, 1), np.nan)
    # residual degrees of freedom n - k - 1; the t test's over families, F - k - 1: the families' correlations are
    # estimated from few families, and t on n - k - 1 rejected up to 2.6 times as often as it should at p < 0.001 in
    # a demo-sized cohort (24 pairs, 12 singles; simulated)
    sigma2 = (np.sum(ry * ry) - beta**2 * ss) / max(n - x.shape[1] - 1, 1)
    df = max(len(np.unique(families)) - x.shape[1] - 1, 1)
    se = np.sqrt(sigma2 / np.where(ok, ss, np.nan))
    t = beta / se
    p = 2 * student.sf(np.abs(t), df=df)
    table = pd.DataFrame({"snp": snps, "beta": beta, "se": se, "t": t, "p": p, "n": n,
                          "call_rate": called.mean(axis=0), "allele_frequency": freq, "minor_alleles": minor})
    return with_q(table).assign(**{f"rho_{k}": v for k, v in sorted(rho.items())})
