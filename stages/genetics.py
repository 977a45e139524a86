"""Stage genetics: twin heritability and SNP association of a disc trait and of one frozen encoder's leading embedding
components (stages/evaluation/genetics.py).

Traits: the subject's mean baseline Pfirrmann grade (the disc trait; subjects without grades leave it) and the
components pc1..pcN of the population stage's subject embedding (its ``--out-subjects`` table: the subjects it
analysed, baseline scans). Each trait is adjusted for the covariates (``covariates``: age at baseline, sex by default;
least squares) before the twin fit; the SNP scan puts them in every model. Heritability: an ACE model by maximum
likelihood and Falconer's estimate, with percentile intervals over ``bootstrap`` resamplings of families; skipped
(NaN, with the reason) for a trait with fewer than ``min_pairs`` complete MZ and DZ pairs. Zygosity and families come
from the ingest stage's subjects table (columns family_id and zygosity, MZ or DZ); the genotypes from the
ingest_genotypes stage (optional: without them, heritability only).

Run:
    python -m stages.genetics --population results/report/population/siamese.parquet \\
        --subjects results/ingest/subjects.parquet --genotypes results/ingest/genotypes.parquet \\
        --out-heritability results/report/genetics/siamese_heritability.csv \\
        --out-scan results/report/genetics/siamese_scan.csv --out-summary results/report/genetics/siamese.json

Writes ``--out-heritability`` (one row per trait: pairs, h2, c2, e2 of the ACE fit, Falconer's h2 and the twin
correlations, each with its interval), ``--out-scan`` (one row per trait and SNP: beta per allele, its standard
error by generalised least squares with the families' correlations (rho_MZ, rho_DZ, rho_family columns), t, p, BH q
over the trait's SNPs tested, n, call rate, allele frequency, copies of the minor allele), ``--out-summary`` (JSON:
counts, the SNPs at q <= fdr per trait, reasons for anything skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import cli
from stages.evaluation import genetics as gen
from stages.evaluation import twins

log = logging.getLogger("genetics")

DISC_TRAIT = "mean_grade"
SCAN_COLUMNS = ["trait", "snp", "position", "beta", "se", "t", "p", "q", "n", "call_rate", "allele_frequency",
                "minor_alleles"]


def design(table: pd.DataFrame, covariates: list[str]) -> tuple[np.ndarray, pd.Series, list[str]]:
    """Covariate matrix (numbers as they are, categories as indicator columns, the first level left out), which
    rows have every covariate used, and the covariates left out because no subject has a value (an anonymised
    archive may have no sex, say: adjusting for it would drop every subject)."""
    columns, complete, unused = [], pd.Series(True, index=table.index), []
    for name in covariates:
        if name not in table:
            raise ValueError(f"covariate {name!r} is not a column of the population table ({list(table.columns)})")
        values = table[name].mask(table[name].astype(str).str.strip() == "")
        if values.isna().all():
            unused.append(name)
            continue
        complete &= values.notna()
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() == values.notna().sum():
            columns.append(numeric.fillna(0.0).to_numpy()[:, None])
        else:
            levels = sorted(values.dropna().astype(str).unique())
            columns.append(np.column_stack([(values.astype(str) == lv).to_numpy(float) for lv in levels[1:]])
                           if len(levels) > 1 else np.zeros((len(table), 0)))
    return (np.hstack(columns) if columns else np.zeros((len(table), 0))), complete, unused


def adjusted(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y`` less its least-squares fit on an intercept and ``x`` (the residual plus the mean)."""
    full = np.column_stack([np.ones(len(y)), x])
    return y - full @ np.linalg.lstsq(full, y, rcond=None)[0] + y.mean()


