"""Twin heritability (ACE, Falconer) and the SNP scan, against the models' equations and simulations with known
answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import multivariate_normal, norm

from stages.demo import genome
from stages.evaluation import genetics as gen
from stages.evaluation import twins


def simulate_twins(rng: np.random.Generator, n_mz: int, n_dz: int, a: float, c: float, e: float,
                   mean: float = 0.0) -> twins.TwinData:
    """Pairs drawn from the classical twin model: var a + c + e, cov a + c (MZ), a / 2 + c (DZ)."""
    var = a + c + e
    mz = rng.multivariate_normal([mean, mean], [[var, a + c], [a + c, var]], n_mz)
    dz = rng.multivariate_normal([mean, mean], [[var, a / 2 + c], [a / 2 + c, var]], n_dz)
    return twins.TwinData(mz, dz, np.zeros(0))


def test_ace_likelihood_is_the_bivariate_normal_of_the_twin_model():
    # Neale & Cardon: "var = a + c + e, cov(MZ) = a + c, cov(DZ) = 1/2 a + c"; singletons are N(mean, var)
    rng = np.random.default_rng(0)
    data = twins.TwinData(rng.normal(size=(5, 2)), rng.normal(size=(4, 2)), rng.normal(size=3))
    a, c, e, m = 0.7, 0.3, 0.5, 0.2
    var = a + c + e
    reference = (multivariate_normal([m, m], [[var, a + c], [a + c, var]]).logpdf(data.mz).sum()
                 + multivariate_normal([m, m], [[var, a / 2 + c], [a / 2 + c, var]]).logpdf(data.dz).sum()
                 + norm(m, np.sqrt(var)).logpdf(data.single).sum())
    assert twins.ace_loglik(a, c, e, m, data) == pytest.approx(reference, rel=1e-10)


def test_ace_fit_recovers_a_known_heritability_and_is_the_maximum():
    rng = np.random.default_rng(1)
    data = simulate_twins(rng, 1500, 1500, a=0.5, c=0.2, e=0.3, mean=3.0)
    fit = twins.fit_ace(data)
    assert fit.h2 == pytest.approx(0.5, abs=0.08)
    assert fit.c2 == pytest.approx(0.2, abs=0.08)
    assert fit.e2 == pytest.approx(0.3, abs=0.03)
    assert fit.mean == pytest.approx(3.0, abs=0.05)
    assert fit.variance == pytest.approx(1.0, abs=0.06)
    a, c, e = fit.h2 * fit.variance, fit.c2 * fit.variance, fit.e2 * fit.variance
    assert fit.loglik == pytest.approx(twins.ace_loglik(a, c, e, fit.mean, data), rel=1e-8)
    for da, dc in ((0.02, 0), (-0.02, 0), (0, 0.02), (0, -0.02)):   # nudged away, the likelihood falls
        assert twins.ace_loglik(a + da, max(c + dc, 0), e, fit.mean, data) <= fit.loglik + 1e-6
    # no shared environment, no genes: the parts go to the boundary, never negative
    fit = twins.fit_ace(simulate_twins(rng, 800, 800, a=0.0, c=0.0, e=1.0))
    assert min(fit.h2, fit.c2) >= 0 and fit.e2 > 0.85
    # MZ pairs alone cannot tell A from C (any split of their covariance fits as well): no estimate
    only_mz = simulate_twins(rng, 200, 1, a=0.5, c=0.2, e=0.3)
    assert np.isnan(twins.fit_ace(only_mz).h2) and np.isnan(twins.falconer(only_mz)["h2"])


def test_falconer_from_the_intraclass_correlations():
    # Falconer: h2 = 2 (r_MZ - r_DZ), c2 = 2 r_DZ - r_MZ, e2 = 1 - r_MZ; r the intraclass (double-entry) correlation
    mz = np.array([[1.0, 2.0], [2.0, 2.5], [4.0, 3.0], [3.0, 3.5]])
    dz = np.array([[1.0, 3.0], [2.0, 1.0], [4.0, 2.0], [3.0, 4.0]])

    def icc(pairs):
        x, y = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
        m = x.mean()
        return np.sum((x - m) * (y - m)) / np.sum((x - m) ** 2)

    out = twins.falconer(twins.TwinData(mz, dz, np.zeros(0)))
    assert out["r_mz"] == pytest.approx(icc(mz)) and out["r_dz"] == pytest.approx(icc(dz))
    assert out["h2"] == pytest.approx(2 * (icc(mz) - icc(dz)))
    assert out["c2"] == pytest.approx(2 * icc(dz) - icc(mz)) and out["e2"] == pytest.approx(1 - icc(mz))


def test_heritability_interval_covers_the_planted_value_and_twin_data_arranges_families():
    rng = np.random.default_rng(2)
    data = simulate_twins(rng, 150, 150, a=0.6, c=0.1, e=0.3)
    ids = [f"s{i}" for i in range(600)]
    values = pd.Series(np.r_[data.mz.ravel(), data.dz.ravel()], index=ids)
    families = pd.DataFrame({"subject_id": ids, "family_id": [f"f{i // 2}" for i in range(600)],
                             "zygosity": ["MZ"] * 300 + ["DZ"] * 300})
    # a family with one missing value and one of unknown zygosity: their twins count as singles
    values["x1"], values["x2"], values["y1"] = 0.3, np.nan, 1.0
    extra = pd.DataFrame({"subject_id": ["x1", "x2", "y1", "y2"], "family_id": ["fx", "fx", "fy", "fy"],
                          "zygosity": ["MZ", "MZ", "", ""]})
    families = pd.concat([families, extra])
    values["y2"] = 2.0
    arranged, groups = twins.twin_data(values, families)
    assert arranged.counts() == {"mz_pairs": 150, "dz_pairs": 150, "singles": 3}
    assert len(groups) == 302
    assert np.array_equal(twins.subset(arranged, np.concatenate(groups)).mz, arranged.mz)
    out = gen.heritability(arranged, groups, n_boot=60, level=0.95, seed=0)
    assert out["h2_low"] < 0.6 < out["h2_high"] and out["h2_high"] - out["h2_low"] < 0.8
    assert out["falconer_h2_low"] < out["falconer_h2"] < out["falconer_h2_high"]
    assert out == gen.heritability(arranged, groups, n_boot=60, level=0.95, seed=0)   # reproducible


def test_family_genotypes_follow_inheritance():
    rng = np.random.default_rng(3)
    freq = rng.uniform(0.1, 0.5, 2000)
    mz = genome.family_genotypes(rng, freq, ["MZ", "MZ"])
    dz = genome.family_genotypes(rng, freq, ["DZ", "DZ"])
    assert np.array_equal(mz[0], mz[1]) and set(np.unique(dz)) <= {0, 1, 2}
    # full siblings share half their alleles by descent: dosage correlation about 0.5 across many families
    sibs = np.array([genome.family_genotypes(rng, freq[:50], ["DZ", "DZ"]) for _ in range(400)])   # family, child, snp
    std = (sibs - 2 * freq[:50]) / np.sqrt(2 * freq[:50] * (1 - freq[:50]))
    assert np.mean(std[:, 0] * std[:, 1]) == pytest.approx(0.5, abs=0.06)
    singles = np.array([genome.family_genotypes(rng, freq[:50], ["single"])[0] for _ in range(2000)])
    assert np.abs(singles.mean(0) / 2 - freq[:50]).max() < 0.05      # Hardy-Weinberg frequencies


def scan_cohort(rng: np.random.Generator, n_families: int, n_snps: int, planted: dict[int, float],
                low_frequency: bool = False):
    """MZ-twin families (one genotype twice), an age covariate with an effect, planted per-allele effects; with
    ``low_frequency`` the null SNPs' allele frequencies are 0.03-0.15 (a handful of carriers in 25 families)."""
    freq = rng.uniform(0.03, 0.15, n_snps) if low_frequency else rng.uniform(0.1, 0.5, n_snps)
    freq[list(planted)] = 0.4
    dos = np.concatenate([genome.family_genotypes(rng, freq, ["MZ", "MZ"]) for _ in range(n_families)]).astype(float)
    family = np.repeat(np.arange(n_families), 2)
    age = np.repeat(rng.uniform(30, 70, n_families), 2)
    shared = np.repeat(rng.normal(0, 1, n_families), 2)       # twins' shared environment: clustered residuals
    y = 0.03 * age + shared + rng.normal(0, 1, 2 * n_families)
    for j, beta in planted.items():
        y += beta * dos[:, j]
    return y, dos, age[:, None], family


