"""Stage population: subgroups, associations with covariates, the scanner confound and longitudinal change in one
frozen encoder's representation of the cohort (stages/evaluation/population.py).

Features: those the disc probes read (``disc_features``' ``pooled.npy``, one row per disc row of the extract stage's
discs.npy), every disc of the subjects analysed, with or without a grade; a scan is the mean of its discs (each
centred on its level's mean), a subject its baseline scan. ``--subjects all`` analyses every subject (no step here
learns from labels: the covariates only describe what the unsupervised groups and components turned out to be);
``held_out`` only the subjects the encoder's pretraining neither trained on nor chose its epoch by (self-supervision
parts other than train and val). The supervised baseline learnt the grades of the training part's subjects: the rule
always gives it ``--subjects held_out``, so that its associations with grade are not its own training labels.

Run:
    python -m stages.population --pooled results/probes/features/siamese/disc_pooled.npy \\
        --volumes results/splits/volumes.parquet --manifest results/ingest/manifest.parquet \\
        --out-subjects results/report/population/siamese.parquet \\
        --out-tests results/report/population/siamese_tests.csv --out-summary results/report/population/siamese.json

Writes ``--out-subjects`` (Parquet, a CSV copy beside it): one row per subject (pseudonymous id): its group, its
components pc1..pcK and covariates (age at baseline, sex, vendor, field strength, mean grade, any herniation);
``--out-tests`` (CSV): every enrichment and association test with its effect, p and BH q value (``analysis`` names the
family); ``--out-summary`` (JSON): the BIC per number of groups, the choice, its bootstrap stability, the significant
findings at ``fdr``, the scanner confound and the longitudinal change (with its points). A cohort with fewer than
``min_subjects`` subjects gets empty tables and the reason (``skipped``), which the figure shows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from threadpoolctl import threadpool_limits

from stages.core import cli
from stages.evaluation import population as pop

log = logging.getLogger("population")


def cohort_scans(volumes: pd.DataFrame, manifest: pd.DataFrame, subjects: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The discs analysed (row, scan_id, level) and one row per scan: subject_id, years since the subject's first
    scan, baseline flag, and the covariates (age, sex, vendor, field strength from the manifest; mean grade and any
    herniation from the scan's discs)."""
    if subjects not in ("all", "held_out"):
        raise ValueError(f"subjects must be 'all' or 'held_out', got {subjects!r}")
    discs = volumes[volumes.kind == "disc"]
    if subjects == "held_out":   # neither trained on nor used to select the pretraining's epoch
        discs = discs[~discs.ssl_part.isin(["train", "val"])]
    for column in ("pfirrmann", "herniation"):
        if column not in discs:
            discs = discs.assign(**{column: np.nan})
    per_scan = discs.groupby("scan_id", sort=False).agg(
        subject_id=("subject_id", "first"), days=("days_since_first_study", "first"),
        mean_grade=("pfirrmann", "mean"), herniated=("herniation", "max"))
    meta = manifest.drop_duplicates("scan_id").set_index("scan_id")
    scans = per_scan.reset_index()
    # a subject's baseline: its earliest dated scan (a scan without a date only when none has one); a scan without a
    # date has no years since baseline (it leaves the longitudinal analysis, not the cohort)
    scans["years"] = pd.to_numeric(scans.days, errors="coerce") / 365.25
    order = scans.sort_values(["subject_id", "years"], na_position="last", kind="stable")
    scans["baseline"] = scans.index.isin(order.drop_duplicates("subject_id").index)
    scans["years"] = scans.years - scans.subject_id.map(scans[scans.baseline].set_index("subject_id").years)

    def from_manifest(column: str) -> pd.Series:
        return scans.scan_id.map(meta[column]) if column in meta else pd.Series(np.nan, index=scans.index)

    def category(column: str) -> pd.Series:
        values = from_manifest(column).astype("string").str.strip()
        return values.mask(values.isna() | (values == "")).astype(object)

    scans["age_years"] = pd.to_numeric(from_manifest("age_years"), errors="coerce")
    scans["sex"] = category("sex")
    scans["vendor"] = category("manufacturer")
    # to 0.1 T: a header's 1.494 is a 1.5 T magnet (else the field strength would split by vendor)
    strength = pd.to_numeric(from_manifest("field_strength_t"), errors="coerce").round(1)
    scans["field_strength"] = strength.map(lambda t: f"{t:g} T" if np.isfinite(t) else np.nan).astype(object)
    scans["herniation"] = scans.herniated.map(lambda h: np.nan if pd.isna(h) else ("yes" if h > 0 else "no"))
    return (discs[["row", "scan_id", "level"]].reset_index(drop=True),
            scans.drop(columns=["days", "herniated"]))