def run(population: Path, subjects: Path, genotypes: Path | None, out_heritability: Path, out_scan: Path,
        out_summary: Path, pcs: int = 4, covariates: tuple[str, ...] = ("age_years", "sex"), bootstrap: int = 200,
        min_pairs: int = 5, min_minor_alleles: int = 5, fdr: float = 0.05, ci_level: float = 0.95,
        seed: int = 0) -> dict:
    table = pd.read_parquet(population)
    families = pd.read_parquet(subjects)
    if "subject_id" not in families:
        raise ValueError(f"{subjects} has no subject_id column")
    for column in ("family_id", "zygosity"):
        if column not in families:
            families[column] = np.nan
    traits = [t for t in [DISC_TRAIT, *[f"pc{i + 1}" for i in range(pcs)]] if t in table]
    summary: dict = {"population": str(population), "subjects": len(table), "covariates": list(covariates),
                     "fdr": fdr, "traits": traits, "skipped": {}}
    x, complete, unused = (design(table, list(covariates)) if len(table)
                           else (np.zeros((0, 0)), pd.Series(dtype=bool), []))
    if unused:
        log.warning("no subject has %s: not adjusted for", ", ".join(unused))
        summary["skipped"]["covariates"] = f"no subject has a value of {', '.join(unused)}: not adjusted for"
    summary["subjects_without_covariates"] = int((~complete).sum())
    heritability, scans = [], []
    dosage = pd.read_parquet(genotypes).drop_duplicates("subject_id").set_index("subject_id") if genotypes else None
    for trait in traits:
        y = pd.to_numeric(table[trait], errors="coerce")
        use = (y.notna() & complete).to_numpy()
        values = pd.Series(adjusted(y.to_numpy()[use], x[use]), index=table.subject_id[use].to_numpy())
        data, groups = twins.twin_data(values, families)
        row: dict = {"trait": trait, "subjects": int(use.sum())}
        if min(len(data.mz), len(data.dz)) < min_pairs:
            reason = f"{len(data.mz)} MZ and {len(data.dz)} DZ pairs (at least {min_pairs} of each needed)"
            summary["skipped"][f"heritability {trait}"] = reason
            row |= data.counts() | gen.no_estimates() | {"skipped": reason}
        else:
            row |= gen.heritability(data, groups, bootstrap, ci_level, seed)
            log.info("%s: h2 %.2f [%.2f, %.2f] (ACE), Falconer %.2f; %d MZ, %d DZ pairs", trait, row["h2"],
                     row["h2_low"], row["h2_high"], row["falconer_h2"], len(data.mz), len(data.dz))
        heritability.append(row)
        if dosage is None:
            continue
        ids = table.subject_id[use].to_numpy()
        typed = np.isin(ids, dosage.index)
        if typed.sum() < 3:
            summary["skipped"][f"scan {trait}"] = f"{int(typed.sum())} subject(s) with a genotype row"
            continue
        fam = families.drop_duplicates("subject_id").set_index("subject_id")
        family = [fam.family_id.get(s) if isinstance(fam.family_id.get(s), str) else s for s in ids[typed]]
        kind = [str(fam.zygosity.get(s)).strip().upper() if str(fam.zygosity.get(s)).strip().upper() in ("MZ", "DZ")
                else "family" for s in ids[typed]]
        scan = gen.snp_scan(y.to_numpy()[use][typed], dosage.loc[ids[typed]].to_numpy(float), x[use][typed],
                            np.array(family), list(dosage.columns), np.array(kind), min_minor_alleles)
        scans.append(scan.assign(trait=trait, position=np.arange(len(scan))))
    h_table = pd.DataFrame(heritability)
    scan_table = (pd.concat(scans, ignore_index=True) if scans else
                  pd.DataFrame(columns=SCAN_COLUMNS))
    if genotypes is None:
        summary["skipped"]["scan"] = "no genotype table (config cohort.genotypes)"
    else:
        summary["snps"] = int(dosage.shape[1])
        summary["genotyped_subjects"] = int(np.isin(table.subject_id, dosage.index).sum())
    found = scan_table[scan_table.q <= fdr]
    summary["significant_snps"] = {t: found[found.trait == t].sort_values("p").snp.tolist() for t in traits}
    for path in (out_heritability, out_scan, out_summary):
        path.parent.mkdir(parents=True, exist_ok=True)
    h_table.to_csv(out_heritability, index=False)
    scan_table[[c for c in scan_table.columns if c in SCAN_COLUMNS or c.startswith("rho_")]].to_csv(out_scan,
                                                                                                      index=False)
    out_summary.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    log.info("%d trait(s), %d SNP test(s), %d at q <= %g", len(traits), len(scan_table), len(found), fdr)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.genetics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=cli.existing_file, required=True,
                        help="The population stage's subjects table (Parquet): pc1.., mean_grade, covariates.")
    parser.add_argument("--subjects", type=cli.existing_file, required=True,
                        help="The ingest stage's subjects table (Parquet): family_id and zygosity (MZ/DZ).")
    parser.add_argument("--genotypes", type=cli.existing_file, default=None,
                        help="The ingest_genotypes stage's dosage table (Parquet); without it, heritability only.")
    parser.add_argument("--out-heritability", type=Path, required=True, help="Output: heritability per trait (CSV).")
    parser.add_argument("--out-scan", type=Path, required=True, help="Output: every SNP test (CSV).")
    parser.add_argument("--out-summary", type=Path, required=True, help="Output: the findings (JSON).")
    cli.add_section_options(parser, "genetics")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    section = cli.section_from_args(args, "genetics", parser)
    cli.setup_logging(args.log, "genetics")
    section["covariates"] = tuple(section["covariates"])
    run(args.population, args.subjects, args.genotypes, args.out_heritability, args.out_scan, args.out_summary,
        **section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
