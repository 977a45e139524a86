"""Subgroups and associations (the population analysis): planted groups found by BIC and stable under the bootstrap,
their planted enrichment found and a null covariate not, Benjamini-Hochberg q values and eta squared against their
definitions, planted component-covariate associations, the scanner confound with folds over subjects, longitudinal
change, and the stage's outputs on a synthetic cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.evaluation import population as pop
from stages.population import cohort_scans, main, run

LEVELS = ["L3-L4", "L4-L5", "L5-S1"]


def _planted_groups(rng: np.random.Generator, n: int = 60, groups: int = 3, dim: int = 6, spread: float = 6.0):
    """``n`` subjects in ``groups`` well separated Gaussian groups; group 0 mostly female and group 2 older (the
    planted enrichments); ``noise_label`` unrelated to the groups."""
    truth = np.arange(n) % groups
    centres = rng.normal(size=(groups, dim)) * spread
    z = centres[truth] + rng.normal(size=(n, dim))
    covariates = pd.DataFrame({
        "sex": np.where(truth == 0, np.where(rng.random(n) < 0.9, "F", "M"), np.where(rng.random(n) < 0.2, "F", "M")),
        "age_years": np.where(truth == 2, 65.0, 40.0) + rng.normal(0, 4, n),
        "vendor": rng.choice(["A", "B", "C"], size=n),          # null
        "mean_grade": rng.uniform(1, 5, n),                     # null
    })
    return z, truth, covariates


def test_planted_groups_are_found_by_bic_and_are_stable_under_the_bootstrap():
    from sklearn.metrics import adjusted_rand_score

    z, truth, _ = _planted_groups(np.random.default_rng(0))
    k, bic, labels = pop.choose_groups(z, max_groups=6, covariance="diag", seed=0)
    assert k == 3 and len(bic) == 6 and int(np.argmin(bic)) == 2
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    stability = pop.bootstrap_stability(z, k, labels, "diag", n_boot=40, seed=0)
    assert stability["replicates"] == 40 and stability["mean"] > 0.9 and stability["ci"][0] > 0.7


def test_one_blob_gives_one_group_and_no_stability_figure():
    z = np.random.default_rng(1).normal(size=(40, 4))
    k, _, labels = pop.choose_groups(z, max_groups=5, covariance="diag", seed=0)
    assert k == 1 and set(labels) == {0}
    assert pop.enrichment(labels, pd.DataFrame({"age_years": np.arange(40.0)})).empty
    assert pop.bootstrap_stability(z, k, labels, "diag", 10, 0)["replicates"] == 0


def test_unstable_groups_score_low_under_the_bootstrap():
    # two groups forced on one blob: the partitions of refitted mixtures disagree (ARI well below planted groups')
    z = np.random.default_rng(2).normal(size=(60, 4))
    labels = pop.fit_mixture(z, 2, "diag", 0).predict(z)
    assert pop.bootstrap_stability(z, 2, labels, "diag", 40, 0)["mean"] < 0.7


def test_the_planted_enrichment_is_found_and_the_null_covariates_are_not():
    z, truth, covariates = _planted_groups(np.random.default_rng(3), n=90)
    table = pop.enrichment(truth, covariates)
    found = table[table.q <= 0.05]
    assert {("sex", 0), ("age_years", 2)} <= set(zip(found.covariate, found.group))
    assert not {"vendor", "mean_grade"} & set(found.covariate)
    sex0 = table[(table.covariate == "sex") & (table.group == 0)].iloc[0]
    assert sex0.category == "M" and sex0.effect < 1 and sex0.in_group < sex0.in_rest   # two categories: one test
    assert len(table[(table.covariate == "vendor") & (table.group == 0)]) == 3             # three: one each


def test_q_values_follow_the_benjamini_hochberg_definition():
    # Benjamini & Hochberg 1995: with p values sorted p_(1) <= ... <= p_(m), reject H_(i) for i <= k, the largest i
    # with p_(i) <= (i / m) q. The adjusted value is q_(i) = min_{j >= i} min(1, m p_(j) / j).
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, np.nan, 0.2])
    known = p[~np.isnan(p)]
    m = len(known)
    order = np.argsort(known)
    ranked = known[order] * m / np.arange(1, m + 1)
    expected_sorted = np.minimum(1, np.minimum.accumulate(ranked[::-1])[::-1])
    expected = np.empty(m)
    expected[order] = expected_sorted
    q = pop.with_q(pd.DataFrame({"p": p})).q.to_numpy()
    assert np.isnan(q[5])
    np.testing.assert_allclose(q[~np.isnan(p)], expected)


def test_associations_find_the_planted_component_and_eta_squared_is_its_definition():
    rng = np.random.default_rng(4)
    n = 80
    age = rng.uniform(30, 70, n)
    sex = rng.choice(["F", "M"], n)
    z = np.column_stack([0.1 * age + rng.normal(0, 1, n), rng.normal(size=n), np.where(sex == "F", 2.0, 0.0)
                         + rng.normal(0, 1, n)])
    table = pop.associations(z, pd.DataFrame({"age_years": age, "sex": sex}), pcs=3)
    found = set(zip(table.component[table.q <= 1e-6], table.covariate[table.q <= 1e-6]))
    assert found == {(1, "age_years"), (3, "sex")}
    r = table[(table.component == 1) & (table.covariate == "age_years")].effect.iloc[0]
    assert r == pytest.approx(np.corrcoef(age, z[:, 0])[0, 1])
    # eta^2 = SS_between / SS_total = sum_g n_g (mean_g - mean)^2 / sum_i (y_i - mean)^2
    y = z[:, 2]
    between = sum((sex == g).sum() * (y[sex == g].mean() - y.mean()) ** 2 for g in ("F", "M"))
    eta = table[(table.component == 3) & (table.covariate == "sex")].effect.iloc[0]
    assert eta == pytest.approx(between / ((y - y.mean()) ** 2).sum())


def test_associations_on_null_components_keep_the_false_discovery_rate():
    # every component unrelated to the covariates: a discovery at q <= 0.05 is false, and BH keeps the share of
    # replicates with any (the family-wise rate, which equals the FDR under the complete null) near 0.05
    rng = np.random.default_rng(12)
    any_false = 0
    for _ in range(200):
        covariates = pd.DataFrame({"age_years": rng.uniform(30, 70, 60), "sex": rng.choice(["F", "M"], 60)})
        any_false += bool((pop.associations(rng.normal(size=(60, 4)), covariates, pcs=4).q <= 0.05).any())
    assert any_false / 200 < 0.1


def test_the_scanner_confound_reads_a_planted_vendor_and_not_a_shuffled_one():
    rng = np.random.default_rng(5)
    subjects = pd.Series(np.repeat([f"sub-{i}" for i in range(40)], 2))
    vendor = pd.Series(np.where(np.arange(80) % 4 < 2, "A", "B"))          # a subject's two scans: one vendor
    z = rng.normal(size=(80, 5))
    z[:, 0] += np.where(vendor == "A", 3.0, 0.0)
    planted = pop.scanner_confound(z, vendor, subjects, folds=5, permutations=50, seed=0)
    assert planted["balanced_accuracy"] > 0.85 and planted["p"] < 0.05 and planted["chance"] == 0.5
    null = pop.scanner_confound(rng.normal(size=(80, 5)), vendor, subjects, folds=5, permutations=50, seed=0)
    assert null["balanced_accuracy"] < 0.7 and null["p"] > 0.05
    assert abs(null["permuted_mean"] - 0.5) < 0.1          # the permutation null sits at chance
    one = pop.scanner_confound(z, pd.Series(["A"] * 80), subjects, 5, 10, 0)
    assert "skipped" in one


def test_a_rare_third_vendor_does_not_break_the_discriminant():
    # vendors A x 10, B x 8, C x 2 subjects: a training fold, or a permutation, may lack C
    rng = np.random.default_rng(13)
    vendor = pd.Series(np.repeat(["A"] * 10 + ["B"] * 8 + ["C"] * 2, 2))
    subjects = pd.Series(np.repeat([f"sub-{i}" for i in range(20)], 2))
    result = pop.scanner_confound(rng.normal(size=(40, 4)), vendor, subjects, folds=5, permutations=30, seed=0)
    assert result["classes"] == 3 and result["folds"] == 2 and 0 <= result["balanced_accuracy"] <= 1


def test_the_permutation_null_keeps_a_subjects_scans_together():
    # a label drawn per subject, unrelated to the embedding, and each subject's 4 scans close together (a strong
    # subject effect): p <= 0.05 must come about 5% of the time. Shuffling single scans instead gives a null too
    # narrow for such data and p values too small (about 20% below 0.05 in a reviewer's simulation).
    rng = np.random.default_rng(14)
    small = 0
    for _ in range(40):
        centres = rng.normal(size=(24, 3)) * 3
        z = np.repeat(centres, 4, axis=0) + rng.normal(size=(96, 3)) * 0.3
        label = pd.Series(np.repeat(rng.choice(["1.5 T", "3 T"], 24), 4))
        subjects = pd.Series(np.repeat([f"sub-{i}" for i in range(24)], 4))
        small += pop.scanner_confound(z, label, subjects, folds=4, permutations=19, seed=0)["p"] <= 0.05
    assert small <= 5          # 40 replicates at a 5% rate: 2 expected; 6 or more has probability 0.05


def test_longitudinal_change_follows_a_planted_rate():
    rng = np.random.default_rng(6)
    rows, z = [], []
    for s in range(20):
        rate = rng.uniform(0, 1)
        start = rng.normal(size=3)
        for years in (0.0, 5.0):
            rows.append({"scan_id": f"scan-{s}-{years}", "subject_id": f"sub-{s}", "years": years,
                         "baseline": years == 0, "mean_grade": 2 + rate * years / 5})
            z.append(start + np.array([rate * years, 0, 0]))
    scans = pd.DataFrame(rows)
    embedding = pop.Embedding(scans, np.array(z), np.ones(3) / 3)
    points, change = pop.longitudinal_change(embedding, scans.set_index("scan_id").mean_grade, 100, 0.95, 0)
    assert len(points) == 20 and points.years.eq(5).all()
    assert change["spearman"]["value"] == pytest.approx(1.0) and change["spearman"]["ci"][0] > 0.9
    few = pop.Embedding(scans.head(4), np.array(z[:4]), np.ones(3) / 3)
    assert "skipped" in pop.longitudinal_change(few, scans.set_index("scan_id").mean_grade, 10, 0.95, 0)[1]


def _cohort(rng: np.random.Generator, n_subjects: int = 30) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Subjects with three discs per scan, half of them scanned again 4 years later; two planted groups of subjects
    (group 1: older, its discs' features shifted); each level its own offset (which the analysis removes)."""
    offsets = {lv: rng.normal(size=8) * 5 for lv in LEVELS}
    rows, manifest, features = [], [], []
    for s in range(n_subjects):
        group = s % 2
        for visit in range(1 + (s % 4 < 2)):
            scan = f"scan-{s}-{visit}"
            manifest.append({"scan_id": scan, "subject_id": f"sub-{s}", "age_years": 35.0 + 25 * group + 4 * visit,
                             "sex": "FM"[s % 3 == 0], "manufacturer": ["GE", "SIEMENS"][visit],
                             "field_strength_t": [1.5, 3.0][visit]})
            for level in LEVELS:
                features.append(offsets[level] + 4.0 * group * np.ones(8) + rng.normal(size=8))
                rows.append({"row": len(rows), "scan_id": scan, "subject_id": f"sub-{s}", "kind": "disc",
                             "level": level, "days_since_first_study": 1461 * visit,
                             "pfirrmann": float(2 + group + visit), "herniation": float(visit),
                             "ssl_part": "train" if s < 20 else "test"})
        rows.append({"row": len(rows), "scan_id": f"scan-{s}-0", "subject_id": f"sub-{s}", "kind": "vertebra",
                     "level": "L4", "days_since_first_study": 0, "pfirrmann": np.nan, "herniation": np.nan,
                     "ssl_part": "train" if s < 20 else "test"})
        features.append(np.full(8, 1e6))   # a vertebra: never read
    return pd.DataFrame(rows), pd.DataFrame(manifest), np.array(features, dtype=np.float32)


