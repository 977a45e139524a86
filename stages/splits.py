"""Stage splits: who is used for what, once for the whole workflow, and the longitudinal training pairs.

Splits are by family (twins together), so by subject (Jamaludin et al. 2017, sections 4.1 and 4.2). A subject is a
*follow-up subject* when its scans were taken at two or more times (different ``days_since_first_study`` in the
extraction index); several scans of one visit (e.g. a T1 and a T2) do not make it one.

- The downstream grading split (default 670 / 50 / 200 subjects, scaled to the graded subjects of the cohort): a
  family with any follow-up subject goes to training only; validation and test families are drawn from the rest.
- The self-supervision split (default 80:10:10 by subject; the paper's 339:42:42 of the 423 subjects with several
  scans) is drawn from every family that is *not* in the downstream validation or test part, so no downstream test
  subject is ever seen by pretraining, not even unlabelled. This is checked in code (the stage fails if it is not
  so), and stated in ``summary.json``. It is stratified: the families with a follow-up subject, those with several
  scans of one visit only (when ``same_session_pairs``), and the others are each dealt into the three parts in the
  ``ssl_fractions``, a family to one part; a stratum of at least three families gives one to every part first, so
  that every part has positive pairs.
- Label-fraction subsets of the downstream training part are drawn by the probe jobs themselves
  (stages/evaluation/probe_data.py), so that adding a subset to the config re-runs nothing that exists.

Pairs (volumes of one structure, ``--structure``: vertebral bodies, the paper's, or discs; same level only; never
across self-supervision parts; volumes the extraction flagged are left out of everything):

- Positives: two scans of one subject, a the earlier and b the later, every pair of its scans. A pair taken at
  different times is the paper's "years apart" positive (``years`` > 0). A pair of one visit (``years`` 0; NaN when a
  scan has no date) is a positive too when ``same_session_pairs`` (on a cohort without follow-ups, e.g. SPIDER's T1
  and T2, they are its only positives).
- Negatives, drawn like the positives so that the pair AUC measures the subject, not the scanner or the visit: for a
  positive (a, b) of subject s, a negative pairs a with the same level of a scan of another subject t of the same
  kind of visit as b: a follow-up scan of t (not t's first time) when b is a follow-up of s, else a first-visit scan
  of t; so negatives have the visit structure, hence the field-strength mix, of the positives (the demo's baselines
  are 1.0 T, its follow-ups 1.5 T). ``negative_ratio`` negatives per positive (a fractional ratio spread over the
  positives in a random order), ``hard_negative_share`` of them from s's twin (t of s's family) when the part holds
  one with such a scan, the others from other families (when one of the two runs short, the rest from the other).
  Drawn without replacement: no pair of volumes is a negative twice within a part (in either order); when the pool
  runs out a positive gets fewer, and ``summary.json`` counts the shortfall. Seeded (``seed``): the same tables give the same pairs.

Run:
    python -m stages.splits --subjects results/ingest/subjects.parquet --gradings results/ingest/gradings.parquet \\
        --index results/extract/index.parquet --structure vertebra --out-subjects results/splits/subjects.parquet \\
        --out-volumes results/splits/volumes.parquet --out-pairs results/splits/pairs.parquet \\
        --out-summary results/splits/summary.json

Writes (each Parquet table with a CSV copy beside it) --out-subjects (parts per subject), --out-volumes (every
unflagged extracted volume with its labels and parts), --out-pairs (part, a, b: rows of the structure's array,
vertebrae.npy or discs.npy, level, positive, hard, years) and --out-summary (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.archive.manifest import write_table
from stages.core import cli
from stages.core.config import load_schema, section_config

log = logging.getLogger("splits")
SSL_PARTS = ("train", "val", "test")
ARRAY_OF = {"vertebra": "vertebrae", "disc": "discs"}  # the structure (volumes.kind) -> its array, which ``row`` indexes
PAIR_COLUMNS = ["part", "a", "b", "level", "positive", "hard", "years"]


@dataclass(frozen=True)
class SplitConfig:
    """The ``splits`` section of the config (see its schema)."""

    seed: int
    ssl_fractions: tuple[float, float, float]
    downstream_counts: tuple[int, int, int]
    negative_ratio: float
    hard_negative_share: float
    same_session_pairs: bool

    def __post_init__(self) -> None:
        if sum(self.ssl_fractions) <= 0:
            raise ValueError(f"ssl_fractions must have a share > 0, got {list(self.ssl_fractions)}")

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> SplitConfig:
        """Validate a (partial) ``splits`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "splits", section)


def usable_volumes(index: pd.DataFrame) -> pd.DataFrame:
    """The volumes of the extraction index that extraction did not flag (its ``flag`` column empty or absent)."""
    if "flag" not in index:
        return index
    flagged = index.flag.fillna("").astype(str) != ""
    if flagged.any():
        log.warning("%d flagged volume(s) left out (e.g. %s %s: %s)", flagged.sum(), index.scan_id[flagged].iloc[0],
                    index.level[flagged].iloc[0], index.flag[flagged].iloc[0])
    return index[~flagged].reset_index(drop=True)


def subject_table(index: pd.DataFrame, subjects: pd.DataFrame, gradings: pd.DataFrame) -> pd.DataFrame:
    """One row per subject with extracted volumes: family (own id when unknown), scans, sessions (distinct times of
    its scans), follow-up (two or more sessions), graded."""
    per_subject = index.groupby("subject_id")
    table = pd.DataFrame({"n_scans": per_subject.scan_id.nunique(),
                          "n_sessions": per_subject.days_since_first_study.nunique()}).reset_index()
    family = subjects.set_index("subject_id").family_id if "family_id" in subjects else pd.Series(dtype=str)
    table["family_id"] = [family.get(s, s) if isinstance(family.get(s, s), str) else s for s in table.subject_id]
    table["has_followup"] = table.n_sessions > 1
    table["graded"] = table.subject_id.isin(set(gradings.subject_id))
    return table.sort_values("subject_id").reset_index(drop=True)


def _families_in_order(families: list[str], rng: np.random.Generator) -> list[str]:
    ordered = sorted(set(families))
    return [ordered[i] for i in rng.permutation(len(ordered))]


def deal(sizes: pd.Series, fractions: tuple[float, ...], rng: np.random.Generator) -> dict[str, str]:
    """Families (``sizes``: subjects per family) dealt into SSL_PARTS in proportion to ``fractions`` of their subjects,
    in a random order: when there are enough families, first one to each part with a share (smallest share first),
    then each to the part furthest below its share."""
    share = np.asarray(fractions, float) / sum(fractions)
    target = share * sizes.sum()
    have = np.zeros(len(share))
    order = _families_in_order(sizes.index.tolist(), rng)
    open_parts = [int(p) for p in np.argsort(share, kind="stable") if share[p] > 0]
    first = open_parts if len(order) >= len(open_parts) else []
    parts = {}
    for i, family in enumerate(order):
        part = first[i] if i < len(first) else int(np.argmax(np.where(share > 0, target - have, -np.inf)))
        parts[family] = SSL_PARTS[part]
        have[part] += sizes[family]
    return parts


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
    per_family = free.groupby("family_id").agg(size=("subject_id", "size"), followup=("has_followup", "any"),
                                               several=("n_scans", "max"))
    stratum = np.where(per_family.followup, 0, np.where(cfg.same_session_pairs & (per_family.several > 1), 1, 2))
    for k in range(3):  # follow-up families; several scans of one visit only; the rest
        sizes = per_family["size"][stratum == k]
        for family, part in deal(sizes, cfg.ssl_fractions, np.random.default_rng([cfg.seed, 2, k])).items():
            table.loc[table.family_id == family, "ssl_part"] = part
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


def _positives(here: pd.DataFrame, same_session: bool) -> pd.DataFrame:
    """Every pair of two scans of one subject at one level (a the earlier; by scan id within a session, a scan without
    a date last), with the years between them; pairs of one session (years 0, or unknown) only when
    ``same_session``. Carries a's subject and family and whether b is a follow-up."""
    columns = ["row", "subject_id", "family_id", "level", "scan_id", "days_since_first_study", "followup"]
    both = here[columns].merge(here[columns], on=["subject_id", "level"], suffixes=("_a", "_b"))
    day_a, day_b = both.days_since_first_study_a.fillna(np.inf), both.days_since_first_study_b.fillna(np.inf)
    earlier = (day_a < day_b) | ((day_a == day_b) & (both.scan_id_a < both.scan_id_b))
    both = both[earlier].assign(years=(both.days_since_first_study_b - both.days_since_first_study_a) / 365.25)
    if not same_session:
        both = both[both.years > 0]
    out = pd.DataFrame({"a": both.row_a.astype(int), "b": both.row_b.astype(int), "level": both.level,
                        "positive": True, "hard": False, "years": both.years.astype(float),
                        "subject_id": both.subject_id, "family_id": both.family_id_a, "followup": both.followup_b})
    return out.sort_values(["a", "b"]).reset_index(drop=True)


def _negatives(here: pd.DataFrame, positives: pd.DataFrame, cfg: SplitConfig,
               rng: np.random.Generator) -> list[dict]:
    """The negatives of one part's positives (see the module docstring), without replacement."""
    pools = {key: (g.row.to_numpy(), g.subject_id.to_numpy(), g.family_id.to_numpy())
             for key, g in here.groupby(["level", "followup"], sort=True)}
    order = rng.permutation(len(positives))
    counts = np.diff(np.round(np.arange(len(positives) + 1) * cfg.negative_ratio).astype(int))
    records = positives.to_dict("records")
    used: dict[int, set[int]] = {}
    twin_slots = 0
    negatives = []
    for i, k in zip(order, counts):
        pos = records[i]
        if not k or (pos["level"], pos["followup"]) not in pools:
            continue
        rows, subject, family = pools[(pos["level"], pos["followup"])]
        free = (subject != pos["subject_id"]) & ~np.isin(rows, list(used.get(pos["a"], ())))
        twin, other = free & (family == pos["family_id"]), free & (family != pos["family_id"])
        n_hard = 0
        if twin.any():  # hard_negative_share of the negatives of subjects with a twin to draw from, exactly
            n_hard = int(np.floor((twin_slots + k) * cfg.hard_negative_share) -
                         np.floor(twin_slots * cfg.hard_negative_share))
            twin_slots += k
        n_other = min(k - min(n_hard, int(twin.sum())), int(other.sum()))
        n_hard = min(k - n_other, int(twin.sum()))  # a pool that runs short: the rest from the other one
        for pool, n, hard in ((rows[twin], n_hard, True), (rows[other], n_other, False)):
            for b in rng.choice(pool, n, replace=False) if n else ():
                used.setdefault(pos["a"], set()).add(int(b))
                used.setdefault(int(b), set()).add(pos["a"])
                negatives.append({"a": pos["a"], "b": int(b), "level": pos["level"], "positive": False,
                                  "hard": hard, "years": np.nan})
    return negatives


def make_pairs(volumes: pd.DataFrame, cfg: SplitConfig, structure: str = "vertebra") -> pd.DataFrame:
    """Positive and negative pairs of ``structure`` volumes (rows of its array) within each self-supervision part
    (``volumes`` carries the parts), as the module docstring says."""
    if structure not in ARRAY_OF:
        raise ValueError(f"structure must be one of {sorted(ARRAY_OF)}, got {structure!r}")
    first = volumes.groupby("subject_id").days_since_first_study.min()
    volumes = volumes.assign(followup=volumes.days_since_first_study > volumes.subject_id.map(first))
    chosen = volumes[volumes.kind == structure]
    rng = np.random.default_rng([cfg.seed, 4])
    rows = []
    for part in SSL_PARTS:
        here = chosen[chosen.ssl_part == part]
        positives = _positives(here, cfg.same_session_pairs)
        pairs = positives[PAIR_COLUMNS[1:]].to_dict("records") + _negatives(here, positives, cfg, rng)
        rows += [{"part": part, **r} for r in pairs]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS).astype({"a": int, "b": int, "positive": bool, "hard": bool,
                                                            "years": float})


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
    "volumes": "Every unflagged extracted volume with its labels and parts (Parquet; CSV beside it).",
    "pairs": "The pairs: part, a, b (rows of the structure's array), level, positive, hard, years (Parquet; CSV "
             "beside it).",
    "summary": "The counts and the guarantee (JSON).",
}


def run(index_file: Path, subjects_file: Path, gradings_file: Path, out: dict[str, Path],
        cfg: SplitConfig, structure: str = "vertebra") -> dict[str, Any]:
    """Split the subjects of the extraction index (``index_file``; ingest's pseudonymised subjects and gradings
    tables) and draw the pairs of ``structure`` volumes; write the OUTPUTS named in ``out``."""
    index = pd.read_parquet(index_file)
    usable = usable_volumes(index)
    subjects = pd.read_parquet(subjects_file)
    gradings = pd.read_parquet(gradings_file)
    table = assign_parts(subject_table(usable, subjects, gradings), cfg)
    volumes = volume_labels(usable, gradings, table)
    pairs = make_pairs(volumes, cfg, structure)
    for name, frame in (("subjects", table), ("volumes", volumes), ("pairs", pairs)):
        write_table(frame, out[name])
    summary = summarise(table, volumes, pairs, cfg, structure) | {"flagged_volumes_left_out": len(index) - len(usable)}
    out["summary"].parent.mkdir(parents=True, exist_ok=True)
    out["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    log.info("downstream train/val/test subjects %s; self-supervision train/val/test/excluded %s; %s pairs %s",
             summary["downstream_subjects"], summary["ssl_subjects"], structure, summary["pairs"])
    for part, counts in summary["negative_pairs_per_ssl_part"].items():
        if counts["short"]:
            log.warning("ssl %s: %d of %d negative pairs could not be drawn (pool exhausted)", part, counts["short"],
                        counts["wanted"])
    return summary


def summarise(table: pd.DataFrame, volumes: pd.DataFrame, pairs: pd.DataFrame, cfg: SplitConfig,
              structure: str = "vertebra") -> dict:
    """The counts of ``summary.json``: subjects, scans and pairs per part (positives by interval, negatives wanted,
    drawn, hard and short of the pool), grades per downstream part."""
    grades = volumes[volumes.kind == "disc"]
    grade_column = "pfirrmann" if "pfirrmann" in grades else None
    positives, negatives = pairs[pairs.positive], pairs[~pairs.positive]
    by_interval, by_negative = {}, {}
    for part in SSL_PARTS:
        years = positives.years[positives.part == part]
        by_interval[part] = {"years_apart": int((years > 0).sum()), "same_session": int((years == 0).sum()),
                             "unknown_interval": int(years.isna().sum())}
        wanted = round(len(years) * cfg.negative_ratio)
        drawn = negatives[negatives.part == part]
        by_negative[part] = {"wanted": wanted, "drawn": len(drawn), "hard": int(drawn.hard.sum()),
                             "short": wanted - len(drawn)}
    return {
        "guarantee": "no downstream validation or test subject (or family member) is in any self-supervision part; "
                     "subjects with follow-up scans are in downstream training only; families are never split",
        "structure": structure,
        "array": f"{ARRAY_OF[structure]}.npy",
        "downstream_subjects": table.downstream_part.value_counts().to_dict(),
        "ssl_subjects": table.ssl_part.value_counts().to_dict(),
        "scans_per_ssl_part": volumes.groupby("ssl_part").scan_id.nunique().to_dict(),
        "followup_subjects_per_ssl_part": table[table.has_followup].ssl_part.value_counts().to_dict(),
        "pairs": {f"{part} {'positive' if pos else 'negative'}": int(n)
                  for (part, pos), n in pairs.groupby(["part", "positive"]).size().items()},
        "positive_pairs_per_ssl_part": by_interval,
        "negative_pairs_per_ssl_part": by_negative,
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
    structure = load_schema()["properties"]["pretrain"]["properties"]["structure"]  # the workflow passes its value
    parser.add_argument("--structure", choices=structure["enum"], default=structure["default"],
                        help=f"The volumes of the pairs (config pretrain.structure): {structure['description']} "
                             f"(default: {structure['default']})".replace("%", "%%"))
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
    run(args.index, args.subjects, args.gradings, out, cfg, args.structure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