def test_snp_scan_finds_planted_snps_with_the_full_models_coefficients():
    rng = np.random.default_rng(4)
    y, dos, cov, family = scan_cohort(rng, 600, 300, {3: 0.5, 50: -0.45, 120: 0.4})
    dos[7, 11] = np.nan
    table = gen.snp_scan(y, dos, cov, family, [f"rs{j}" for j in range(300)], np.repeat("MZ", len(y)))
    found = set(table.snp[table.q < 0.05])
    assert {"rs3", "rs50", "rs120"} <= found and len(found - {"rs3", "rs50", "rs120"}) <= 2
    # the coefficient is the SNP's in the full GLS regression y ~ 1 + age + SNP with the twins' correlation rho:
    # beta = (X' S^-1 X)^-1 X' S^-1 y, S block-diagonal with [[1, rho], [rho, 1]] per pair (Aitken)
    rho = table.rho_MZ.iloc[0]
    inverse = np.kron(np.eye(len(y) // 2), np.linalg.inv([[1, rho], [rho, 1]]))
    for j in (3, 50, 200):
        x = np.column_stack([np.ones(len(y)), cov, np.where(np.isnan(dos[:, j]), np.nanmean(dos[:, j]), dos[:, j])])
        gls = np.linalg.solve(x.T @ inverse @ x, x.T @ inverse @ y)
        assert table.beta[j] == pytest.approx(gls[2], rel=1e-8)
        residual = y - x @ gls
        se = np.sqrt(residual @ inverse @ residual / (len(y) - 3) * np.linalg.inv(x.T @ inverse @ x)[2, 2])
        assert table.se[j] == pytest.approx(se, rel=1e-8)
    assert table.call_rate[11] == pytest.approx(1 - 1 / len(y))


@pytest.mark.parametrize("families, low_frequency", [(150, False), (25, True)])
def test_snp_scan_keeps_the_error_rates_on_null_snps_of_twins(families, low_frequency):
    """MZ twins share one genotype and an environment: ordinary least squares would reject far more often than the
    nominal rate; so did a cluster-robust standard error on a demo-sized cohort (25 families) with rare alleles."""
    rng = np.random.default_rng(5)
    p_values, false_share, rhos = [], [], []
    for _ in range(40 if low_frequency else 20):
        y, dos, cov, family = scan_cohort(rng, families, 100, {0: 0.7}, low_frequency)
        table = gen.snp_scan(y, dos, cov, family, [f"rs{j}" for j in range(100)], np.repeat("MZ", len(y)))
        p_values.append(table.p[1:].dropna().to_numpy())
        found = table.q < 0.05
        false_share.append(found[1:].sum() / max(found.sum(), 1))
        rhos.append(table.rho_MZ.iloc[0])
    p = np.concatenate(p_values)
    assert 0.03 < np.mean(p < 0.05) < 0.07 and np.mean(p < 0.005) < 0.01
    assert 0.4 < np.mean(rhos) < 0.65                                # the twins' correlation (about 0.5), estimated
    assert np.mean(false_share) < 0.1                                # BH: the false-discovery proportion


KEY = b"0123456789abcdef-test-key"


def test_ingest_genotypes_pseudonymises_and_accounts_for_every_row(tmp_path):
    from stages import ingest_genotypes as ig
    from stages.archive import pseudonym as pn

    csv = tmp_path / "genotypes.csv"
    csv.write_text("patient_id,patient_name,sex,subject_id,rs1,rs2,rs3\n"
                   "TW1234567,Doe^Jane,1,s1,0,1,2\n"
                   ",Nobody,2,s2,1,1,1\n"
                   "TW7654321,Roe^Rick,2,s3,2,AG,\n"
                   "TW1234567,Doe^Jane,1,s1,1,1,1\n")
    table, rows = ig.read_genotypes(csv, KEY)
    assert list(table.columns) == ["subject_id", "rs1", "rs2", "rs3"]   # name dropped unread; sex, subject_id: no SNPs
    assert list(table.subject_id) == [pn.subject_id(KEY, "TW1234567"), pn.subject_id(KEY, "TW7654321")]
    assert table.iloc[0, 1:].tolist() == [0, 1, 2] and np.isnan(table.iloc[1, 2]) and np.isnan(table.iloc[1, 3])
    assert list(rows.status) == ["used", "rejected", "used", "rejected"] and list(rows.row) == [2, 3, 4, 5]
    assert rows.detail[1] == "no patient_id" and "line 2 kept" in rows.detail[3]
    assert "1 dosage(s) not 0/1/2" in rows.detail[2] and "rs2" in rows.detail[2]
    written = tmp_path / "out.parquet"
    assert ig.main(["--genotypes", str(csv), "--key-file", str(_key(tmp_path)), "--out-genotypes", str(written),
                    "--out-rows", str(tmp_path / "rows.csv")]) == 0
    out = pd.read_parquet(written)
    text = out.to_csv() + (tmp_path / "rows.csv").read_text()
    assert "TW1234567" not in text and "Doe" not in text and len(out) == 2     # no identity leaves ingest
    (tmp_path / "bad.csv").write_text("patient_id,name\nTW1,x\n")
    with pytest.raises(ValueError, match="no SNP column"):
        ig.read_genotypes(tmp_path / "bad.csv", KEY)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ig.read_genotypes(tmp_path / "empty.csv", KEY)
    (tmp_path / "header.csv").write_text("patient_id,rs1\n")
    with pytest.raises(SystemExit):     # the CLI: a clear error, exit code 2
        ig.main(["--genotypes", str(tmp_path / "header.csv"), "--key-file", str(_key(tmp_path)), "--out-genotypes",
                 str(tmp_path / "h.parquet"), "--out-rows", str(tmp_path / "h.csv")])
    (tmp_path / "none.csv").write_text("id,rs1\nTW1,1\n")
    with pytest.raises(ValueError, match="needs a patient_id column"):
        ig.read_genotypes(tmp_path / "none.csv", KEY)


def _key(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    return path


def test_genetics_stage_recovers_planted_heritability_and_snp(tmp_path):
    """A cohort built like the stage's inputs: the population table (components, mean grade, covariates), the
    ingest subjects table (families, zygosity) and the genotype table; the mean grade has h2 0.6 from a planted SNP
    and a polygenic part, PC1 is noise."""
    from stages import genetics as stage

    rng = np.random.default_rng(6)
    freq = rng.uniform(0.1, 0.5, 60)
    freq[9] = 0.45
    rows, dosages = [], []
    for f in range(400):
        kind = "MZ" if f % 2 else "DZ"
        dos = genome.family_genotypes(rng, freq, [kind, kind]).astype(float)
        a_parents = rng.normal(size=2).mean()
        poly = a_parents + rng.normal(0, np.sqrt(0.5), 2)
        if kind == "MZ":
            poly[1] = poly[0]
        snp = (dos[:, 9] - 2 * freq[9]) / np.sqrt(2 * freq[9] * (1 - freq[9]))
        c = rng.normal()
        age = rng.uniform(30, 70)
        for m in range(2):
            trait = np.sqrt(0.3) * snp[m] + np.sqrt(0.3) * poly[m] + np.sqrt(0.1) * c + np.sqrt(0.3) * rng.normal()
            rows.append({"subject_id": f"S{f}_{m}", "family_id": f"F{f}", "zygosity": kind, "age_years": age,
                         "sex": "F" if rng.random() < 0.5 else "M", "mean_grade": trait + 0.05 * age,
                         "pc1": rng.normal()})
            dosages.append(dos[m])
    table = pd.DataFrame(rows)
    table[["subject_id", "mean_grade", "pc1", "age_years", "sex"]].to_parquet(tmp_path / "population.parquet")
    table[["subject_id", "family_id", "zygosity"]].to_parquet(tmp_path / "subjects.parquet")
    geno = pd.DataFrame(np.array(dosages), columns=[f"rs{j}" for j in range(60)]).astype("float32")
    geno.insert(0, "subject_id", table.subject_id)
    geno.to_parquet(tmp_path / "genotypes.parquet")
    out = [tmp_path / "h.csv", tmp_path / "scan.csv", tmp_path / "summary.json"]
    args = ["--population", str(tmp_path / "population.parquet"), "--subjects", str(tmp_path / "subjects.parquet"),
            "--out-heritability", str(out[0]), "--out-scan", str(out[1]), "--out-summary", str(out[2]),
            "--pcs", "1", "--bootstrap", "40"]
    assert stage.main([*args, "--genotypes", str(tmp_path / "genotypes.parquet")]) == 0
    h = pd.read_csv(out[0]).set_index("trait")
    assert h.loc["mean_grade", "mz_pairs"] == 200 and h.loc["mean_grade", "dz_pairs"] == 200
    assert h.loc["mean_grade", "h2_low"] < 0.6 < h.loc["mean_grade", "h2_high"]
    assert h.loc["pc1", "h2_high"] < 0.45
    summary = json.loads(out[2].read_text())
    assert summary["significant_snps"]["mean_grade"][:1] == ["rs9"] and len(summary["significant_snps"]["pc1"]) <= 1
    # no genotype table: heritability only, and the reason; too few pairs: skipped with the reason
    assert stage.main([*args, "--min-pairs", "500"]) == 0
    summary = json.loads(out[2].read_text())
    assert "no genotype table" in summary["skipped"]["scan"] and "200 MZ and 200 DZ" in summary["skipped"][
        "heritability mean_grade"]
    assert len(pd.read_csv(out[1])) == 0 and pd.read_csv(out[0]).h2.isna().all()
    with pytest.raises(SystemExit):
        stage.main([*args, "--fdr", "2"])
    # a covariate no subject has (an anonymised archive without sex) is left out, not every subject with it
    table.assign(sex=None)[["subject_id", "mean_grade", "pc1", "age_years", "sex"]].to_parquet(
        tmp_path / "population.parquet")
    assert stage.main(args) == 0
    summary = json.loads(out[2].read_text())
    assert "sex" in summary["skipped"]["covariates"] and pd.read_csv(out[0]).set_index("trait").subjects["pc1"] == 800
    assert stage.main([*args, "--covariates"]) == 0                  # none at all: an empty list


def test_family_correlations_are_the_intraclass_correlations_of_each_kind():
    rng = np.random.default_rng(8)
    r = rng.normal(size=26)
    families = np.r_[np.repeat(np.arange(10), 2), [10, 10, 10], [11], [12], [13]]
    kinds = np.r_[np.repeat(["MZ"] * 5 + ["DZ"] * 5, 2), ["family"] * 3, ["MZ", "DZ", "family"]]
    out = gen.family_correlations(r, families, kinds)
    c = r - r.mean()
    for kind, rows in (("MZ", slice(0, 10)), ("DZ", slice(10, 20))):
        pairs = c[rows].reshape(-1, 2)       # double entry: sum over both orders of x_i1 x_i2 over sum of squares
        assert out[kind] == pytest.approx(np.clip(2 * np.sum(pairs[:, 0] * pairs[:, 1]) / np.sum(pairs**2), 0, 0.95))
    trio = c[20:23]                           # a family of three: its 6 ordered pairs over its 3 squares
    cross = trio[0] * trio[1] + trio[0] * trio[2] + trio[1] * trio[2]
    assert out["family"] == pytest.approx(np.clip((2 * cross / 6) / np.mean(trio**2), 0, 0.95))
    # whitening with the exchangeable correlation: Sigma^-1/2 of a family of three, checked against the matrix
    from scipy.linalg import sqrtm
    rho = {"family": 0.4}
    values = rng.normal(size=(3, 2))
    sigma = 0.6 * np.eye(3) + 0.4 * np.ones((3, 3))
    expected = np.linalg.inv(np.real(sqrtm(sigma))) @ values
    assert np.allclose(gen.whiten(values, np.zeros(3), np.array(["family"] * 3), rho), expected)