def _files(tmp_path, volumes, manifest, features):
    paths = {name: tmp_path / name for name in ("volumes.parquet", "manifest.parquet", "pooled.npy")}
    volumes.to_parquet(paths["volumes.parquet"])
    manifest.to_parquet(paths["manifest.parquet"])
    np.save(paths["pooled.npy"], features)
    return paths


def test_scans_are_their_discs_and_subjects_their_baseline_with_covariates():
    volumes, manifest, _ = _cohort(np.random.default_rng(7))
    discs, scans = cohort_scans(volumes, manifest, "all")
    assert set(volumes.set_index("row").loc[discs.row, "kind"]) == {"disc"}
    assert scans.groupby("subject_id").baseline.sum().eq(1).all()
    base = scans[scans.baseline]
    assert base.years.eq(0).all() and set(base.vendor) == {"GE"} and set(base.field_strength) == {"1.5 T"}
    follow = scans[~scans.baseline]
    assert follow.years.round(2).eq(4.0).all() and set(follow.herniation) == {"yes"}
    s0 = scans[scans.scan_id == "scan-1-0"].iloc[0]
    assert s0.mean_grade == 3 and s0.age_years == 60 and s0.herniation == "no"
    # a scan without a date: its subject's baseline is the dated scan; a subject without any date keeps one scan
    undated = volumes.assign(days_since_first_study=np.where(volumes.scan_id.isin(["scan-0-1", "scan-2-0"]), np.nan,
                                                             volumes.days_since_first_study))
    _, partly = cohort_scans(undated, manifest, "all")
    assert partly.groupby("subject_id").baseline.sum().eq(1).all()
    assert partly.set_index("scan_id").loc["scan-0-0", "baseline"] and np.isnan(partly.set_index("scan_id").loc[
        "scan-0-1", "years"])
    assert partly.set_index("scan_id").loc["scan-2-0", "baseline"]      # scan-2-0: subject 2's only scan
    held, _ = cohort_scans(volumes, manifest, "held_out")
    assert set(volumes.set_index("row").loc[held.row, "ssl_part"]) == {"test"}
    with pytest.raises(ValueError, match="subjects must be"):
        cohort_scans(volumes, manifest, "everyone")


