"""Stage splits: who is used for what, once for the whole workflow, and the longitudinal training pairs.

Splits are by family (twins together), so by subject (Jamaludin et al. 2017, sections 4.1 and 4.2):

- The downstream grading split (default 670 / 50 / 200 subjects, scaled to the graded subjects of the cohort): a
  family with any follow-up scan goes to training only; validation and test families are drawn from the rest.
- The self-supervision split (default 80:10:10) is drawn from every family that is *not* in the downstream
  validation or test part, so no downstream test subject is ever seen by pretraining, not even unlabelled. This is
  checked in code (the stage fails if it is not so), and stated in ``summary.json``.
- Label-fraction subsets of the downstream training part are drawn by the probe jobs themselves
  (stages/evaluation/probe_data.py), so that adding a subset to the config re-runs nothing that exists.

Pairs (vertebral bodies, same level only): positives are the same subject in two different studies (every pair of
its studies), with the years between them; negatives are the same level of two different subjects of the same part,
``negative_ratio`` per positive, a share of them hard (the subject's twin). Pairs never cross split parts.

Run:
    python -m stages.splits --subjects results/ingest/subjects.parquet --gradings results/ingest/gradings.parquet \\
        --index results/extract/index.parquet --out-subjects results/splits/subjects.parquet \\
        --out-volumes results/splits/volumes.parquet --out-pairs results/splits/pairs.parquet \\
        --out-summary results/splits/summary.json

Writes (each Parquet table with a CSV copy beside it) --out-subjects (parts per subject), --out-volumes (every
extracted volume with its labels and parts), --out-pairs (part, a, b: rows of vertebrae.npy, level, positive, hard,
years) and --out-summary (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.archive.manifest import write_table
from stages.core import cli
from stages.core.config import section_config

log = logging.getLogger("splits")
SSL_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """The ``splits`` section of the config (see its schema)."""

    seed: int
    ssl_fractions: tuple[float, float, float]
    downstream_counts: tuple[int, int, int]
    negative_ratio: float
    hard_negative_share: float

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> SplitConfig:
        """Validate a (partial) ``splits`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "splits", section)


def subject_table(index: pd.DataFrame, subjects: pd.DataFrame, gradings: pd.DataFrame) -> pd.DataFrame:
    """One row per subject with extracted volumes: family (own id when unknown), scans, follow-up, graded."""
    scans = index.groupby("subject_id").scan_id.nunique().rename("n_scans")
    table = scans.reset_index()
    family = subjects.set_index("subject_id").family_id if "family_id" in subjects else pd.Series(dtype=str)
    table["family_id"] = [family.get(s, s) if isinstance(family.get(s, s), str) else s for s in table.subject_id]
    table["has_followup"] = table.n_scans > 1
    table["graded"] = table.subject_id.isin(set(gradings.subject_id))
    return table.sort_values("subject_id").reset_index(drop=True)


def _families_in_order(families: list[str], rng: np.random.Generator) -> list[str]:
    ordered = sorted(set(families))
    return [ordered[i] for i in rng.permutation(len(ordered))]


def assign_parts(table: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Add ``downstream_part`` (train / val / test / none) and ``ssl_part`` (train / val / test / excluded)."""
    rng = np.random.default_rng([cfg.seed, 1])
    table = table.copy()
    table["downstream_part"] = np.where(table.graded, "train", "none")
    graded = table[table.graded]
    followup_families = set(table.family_id[table.has_followup])
    eligible = graded[~graded.family_id.isin(followup_families)]
    total = sum(cfg.downstream_counts)
    want = {"test": round(len(graded) * cfg.downstream_counts[2] / total),
            "val": round(len(graded) * cfg.downstream_counts[1] / total)}
    sizes = eligible.groupby("family_id").size()
    for family in _families_in_order(eligible.family_id.tolist(), rng):
        for part in ("test", "val"):
            taken = (table.downstream_part == part).sum()
            if taken + sizes[family] <= want[part] or (taken == 0 and want[part] > 0):
                table.loc[(table.family_id == family) & table.graded, "downstream_part"] = part
                break
    held_out = set(table.family_id[table.downstream_part.isin(["val", "test"])])
    table["ssl_part"] = "excluded"
    free = table[~table.family_id.isin(held_out)]
    families = _families_in_order(free.family_id.tolist(), np.random.default_rng([cfg.seed, 2]))
    counts = free.groupby("family_id").size()
    targets = np.cumsum(np.array(cfg.ssl_fractions) / sum(cfg.ssl_fractions)) * len(free)
    done = 0
    for family in families:
        part = SSL_PARTS[min(int(np.searchsorted(targets, done, side="right")), 2)]
        table.loc[table.family_id == family, "ssl_part"] = part
        done += counts[family]
    check_leakage(table)
    return table


def check_leakage(table: pd.DataFrame) -> None:
    """Fail unless every family is in one part of each split, and no downstream validation or test subject is in
    any part that pretraining reads."""
    for column in ("downstream_part", "ssl_part"):
        parts = table[table[column] != "none"]  # an ungraded twin is in no downstream part, which is no split
        per_family = parts.groupby("family_id")[column].nunique()
        if (per_family > 1).any():
            raise RuntimeError(f"a family is split across {column} parts: {per_family[per_family > 1].index[0]}")
    leaked = table[table.downstream_part.isin(["val", "test"]) & (table.ssl_part != "excluded")]
    if len(leaked):
        raise RuntimeError(f"{len(leaked)} downstream validation/test subject(s) would be seen by pretraining")
    followups = table[table.has_followup & table.downstream_part.isin(["val", "test"])]
    if len(followups):
        raise RuntimeError(f"{len(followups)} subject(s) with follow-up scans in downstream validation/test")


def make_pairs(volumes: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Positive and negative vertebral-body pairs within each self-supervision part (``volumes`` carries the parts)."""
    bodies = volumes[volumes.kind == "vertebra"]
    rng = np.random.default_rng([cfg.seed, 4])
    rows = []
    for part in SSL_PARTS:
        here = bodies[bodies.ssl_part == part]
        positives = []
        for (_, level), group in here.groupby(["subject_id", "level"], sort=True):
            group = group.sort_values("days_since_first_study")
            for a, b in combinations(group.itertuples(), 2):
                positives.append({"a": a.row, "b": b.row, "level": level, "positive": True, "hard": False,
                                  "years": abs(b.days_since_first_study - a.days_since_first_study) / 365.25})
        n_negative = int(round(cfg.negative_ratio * len(positives)))
        negatives = []
        by_level = {level: g.reset_index(drop=True) for level, g in here.groupby("level")}
        levels_present = sorted(by_level)
        attempts = 0
        while len(negatives) < n_negative and levels_present and attempts < 50 * max(n_negative, 1):
            attempts += 1
            group = by_level[levels_present[rng.integers(len(levels_present))]]
            a = group.iloc[rng.integers(len(group))]
            hard = rng.random() < cfg.hard_negative_share
            pool = group[(group.subject_id != a.subject_id)
                         & ((group.family_id == a.family_id) if hard else (group.family_id != a.family_id))]
            if pool.empty:
                continue
            b = pool.iloc[rng.integers(len(pool))]
            negatives.append({"a": int(a.row), "b": int(b.row), "level": a.level, "positive": False, "hard": hard,
                              "years": np.nan})
        rows += [{"part": part, **r} for r in positives + negatives]
    return pd.DataFrame(rows, columns=["part", "a", "b", "level", "positive", "hard", "years"])


def volume_labels(index: pd.DataFrame, gradings: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Every extracted volume with its labels (level; a disc's Pfirrmann grade and herniation where graded) and
    its parts in both splits."""
    keys = ["subject_id", "study_id", "level"]
    if set(keys) <= set(gradings.columns):
        out = index.merge(gradings, on=keys, how="left")
    else:  # no gradings table (e.g. an unlabelled cohort): volumes carry their level only
        out = index.copy()
    return out.merge(table[["subject_id", "family_id", "ssl_part", "downstream_part"]], on="subject_id", how="left")


OUTPUTS = {
    "subjects": "The parts of every subject (Parquet; a CSV copy beside it).",
    "volumes": "Every extracted volume with its labels and parts (Parquet; CSV beside it).",
    "pairs": "The pairs: part, a, b (rows of vertebrae.npy), level, positive, hard, years (Parquet; CSV beside it).",
    "summary": "The counts and the guarantee (JSON).",
}


def run(index_file: Path, subjects_file: Path, gradings_file: Path, out: dict[str, Path],
        cfg: SplitConfig) -> dict[str, Any]:
    """Split the subjects of the extraction index (``index_file``; ingest's pseudonymised subjects and gradings
    tables) and draw the pairs; write the OUTPUTS named in ``out``."""
    index = pd.read_parquet(index_file)
    subjects = pd.read_parquet(subjects_file)
    gradings = pd.read_parquet(gradings_file)
    table = assign_parts(subject_table(index, subjects, gradings), cfg)
    volumes = volume_labels(index, gradings, table)
    pairs = make_pairs(volumes, cfg)
    for name, frame in (("subjects", table), ("volumes", volumes), ("pairs", pairs)):
        write_table(frame, out[name])
    summary = summarise(table, volumes, pairs)
    out["summary"].parent.mkdir(parents=True, exist_ok=True)
    out["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    log.info("downstream train/val/test subjects %s; self-supervision train/val/test/excluded %s; pairs %s",
             summary["downstream_subjects"], summary["ssl_subjects"], summary["pairs"])
    return summary


def summarise(table: pd.DataFrame, volumes: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    grades = volumes[volumes.kind == "disc"]
    grade_column = "pfirrmann" if "pfirrmann" in grades else None
    return {
        "guarantee": "no downstream validation or test subject (or family member) is in any self-supervision part; "
                     "subjects with follow-up scans are in downstream training only; families are never split",
        "downstream_subjects": table.downstream_part.value_counts().to_dict(),
        "ssl_subjects": table.ssl_part.value_counts().to_dict(),
        "scans_per_ssl_part": volumes.groupby("ssl_part").scan_id.nunique().to_dict(),
        "followup_subjects_per_ssl_part": table[table.has_followup].ssl_part.value_counts().to_dict(),
        "pairs": {f"{part} {'positive' if pos else 'negative'}": int(n)
                  for (part, pos), n in pairs.groupby(["part", "positive"]).size().items()},
        "grade_distribution_per_downstream_part": (
            {part: {str(int(g)): int(n) for g, n in grp[grade_column].dropna().value_counts().sort_index().items()}
             for part, grp in grades.groupby("downstream_part")} if grade_column else {}),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.splits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=cli.existing_file, required=True, help="index.parquet of the extraction.")
    parser.add_argument("--subjects", type=cli.existing_file, required=True,
                        help="Ingest's subjects.parquet (families; may be empty).")
    parser.add_argument("--gradings", type=cli.existing_file, required=True,
                        help="Ingest's gradings.parquet (which subjects are graded; may be empty).")
    cli.add_section_options(parser, "splits")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = SplitConfig.from_config(cli.section_from_args(args, "splits", parser))
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    cli.setup_logging(args.log, "splits")
    run(args.index, args.subjects, args.gradings, out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
