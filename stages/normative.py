"""Stage normative: a normative model of healthy discs in one frozen encoder's disc features, and each held-out disc's
deviation from it, against grade and age (stages/evaluation/normative.py).

Reference: the discs of the downstream training subjects graded Pfirrmann <= ``--healthy-max-grade``. Evaluated: the
graded discs of the downstream test subjects, whom neither the encoders' pretraining nor any probe learnt from. The
features are those the disc probes read (``disc_features``' ``pooled.npy``: Conv5's maps of each disc volume,
averaged and maximised over positions), one row per disc row of the extract stage's discs.npy.

Run:
    python -m stages.normative --pooled results/probes/features/siamese/disc_pooled.npy \\
        --volumes results/splits/volumes.parquet --manifest results/ingest/manifest.parquet \\
        --out-deviations results/report/normative/siamese.parquet --out-summary results/report/normative/siamese.json

Writes ``--out-deviations`` (Parquet, a CSV copy beside it): one row per reference and evaluated disc: row, scan_id
and subject_id (pseudonymous), part (reference | test), level, grade, age_years, deviation, model (the level's own
model or "all levels"); ``--out-summary`` (JSON): the reference discs per model, and on the test discs the mean
deviation per grade, Spearman's rho with grade and the slope per decade of age, with bootstrap intervals. A cohort
with fewer than 3 healthy reference discs or 2 test subjects with graded discs gets no model: an empty table and
the reason (``skipped``) in the summary, which the figure shows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import cli
from stages.evaluation.normative import bootstrap_trends, fit_normative

log = logging.getLogger("normative")
COLUMNS = ["row", "scan_id", "subject_id", "part", "level", "grade", "age_years", "deviation", "model"]


def disc_parts(volumes: pd.DataFrame, manifest: pd.DataFrame, healthy_max_grade: int) -> pd.DataFrame:
    """The reference discs (downstream training subjects, grade <= ``healthy_max_grade``) and the graded discs of
    the downstream test subjects, with the scan's age."""
    if "pfirrmann" not in volumes:   # a cohort without gradings
        volumes = volumes.assign(pfirrmann=np.nan)
    discs = volumes[(volumes.kind == "disc") & volumes.pfirrmann.notna()]
    reference = discs[(discs.downstream_part == "train") & (discs.pfirrmann <= healthy_max_grade)]
    test = discs[discs.downstream_part == "test"]
    table = pd.concat([reference.assign(part="reference"), test.assign(part="test")], ignore_index=True)
    age = dict(zip(manifest.scan_id, manifest.age_years)) if "age_years" in manifest else {}
    table["age_years"] = table.scan_id.map(age).astype(float)
    return table.rename(columns={"pfirrmann": "grade"})[
        ["row", "scan_id", "subject_id", "part", "level", "grade", "age_years"]].reset_index(drop=True)


def run(pooled: Path, volumes: Path, manifest: Path, out_deviations: Path, out_summary: Path,
        healthy_max_grade: int = 2, components: int = 8, min_per_level: int = 10, bootstrap: int = 1000,
        ci_level: float = 0.95, seed: int = 0) -> dict:
    features = np.load(pooled, mmap_mode="r")
    table = disc_parts(pd.read_parquet(volumes), pd.read_parquet(manifest), healthy_max_grade)
    if len(table) and table.row.max() >= len(features):
        raise ValueError(f"{volumes} names disc rows beyond the {len(features)} rows of {pooled}: the features and "
                         "the splits are from different runs")
    reference = table[table.part == "reference"]
    test = table[table.part == "test"]
    summary: dict = {"features": str(pooled), "healthy_max_grade": healthy_max_grade}
    too_few = (f"{len(reference)} healthy reference disc(s) (at least 3 needed)" if len(reference) < 3 else
               f"{test.subject_id.nunique()} downstream test subject(s) with graded discs (at least 2 needed)"
               if test.subject_id.nunique() < 2 else "")
    if too_few:   # a small cohort: the report says so instead of the workflow failing
        log.warning("no normative model: the cohort has %s", too_few)
        table = table.iloc[:0].assign(deviation=pd.Series(dtype=float), model=pd.Series(dtype=str))
        summary["skipped"] = f"the cohort has {too_few}"
    else:
        model = fit_normative(np.asarray(features[reference.row.to_numpy()], dtype=np.float64),
                              reference.level.to_numpy(), components, min_per_level)
        table["deviation"] = model.deviation(np.asarray(features[table.row.to_numpy()], dtype=np.float64),
                                             table.level.to_numpy())
        table["model"] = [model.model_of(str(lv)) for lv in table.level]
        summary.update(components=int(model.pca.n_components_), reference_discs=model.counts,
                       test=bootstrap_trends(table[table.part == "test"], bootstrap, ci_level, seed))
    out_deviations.parent.mkdir(parents=True, exist_ok=True)
    table[COLUMNS].to_parquet(out_deviations, index=False)
    table[COLUMNS].to_csv(out_deviations.with_suffix(".csv"), index=False)
    out_summary.parent.mkdir(parents=True, exist_ok=True)
    out_summary.write_text(json.dumps(summary, indent=2) + "\n")
    if "test" in summary:
        rho = summary["test"]["spearman_grade"]
        log.info("%d reference discs, %d test discs of %d subjects: Spearman rho with grade %.3f %s; wrote %s",
                 len(reference), len(test), test.subject_id.nunique(), rho["value"], rho["ci"], out_summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.normative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pooled", type=cli.existing_file, required=True,
                        help="disc_pooled.npy of the disc_features stage (one row per disc row of discs.npy).")
    parser.add_argument("--volumes", type=cli.existing_file, required=True, help="volumes.parquet of the splits stage.")
    parser.add_argument("--manifest", type=cli.existing_file, required=True,
                        help="manifest.parquet of the ingest stage (the scans' ages).")
    parser.add_argument("--out-deviations", type=Path, required=True, help="Output: deviations per disc (Parquet).")
    parser.add_argument("--out-summary", type=Path, required=True, help="Output: the trends (JSON).")
    cli.add_section_options(parser, "normative")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    section = cli.section_from_args(args, "normative", parser)
    cli.setup_logging(args.log, "normative")
    run(args.pooled, args.volumes, args.manifest, args.out_deviations, args.out_summary, **section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