def test_the_stage_finds_the_planted_groups_and_writes_its_outputs(tmp_path):
    volumes, manifest, features = _cohort(np.random.default_rng(8))
    paths = _files(tmp_path, volumes, manifest, features)
    out = {"subjects": tmp_path / "p" / "enc.parquet", "tests": tmp_path / "p" / "enc_tests.csv",
           "summary": tmp_path / "p" / "enc.json"}
    summary = run(paths["pooled.npy"], paths["volumes.parquet"], paths["manifest.parquet"], out["subjects"],
                  out["tests"], out["summary"], bootstrap=30, permutations=20, max_groups=4)
    table = pd.read_parquet(out["subjects"])
    assert summary["groups"] == 2 and summary["stability"]["mean"] > 0.9
    group_of_older = table.groupby("group").age_years.mean().idxmax()
    assert set(table.subject_id[table.group == group_of_older]) == {f"sub-{s}" for s in range(1, 30, 2)}
    assert {"age_years", "mean_grade"} <= {f["covariate"] for f in summary["significant"]}
    # every scan's vendor: the baselines GE, the follow-ups SIEMENS (16 subjects at two times: s % 4 < 2)
    assert summary["scanner_confound"]["vendor"]["counts"] == {"GE": 30, "SIEMENS": 16}
    assert summary["longitudinal"]["subjects"] == 16
    assert (tmp_path / "p" / "enc.csv").exists() and set(pd.read_csv(out["tests"]).analysis) == {
        "enrichment", "association"}
    assert json.loads(out["summary"].read_text())["subjects"] == 30
    # two groups: each test once (group 1 against group 0)
    assert set(pd.read_csv(out["tests"]).query("analysis == 'enrichment'").group) == {1}
    # pseudonymous ids, groups, components and covariates only
    assert list(table.columns) == ["subject_id", "group", *[f"pc{i}" for i in range(1, 9)], "age_years", "sex",
                                   "vendor", "field_strength", "mean_grade", "herniation"]
    assert table.subject_id.str.fullmatch(r"sub-\d+").all()