def run(pooled: Path, volumes: Path, manifest: Path, out_subjects: Path, out_tests: Path, out_summary: Path,
        subjects: str = "all", components: int = 8, pcs: int = 4, max_groups: int = 6, covariance: str = "diag",
        bootstrap: int = 200, scanner_folds: int = 5, permutations: int = 200, min_subjects: int = 8,
        fdr: float = 0.05, ci_level: float = 0.95, seed: int = 0) -> dict:
    features = np.load(pooled, mmap_mode="r")
    discs, scans = cohort_scans(pd.read_parquet(volumes), pd.read_parquet(manifest), subjects)
    if len(discs) and discs.row.max() >= len(features):
        raise ValueError(f"{volumes} names disc rows beyond the {len(features)} rows of {pooled}: the features and "
                         "the splits are from different runs")
    summary: dict = {"features": str(pooled), "subjects_analysed": subjects, "fdr": fdr,
                     "fdr_families": "enrichment and association, each controlled on its own",
                     "subjects": int(scans.subject_id.nunique()), "scans": len(scans), "discs": len(discs)}
    covariate_columns = ["age_years", "sex", "vendor", "field_strength", "mean_grade", "herniation"]
    if summary["subjects"] < min_subjects:
        log.warning("no population analysis: %d subject(s), at least %d needed", summary["subjects"], min_subjects)
        summary["skipped"] = f"the cohort has {summary['subjects']} subject(s) (at least {min_subjects} needed)"
        table = pd.DataFrame(columns=["subject_id", "group", *covariate_columns])
        tests = pd.DataFrame(columns=["analysis", "group", "component", "covariate", "category", "effect",
                                      "effect_kind", "p", "q"])
    else:
        scan_table, x = pop.scan_features(features, discs)
        scans = scan_table.merge(scans, on="scan_id", how="left")
        embedding = pop.embed(x, scans, components)
        base, z = embedding.baseline
        k, bic, groups = pop.choose_groups(z, max_groups, covariance, seed)
        stability = pop.bootstrap_stability(z, k, groups, covariance, bootstrap, seed, ci_level)
        covariates = base[covariate_columns]
        enriched = pop.enrichment(groups, covariates)
        associated = pop.associations(z, covariates, pcs)
        tests = pd.concat([enriched.assign(analysis="enrichment"), associated.assign(analysis="association")],
                          ignore_index=True)
        confound = {column: pop.scanner_confound(embedding.z, embedding.scans[column], embedding.scans.subject_id,
                                                 scanner_folds, permutations, seed) for column in pop.SCANNER}
        points, change = pop.longitudinal_change(embedding, embedding.scans.set_index("scan_id").mean_grade,
                                                 bootstrap, ci_level, seed)
        table = base[["subject_id"]].assign(group=groups)
        for i in range(z.shape[1]):
            table[f"pc{i + 1}"] = z[:, i]
        table = pd.concat([table, covariates.reset_index(drop=True)], axis=1)
        found = tests[tests.q <= fdr]
        summary.update(
            components=int(z.shape[1]), explained_variance=[float(v) for v in embedding.explained],
            bic={str(i + 1): b for i, b in enumerate(bic)}, groups=k,
            group_sizes={str(g): int((groups == g).sum()) for g in np.unique(groups)}, stability=stability,
            significant=[{key: int(v) if key in ("group", "component") else v for key, v in row.items()
                          if not pd.isna(v) and v != ""}
                         for row in found[["analysis", "group", "component", "covariate", "category", "effect",
                                           "effect_kind", "q"]].to_dict("records")],
            scanner_confound=confound, longitudinal=change,
            longitudinal_points=points.to_dict("records"))
        log.info("%d subjects: %d group(s) by BIC, bootstrap ARI %.2f; %d of %d tests at q <= %g; field strength "
                 "from the embedding: balanced accuracy %s", len(base), k, stability["mean"], len(found), len(tests),
                 fdr, confound["field_strength"].get("balanced_accuracy", "skipped"))
    for path in (out_subjects, out_tests, out_summary):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_subjects, index=False)
    table.to_csv(out_subjects.with_suffix(".csv"), index=False)
    tests.to_csv(out_tests, index=False)
    out_summary.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.population", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pooled", type=cli.existing_file, required=True,
                        help="disc_pooled.npy of the disc_features stage (one row per disc row of discs.npy).")
    parser.add_argument("--volumes", type=cli.existing_file, required=True, help="volumes.parquet of the splits stage.")
    parser.add_argument("--manifest", type=cli.existing_file, required=True,
                        help="manifest.parquet of the ingest stage (age, sex, vendor, field strength).")
    parser.add_argument("--out-subjects", type=Path, required=True,
                        help="Output: groups, components and covariates per subject (Parquet).")
    parser.add_argument("--out-tests", type=Path, required=True, help="Output: enrichment and association tests (CSV).")
    parser.add_argument("--out-summary", type=Path, required=True, help="Output: the findings (JSON).")
    cli.add_section_options(parser, "population")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    section = cli.section_from_args(args, "population", parser)
    cli.setup_logging(args.log, "population")
    with threadpool_limits(1):   # many small fits (mixtures, discriminants): one BLAS thread is faster
        run(args.pooled, args.volumes, args.manifest, args.out_subjects, args.out_tests, args.out_summary,
            **section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
