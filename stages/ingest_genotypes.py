"""Stage ingest_genotypes: a cohort's genotype table, pseudonymised (patient ids to subject ids under the ingest key)
and checked, for the genetics stage.

The table (CSV, config ``cohort.genotypes``): a ``patient_id`` column and one column per SNP holding the allele
dosage, 0, 1 or 2 copies of the counted allele (an empty cell: not called). Columns whose names look like identity
(name, birth date, ...) are dropped unread; columns of a subjects table (subject_id, family_id, sex, age, zygosity,
twin) are left out with a warning: they are not SNPs. Every row is accounted for in ``--out-rows``: used, or
rejected with the reason (no patient id, a second row of the same patient); a used row's dosages that are not 0, 1
or 2 (3, "AG", 1.5) are set to not called, and the row's entry names how many and which SNPs. An empty table, one
with no SNP column or no usable row is an error.

Run:
    python -m stages.ingest_genotypes --genotypes cohort/genotypes.csv --key-file pseudonym.key \\
        --out-genotypes results/ingest/genotypes.parquet --out-rows results/ingest/genotype_rows.csv
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from stages.archive import pseudonym as pn
from stages.core import cli

log = logging.getLogger("ingest_genotypes")

NOT_SNPS = re.compile(r"subject_id|study_uid|study_id|family_id|sex|gender|zygosity|twin|age.*|graded|n_studies",
                      re.I)
DOSAGES = {"0": 0.0, "1": 1.0, "2": 2.0, "0.0": 0.0, "1.0": 1.0, "2.0": 2.0}


def read_genotypes(path: Path, key: bytes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pseudonymised dosage table (subject_id, one float column per SNP, NaN not called) and the report of every
    row (row: the line's number in the file, header line 1; subject_id; status used/rejected; detail)."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: a genotype table needs a header (patient_id, SNPs) and rows") from None
    if "patient_id" not in raw:
        raise ValueError(f"{path}: a genotype table needs a patient_id column; it has {list(raw.columns)[:8]}")
    snps = [c for c in raw.columns if c != "patient_id" and not pn.IDENTITY_COLUMNS.search(c)
            and not NOT_SNPS.fullmatch(c)]
    dropped = [c for c in raw.columns if c != "patient_id" and pn.IDENTITY_COLUMNS.search(c)]
    if dropped:
        log.warning("dropped %d identity-like column(s) unread", len(dropped))
    others = [c for c in raw.columns if c != "patient_id" and c not in dropped and c not in snps]
    if others:
        log.warning("not SNPs, left out: %s (subject and family columns belong in cohort.subjects)", ", ".join(others))
    if not snps:
        raise ValueError(f"{path}: no SNP column beside patient_id")
    cells = raw[snps].apply(lambda column: column.str.strip())
    dosage = cells.apply(lambda column: column.map(DOSAGES)).astype(float)
    invalid = cells.ne("") & dosage.isna()
    report, keep, first_row = [], [], {}
    for i, pid in enumerate(raw.patient_id.str.strip()):
        line = i + 2
        subject = pn.subject_id(key, pid) if pid else ""
        if not pid:
            report.append((line, "", "rejected", "no patient_id"))
        elif pid in first_row:
            report.append((line, subject, "rejected", f"a second row of this patient (line {first_row[pid]} kept)"))
        else:
            first_row[pid] = line
            keep.append(i)
            bad = [snps[j] for j in np.flatnonzero(invalid.iloc[i].to_numpy())]
            detail = (f"{len(bad)} dosage(s) not 0/1/2 set to not called: {', '.join(bad[:5])}"
                      + (" ..." if len(bad) > 5 else "")) if bad else ""
            report.append((line, subject, "used", detail))
    if not keep:
        raise ValueError(f"{path}: no usable row" + (" (every row lacks a patient_id or repeats one)" if len(raw)
                                                      else " (it has a header only)"))
    table = dosage.iloc[keep].reset_index(drop=True).astype("float32")
    table.insert(0, "subject_id", [pn.subject_id(key, raw.patient_id.iloc[i].strip()) for i in keep])
    rows = pd.DataFrame(report, columns=["row", "subject_id", "status", "detail"])
    return table, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest_genotypes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--genotypes", type=cli.existing_file, required=True,
                        help="CSV: patient_id and one allele-dosage column (0/1/2, empty = not called) per SNP.")
    pn.add_key_option(parser)
    parser.add_argument("--out-genotypes", type=Path, required=True,
                        help="Output: dosages per pseudonymous subject (Parquet).")
    parser.add_argument("--out-rows", type=Path, required=True, help="Output: every row, used or rejected (CSV).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    key = pn.key_from_args(args, parser)
    cli.setup_logging(args.log, "ingest_genotypes")
    try:
        table, rows = read_genotypes(args.genotypes, key)
    except ValueError as err:
        parser.error(str(err))
    for path in (args.out_genotypes, args.out_rows):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(args.out_genotypes, index=False)
    rows.to_csv(args.out_rows, index=False)
    log.info("%d subjects x %d SNPs (%.1f%% called); %d row(s) rejected", len(table), table.shape[1] - 1,
             100 * float(table.iloc[:, 1:].notna().to_numpy().mean()), int((rows.status == "rejected").sum()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