def test_a_cohort_too_small_gets_the_reason_and_the_figure_says_so(tmp_path):
    from stages.figures import FigureFiles, population_figure

    volumes, manifest, features = _cohort(np.random.default_rng(9), n_subjects=5)
    paths = _files(tmp_path, volumes, manifest, features)
    summary = run(paths["pooled.npy"], paths["volumes.parquet"], paths["manifest.parquet"], tmp_path / "s.parquet",
                  tmp_path / "s_tests.csv", tmp_path / "s.json", min_subjects=8)
    assert "5 subject(s)" in summary["skipped"] and pd.read_parquet(tmp_path / "s.parquet").empty
    volumes, manifest, features = _cohort(np.random.default_rng(10))
    big = _files(tmp_path / "big", volumes, manifest, features) if (tmp_path / "big").mkdir() is None else None
    run(big["pooled.npy"], big["volumes.parquet"], big["manifest.parquet"], tmp_path / "b.parquet",
        tmp_path / "b_tests.csv", tmp_path / "b.json", bootstrap=10, permutations=10)
    run(big["pooled.npy"], big["volumes.parquet"], big["manifest.parquet"], tmp_path / "one.parquet",
        tmp_path / "one_tests.csv", tmp_path / "one.json", bootstrap=10, permutations=10, max_groups=1)
    assert set(pd.read_csv(tmp_path / "one_tests.csv").analysis) == {"association"}   # one group: no enrichment
    names = ("small", "big", "one")
    written = population_figure({n: pd.read_csv(tmp_path / f"{n[0]}_tests.csv" if n != "one" else tmp_path /
                                                "one_tests.csv") for n in names},
                                {n: json.loads((tmp_path / (f"{n[0]}.json" if n != "one" else "one.json")).read_text())
                                 for n in names},
                                FigureFiles(tmp_path / "f.png", tmp_path / "f.pdf"))
    assert all(p.stat().st_size > 10_000 for p in written)


def test_features_from_another_run_are_refused_and_the_cli_checks_its_arguments(tmp_path, capsys):
    volumes, manifest, features = _cohort(np.random.default_rng(11), n_subjects=10)
    paths = _files(tmp_path, volumes, manifest, features[:5])
    with pytest.raises(ValueError, match="different runs"):
        run(paths["pooled.npy"], paths["volumes.parquet"], paths["manifest.parquet"], tmp_path / "a.parquet",
            tmp_path / "a.csv", tmp_path / "a.json")
    with pytest.raises(SystemExit):
        main(["--pooled", str(paths["pooled.npy"]), "--volumes", str(paths["volumes.parquet"]), "--manifest",
              str(paths["manifest.parquet"]), "--out-subjects", "a", "--out-tests", "b", "--out-summary", "c",
              "--covariance", "round"])
    assert "invalid choice: 'round'" in capsys.readouterr().err
