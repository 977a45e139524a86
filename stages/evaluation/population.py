"""Subgroups and associations in an encoder's representation of the cohort (the population analysis).

Subject embeddings: each disc's features centred on its level's mean (the level is anatomy, not a subject's trait),
averaged over the discs of a scan, standardised and reduced by PCA (fitted on the subjects' baseline scans) to
``components`` dimensions; a subject is its baseline (first) scan.

- **Subgroups**: a Gaussian mixture (``covariance``, ``n_init`` starts) for each number of groups 1..``max_groups``
  (at most one per 5 subjects), the number chosen by the Bayesian information criterion, BIC = -2 ln L + p ln n
  (lowest wins, scikit-learn's ``GaussianMixture.bic``). Stability: ``bootstrap`` resamplings of the subjects with
  replacement, the mixture with the chosen number refitted on each and every subject assigned by it, against the
  full-data groups by the adjusted Rand index (1: the same partition, about 0: chance agreement).
- **Enrichment**: each group against the rest, for each covariate: a categorical one (sex, vendor, field strength,
  herniation) per category by Fisher's exact test on the 2 x 2 table (in the group or not, in the category or not),
  with its odds ratio (a covariate of two categories is tested once, for its second category; of one, not at all); a
  continuous one (age, mean grade) by the Mann-Whitney U test, with the difference of medians.
- **Associations**: each of the leading ``pcs`` components against each covariate: a continuous covariate by the
  Pearson correlation (its t test), a categorical one by one-way ANOVA (F test, eta squared).
- Each family of tests (enrichment; associations) gets its own Benjamini-Hochberg q values (scipy's
  ``false_discovery_control``): the false-discovery rate is controlled within each family, not over both together.
- **Scanner confound**: can field strength and vendor be read from the scans' embeddings? A linear discriminant
  (Ledoit-Wolf shrinkage, equal priors; closed form, so that the permutations stay cheap), cross-validated over
  subjects (a subject's scans in one fold), balanced accuracy against chance (1 / classes) with a permutation p value
  (``permutations`` times each subject handed another subject's labels, the folds kept).
- **Longitudinal change**: for each subject with scans at two or more times, the distance its embedding moved from
  the first to the last scan per year, against the change of its mean disc grade per year: Spearman's rho with a
  bootstrap interval over subjects.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.evaluation.metrics import bootstrap_interval

CATEGORICAL = ("sex", "vendor", "field_strength", "herniation")
CONTINUOUS = ("age_years", "mean_grade")
SCANNER = ("field_strength", "vendor")
SUBJECTS_PER_GROUP = 5   # the mixture tries at most one group per this many subjects


@dataclass
class Embedding:
    """Scan-level embeddings ``z`` ``(n_scans, components)`` with their ``scans`` table (scan_id, subject_id, years
    since the subject's first scan, baseline flag and covariates) and the PCA's explained variance ratios."""

    scans: pd.DataFrame
    z: np.ndarray
    explained: np.ndarray

    @property
    def baseline(self) -> tuple[pd.DataFrame, np.ndarray]:
        """One row per subject: its first scan."""
        keep = self.scans.baseline.to_numpy()
        return self.scans[keep].reset_index(drop=True), self.z[keep]


def scan_features(features: np.ndarray, discs: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Each scan's mean of its discs' ``features`` after centring every disc on its level's mean; ``discs`` holds
    ``row`` (into ``features``), ``scan_id`` and ``level``. Returns the scans (in order of first appearance) and their
    ``(n_scans, D)`` features."""
    x = np.asarray(features[discs.row.to_numpy()], dtype=np.float64)
    levels = discs.level.to_numpy()
    for level in np.unique(levels):
        x[levels == level] -= x[levels == level].mean(axis=0)
    codes, scans = pd.factorize(discs.scan_id)
    sums = np.zeros((len(scans), x.shape[1]))
    np.add.at(sums, codes, x)
    counts = np.bincount(codes, minlength=len(scans))
    return pd.DataFrame({"scan_id": scans, "discs": counts}), sums / counts[:, None]


def embed(x: np.ndarray, scans: pd.DataFrame, components: int) -> Embedding:
    """Standardise and reduce the scans' features ``x``, both fitted on the baseline scans (``scans.baseline``)."""
    from sklearn.decomposition import PCA

    base = x[scans.baseline.to_numpy()]
    centre, scale = base.mean(axis=0), base.std(axis=0)
    scale[scale == 0] = 1.0
    k = max(1, min(components, len(base) - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="full").fit((base - centre) / scale)
    return Embedding(scans.reset_index(drop=True), pca.transform((x - centre) / scale), pca.explained_variance_ratio_)


def fit_mixture(z: np.ndarray, groups: int, covariance: str, seed: int, n_init: int = 5):
    from sklearn.mixture import GaussianMixture

    # the covariance floor relative to the data's spread: a group of two or three subjects cannot shrink to a point
    # and buy a likelihood (and a BIC) out of nothing
    floor = 1e-3 * float(np.mean(np.var(z, axis=0))) or 1e-6
    return GaussianMixture(groups, covariance_type=covariance, n_init=n_init, random_state=seed,
                           reg_covar=floor).fit(z)


def choose_groups(z: np.ndarray, max_groups: int, covariance: str, seed: int) -> tuple[int, list[float], np.ndarray]:
    """The number of groups with the lowest BIC among 1..``max_groups`` (fewer when the subjects are few: at most one
    group per :data:`SUBJECTS_PER_GROUP` subjects), each BIC, and the chosen mixture's groups."""
    top = max(1, min(max_groups, len(z) // SUBJECTS_PER_GROUP))
    models = [fit_mixture(z, k, covariance, seed) for k in range(1, top + 1)]
    bic = [float(m.bic(z)) for m in models]
    best = int(np.argmin(bic))
    return best + 1, bic, models[best].predict(z)


def bootstrap_stability(z: np.ndarray, groups: int, labels: np.ndarray, covariance: str, n_boot: int, seed: int,
                        level: float = 0.95) -> dict:
    """Adjusted Rand index between the full-data ``labels`` and the groups a mixture refitted on each bootstrap
    resample of the subjects assigns to every subject: mean and percentile interval."""
    from sklearn.metrics import adjusted_rand_score

    if groups < 2:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "replicates": 0,
                "note": "one group: no partition to compare"}
    rng = np.random.default_rng(seed)
    values = []
    for b in range(n_boot):
        pick = rng.integers(len(z), size=len(z))
        if len(np.unique(pick)) <= groups:
            continue
        model = fit_mixture(z[pick], groups, covariance, seed + 1 + b)   # as many starts as the full fit
        values.append(adjusted_rand_score(labels, model.predict(z)))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) if values else (np.nan, np.nan)
    return {"mean": float(np.mean(values)) if values else float("nan"), "ci": [float(low), float(high)],
            "replicates": len(values)}


def with_q(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with Benjamini-Hochberg q values of its ``p`` column (NaN p values stay NaN and do not count)."""
    from scipy.stats import false_discovery_control

    q = np.full(len(table), np.nan)
    ok = table.p.notna().to_numpy()
    if ok.any():
        q[ok] = false_discovery_control(table.p.to_numpy()[ok], method="bh")
    return table.assign(q=q)


def enrichment(groups: np.ndarray, covariates: pd.DataFrame) -> pd.DataFrame:
    """Each group against the rest for each covariate column present (:data:`CATEGORICAL` per category by Fisher's
    exact test, :data:`CONTINUOUS` by Mann-Whitney U), with BH q values over all the tests."""
    from scipy.stats import fisher_exact, mannwhitneyu

    rows = []
    found = np.unique(groups)
    # one group: no rest to compare with; two: group 1 against group 0 (group 0's tests would mirror them)
    for g in found[1:] if len(found) == 2 else found if len(found) > 2 else []:
        inside = groups == g
        for column in CATEGORICAL:
            if column not in covariates:
                continue
            values = covariates[column]
            known = values.notna().to_numpy()
            categories = sorted(values[known].astype(str).unique())
            # one category: nothing to test; two: one test (the second category's, the first's mirrors it)
            for category in categories[1:] if len(categories) == 2 else categories if len(categories) > 2 else []:
                hit = (values.astype(str) == category).to_numpy() & known
                table = [[int((inside & hit).sum()), int((inside & known & ~hit).sum())],
                         [int((~inside & hit).sum()), int((~inside & known & ~hit).sum())]]
                odds, p = fisher_exact(table) if known.sum() and 0 < hit.sum() < known.sum() else (np.nan, np.nan)
                rows.append(dict(group=int(g), covariate=column, category=category, n_group=int((inside & known).sum()),
                                 in_group=table[0][0] / max(1, table[0][0] + table[0][1]),
                                 in_rest=table[1][0] / max(1, table[1][0] + table[1][1]),
                                 effect=float(odds), effect_kind="odds ratio", p=float(p)))
        for column in CONTINUOUS:
            if column not in covariates:
                continue
            values = covariates[column].to_numpy(dtype=float)
            a, b = values[inside & np.isfinite(values)], values[~inside & np.isfinite(values)]
            p = float(mannwhitneyu(a, b).pvalue) if len(a) and len(b) else np.nan
            rows.append(dict(group=int(g), covariate=column, category="", n_group=len(a),
                             in_group=float(np.median(a)) if len(a) else np.nan,
                             in_rest=float(np.median(b)) if len(b) else np.nan,
                             effect=float(np.median(a) - np.median(b)) if len(a) and len(b) else np.nan,
                             effect_kind="difference of medians", p=p))
    columns = ["group", "covariate", "category", "n_group", "in_group", "in_rest", "effect", "effect_kind", "p"]
    return with_q(pd.DataFrame(rows, columns=columns))


def associations(z: np.ndarray, covariates: pd.DataFrame, pcs: int) -> pd.DataFrame:
    """Each of the first ``pcs`` components against each covariate present: Pearson's r (continuous) or one-way
    ANOVA's eta squared (categorical), with their p values and BH q values over all the tests."""
    from scipy.stats import f_oneway, pearsonr

    rows = []
    for k in range(min(pcs, z.shape[1])):
        pc = z[:, k]
        for column in CONTINUOUS:
            if column not in covariates:
                continue
            x = covariates[column].to_numpy(dtype=float)
            ok = np.isfinite(x)
            if ok.sum() < 3 or np.ptp(x[ok]) == 0:
                continue
            r, p = pearsonr(x[ok], pc[ok])
            rows.append(dict(component=k + 1, covariate=column, effect=float(r), effect_kind="Pearson r",
                             n=int(ok.sum()), p=float(p)))
        for column in CATEGORICAL:
            if column not in covariates:
                continue
            values = covariates[column]
            ok = values.notna().to_numpy()
            levels = [pc[ok & (values.astype(str) == c).to_numpy()] for c in sorted(values[ok].astype(str).unique())]
            levels = [v for v in levels if len(v)]
            if len(levels) < 2 or ok.sum() <= len(levels):
                continue
            with warnings.catch_warnings():   # a constant component within every level: F undefined, p NaN
                warnings.simplefilter("ignore")
                p = float(f_oneway(*levels).pvalue)
            grand = pc[ok].mean()
            between = sum(len(v) * (v.mean() - grand) ** 2 for v in levels)
            total = float(((pc[ok] - grand) ** 2).sum())
            rows.append(dict(component=k + 1, covariate=column, effect=between / total if total else np.nan,
                             effect_kind="eta squared", n=int(ok.sum()), p=p))
    columns = ["component", "covariate", "effect", "effect_kind", "n", "p"]
    return with_q(pd.DataFrame(rows, columns=columns))


def scanner_confound(z: np.ndarray, labels: pd.Series, subjects: pd.Series, folds: int, permutations: int,
                     seed: int) -> dict:
    """Cross-validated balanced accuracy of a shrinkage linear discriminant reading ``labels`` from ``z`` (folds over
    subjects), chance, and the permutation p value; a label with one class, or too few subjects for two folds, is
    skipped with the reason.

    The null keeps each subject's scans together: a permutation hands each subject the label sequence of another
    subject with as many scans (a label belongs to a subject's scans, which lie close in the embedding; shuffling
    single scans would give a null narrower than the truth's and p values too small). The folds are fixed, drawn
    once from the true labels; p = (1 + #{permuted score >= score}) / (1 + permutations)."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold

    known = labels.notna().to_numpy()
    y, groups = labels[known].astype(str).to_numpy(), subjects[known].to_numpy()
    classes = np.unique(y)
    # at most as many folds as the rarest class has subjects, so that every fold can hold each class
    rarest = min((len(np.unique(groups[y == c])) for c in classes), default=0)
    n_folds = min(folds, rarest)
    if len(classes) < 2 or n_folds < 2:
        return {"skipped": f"{len(classes)} class(es), the rarest in {rarest} subject(s) (2 folds need 2)"}
    x = z[known]
    splits = list(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(x, y, groups))

    def cross_validated(labels_: np.ndarray) -> float:
        scores = []
        for train, test in splits:
            predicted = _equal_prior_lda().fit(x[train], labels_[train]).predict(x[test])
            with warnings.catch_warnings():   # a fold without some class: its recall is left out, as scikit-learn does
                warnings.simplefilter("ignore")
                scores.append(balanced_accuracy_score(labels_[test], predicted))
        return float(np.mean(scores))

    subjects_ = pd.Series(np.arange(len(y))).groupby(groups, sort=True).apply(list)
    by_size: dict[int, list[list[int]]] = {}
    for rows in subjects_:
        by_size.setdefault(len(rows), []).append(rows)
    rng = np.random.default_rng(seed)
    score = cross_validated(y)
    permuted = []
    for _ in range(permutations):
        shuffled = y.copy()
        for members in by_size.values():
            for rows, donor in zip(members, rng.permutation(len(members))):
                shuffled[rows] = y[members[donor]]
        permuted.append(cross_validated(shuffled))
    p = (1 + sum(s >= score for s in permuted)) / (1 + permutations)
    return {"balanced_accuracy": float(score), "chance": 1 / len(classes), "p": float(p), "classes": len(classes),
            "scans": int(known.sum()), "folds": n_folds, "permuted_mean": float(np.mean(permuted)),
            "counts": {str(c): int((y == c).sum()) for c in classes}}


def _equal_prior_lda():
    """A Ledoit-Wolf shrinkage linear discriminant with equal priors over the classes of the labels it is fitted on
    (the balanced accuracy's view of the classes; a training fold may lack a rare class)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    class EqualPriorLDA(LinearDiscriminantAnalysis):
        def fit(self, X, y):   # noqa: N803 (scikit-learn's names)
            present = len(np.unique(y))
            self.priors = np.full(present, 1 / present)
            return super().fit(X, y)

    return EqualPriorLDA(solver="lsqr", shrinkage="auto")


def longitudinal_change(embedding: Embedding, grades: pd.Series, n_boot: int, level: float, seed: int
                        ) -> tuple[pd.DataFrame, dict]:
    """Per subject with scans at two or more times: years between its first and last scan, the distance its
    embedding moved per year and its mean grade's change per year (``grades``: mean grade per scan_id); Spearman's rho
    between them with a bootstrap interval over subjects."""
    from scipy.stats import spearmanr

    scans = embedding.scans.assign(i=np.arange(len(embedding.scans)), grade=embedding.scans.scan_id.map(grades))
    rows = []
    for subject, own in scans[scans.years.notna()].sort_values("years").groupby("subject_id", sort=True):
        first, last = own.iloc[0], own.iloc[-1]
        years = float(last.years - first.years)
        if years <= 0:
            continue
        rows.append(dict(subject_id=subject, years=years,
                         embedding_per_year=float(np.linalg.norm(embedding.z[last.i] - embedding.z[first.i])) / years,
                         grade_per_year=float(last.grade - first.grade) / years))
    table = pd.DataFrame(rows, columns=["subject_id", "years", "embedding_per_year", "grade_per_year"])
    table = table.dropna()
    if len(table) < 3:
        return table, {"skipped": f"{len(table)} subject(s) with graded scans at two times (at least 3 needed)"}

    def rho(idx: np.ndarray) -> float:
        a, b = table.embedding_per_year.to_numpy()[idx], table.grade_per_year.to_numpy()[idx]
        return float(spearmanr(a, b).statistic) if np.ptp(a) and np.ptp(b) else float("nan")

    value, low, high = bootstrap_interval([np.array([k]) for k in range(len(table))], rho, n_boot, level, seed)
    return table, {"subjects": len(table), "spearman": {"value": value, "ci": [low, high]},
                   "median_years": float(table.years.median())}
