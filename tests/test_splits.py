"""Splits by subject and family, stratified by follow-up, leakage, nested label subsets, pair counts computed
independently, negatives drawn like the positives, same-session scans, and disc pairs."""

from __future__ import annotations

import json
from itertools import pairwise
from math import comb

import numpy as np
import pandas as pd
import pytest

from stages.core import levels
from stages.evaluation.probe_data import label_subset
from stages.splits import (
    SSL_PARTS,
    SplitConfig,
    assign_parts,
    check_leakage,
    main,
    make_pairs,
    subject_table,
    summarise,
    volume_labels,
)

CFG = SplitConfig.from_config()


def _cohort(n: int = 240, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A TwinsUK-like cohort: 60% of subjects in twin pairs, 40% of families with follow-ups, 90% graded."""
    rng = np.random.default_rng(seed)
    subjects, index, row = [], [], 0
    family = 0
    while len(subjects) < n:
        size = 2 if rng.random() < 0.43 else 1
        scans = 1 + (rng.random() < 0.4) * (1 + (rng.random() < 0.3))
        for _ in range(size):
            sid = f"sub-{len(subjects):04d}"
            subjects.append({"subject_id": sid, "family_id": f"fam-{family:04d}", "n_scans": scans,
                             "has_followup": scans > 1, "graded": bool(rng.random() < 0.9)})
            for visit in range(scans):
                for level in levels.VERTEBRAE:
                    index.append({"array": "vertebrae", "row": row, "scan_id": f"{sid}-{visit}", "subject_id": sid,
                                  "study_id": f"ses-{sid}-{visit}", "days_since_first_study": 3650.0 * visit,
                                  "kind": "vertebra", "level": level})
                    row += 1
        family += 1
    table = pd.DataFrame(subjects)
    gradings = pd.DataFrame(columns=["subject_id", "study_id", "level", "pfirrmann", "herniation"])
    return table, pd.DataFrame(index), gradings


@pytest.fixture(scope="module")
def split():
    table, index, gradings = _cohort()
    parts = assign_parts(table, CFG)
    volumes = volume_labels(index, gradings, parts)
    return parts, volumes, make_pairs(volumes, CFG)


def test_families_never_straddle_parts_and_test_subjects_never_reach_pretraining(split):
    parts, volumes, pairs = split
    for column in ("downstream_part", "ssl_part"):
        assigned = parts[parts[column] != "none"]
        assert (assigned.groupby("family_id")[column].nunique() == 1).all()
    held_out = parts[parts.downstream_part.isin(["val", "test"])]
    assert len(held_out) and (held_out.ssl_part == "excluded").all()
    held_families = set(held_out.family_id)
    assert (parts[parts.family_id.isin(held_families)].ssl_part == "excluded").all()
    assert not (parts.has_followup & parts.downstream_part.isin(["val", "test"])).any()
    # Everything pretraining reads: the pairs and the volumes of the self-supervision train and val parts.
    read = volumes[volumes.ssl_part.isin(["train", "val"])]
    rows = set(pairs[pairs.part.isin(["train", "val"])][["a", "b"]].to_numpy().ravel())
    by_row = volumes.set_index("row")
    assert not set(read.subject_id) & set(held_out.subject_id)
    assert not set(by_row.loc[sorted(rows), "subject_id"]) & set(held_out.subject_id)


def test_downstream_parts_are_the_papers_proportions_of_the_graded_subjects(split):
    parts, _, _ = split
    graded = parts.graded.sum()
    counts = parts.downstream_part.value_counts()
    assert abs(counts["test"] - graded * 200 / 920) <= 2 and abs(counts["val"] - graded * 50 / 920) <= 2
    assert counts["train"] + counts["val"] + counts["test"] == graded
    ssl = parts[parts.ssl_part != "excluded"].ssl_part.value_counts(normalize=True)
    assert ssl["train"] == pytest.approx(0.8, abs=0.05) and ssl["test"] == pytest.approx(0.1, abs=0.05)


def test_label_subsets_are_nested_by_subject_within_downstream_training(split):
    parts, _, _ = split
    train = set(parts.subject_id[parts.downstream_part == "train"])
    fractions = (0.358, 0.539, 1.0)
    firsts = []
    for seed in range(3):
        members = [set(label_subset(parts, f, seed, seed=0)) for f in fractions]
        assert all(m <= train for m in members)
        assert all(small < large for small, large in pairwise(members))
        assert [len(m) for m in members] == [int(np.ceil(f * len(train))) for f in fractions]
        firsts.append(frozenset(members[0]))
        assert set(label_subset(parts, 0.358, seed, seed=0)) == members[0]   # a function of (fraction, seed) alone
    assert len(set(firsts)) == 3  # each seed its own nesting
    assert set(label_subset(parts, 0.358, 0, seed=1)) != firsts[0]


def test_pair_counts_equal_what_the_cohort_implies(split):
    parts, volumes, pairs = split
    for part in ("train", "val", "test"):
        here = parts[parts.ssl_part == part]
        expected = sum(comb(n, 2) for n in here.n_scans) * len(levels.VERTEBRAE)
        got = pairs[(pairs.part == part) & pairs.positive]
        assert len(got) == expected
        assert len(pairs[(pairs.part == part) & ~pairs.positive]) == round(CFG.negative_ratio * expected)
    by_row = volumes.set_index("row")
    a, b = by_row.loc[pairs.a], by_row.loc[pairs.b]
    assert (a.level.to_numpy() == b.level.to_numpy()).all() and (a.level.to_numpy() == pairs.level.to_numpy()).all()
    same = a.subject_id.to_numpy() == b.subject_id.to_numpy()
    assert (same == pairs.positive.to_numpy()).all()
    assert (a.scan_id.to_numpy() != b.scan_id.to_numpy()).all()
    assert (a.ssl_part.to_numpy() == pairs.part.to_numpy()).all() and (b.ssl_part.to_numpy() == pairs.part.to_numpy()).all()
    hard = pairs.hard.to_numpy()
    assert hard.any() and (a.family_id.to_numpy()[hard] == b.family_id.to_numpy()[hard]).all()
    positives = pairs[pairs.positive]
    assert positives.years.between(9.9, 20.1).all()


def test_same_seed_same_tables_other_seed_other_tables():
    table, index, gradings = _cohort()
    one, two = assign_parts(table, CFG), assign_parts(table, CFG)
    pd.testing.assert_frame_equal(one, two)
    v = volume_labels(index, gradings, one)
    pd.testing.assert_frame_equal(make_pairs(v, CFG), make_pairs(v, CFG))
    other = assign_parts(table, SplitConfig.from_config({"seed": 1}))
    assert not one.downstream_part.equals(other.downstream_part)
    assert not one.ssl_part.equals(other.ssl_part)


def test_a_leak_is_refused_in_code(split):
    parts, _, _ = split
    forged = parts.copy()
    victim = forged.index[forged.downstream_part == "test"][0]
    forged.loc[victim, "ssl_part"] = "train"
    with pytest.raises(RuntimeError, match="seen by pretraining"):
        check_leakage(forged)


# Stratified self-supervision split, negatives drawn like the positives, same-session scans, disc pairs.

NO_GRADINGS = pd.DataFrame(columns=["subject_id", "study_id", "level", "pfirrmann", "herniation"])


def _index(scans: dict[str, list[float]], discs: bool = False) -> pd.DataFrame:
    """An extraction index: each subject's scans at the given days since its first study, each scan's 7 bodies
    (rows of vertebrae.npy) and, with ``discs``, its 6 discs (rows of discs.npy, numbered on their own)."""
    rows, counter = [], {"vertebrae": 0, "discs": 0}
    for sid, days in scans.items():
        for visit, day in enumerate(days):
            for kind, array, names in (("vertebra", "vertebrae", levels.VERTEBRAE), ("disc", "discs", levels.DISCS)):
                if kind == "disc" and not discs:
                    continue
                for level in names:
                    rows.append({"array": array, "row": counter[array], "scan_id": f"{sid}-{visit}",
                                 "subject_id": sid, "study_id": f"ses-{sid}-{visit}", "days_since_first_study": day,
                                 "kind": kind, "level": level, "flag": ""})
                    counter[array] += 1
    return pd.DataFrame(rows)


def _own_families(scans: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame({"subject_id": list(scans), "family_id": [f"fam-{s}" for s in scans]})


def test_every_ssl_part_has_positive_pairs_when_three_families_have_follow_ups():
    # 3 follow-up subjects among 60: dealt without regard to follow-up, a part would mostly get none of them
    scans = {f"sub-{i:03d}": [0.0, 3650.0] if i in (5, 30, 55) else [0.0] for i in range(60)}
    index = _index(scans)
    table = subject_table(index, _own_families(scans), NO_GRADINGS)
    for seed in range(10):
        cfg = SplitConfig.from_config({"seed": seed})
        parts = assign_parts(table, cfg)
        pairs = make_pairs(volume_labels(index, NO_GRADINGS, parts), cfg)
        assert set(pairs.part[pairs.positive]) == set(SSL_PARTS), seed
        assert parts.ssl_part.value_counts(normalize=True)["train"] == pytest.approx(0.8, abs=0.05)


def test_follow_up_families_are_dealt_in_the_ssl_fractions(split):
    parts, _, pairs = split
    followup = parts[parts.has_followup & (parts.ssl_part != "excluded")].ssl_part.value_counts(normalize=True)
    assert followup["train"] == pytest.approx(0.8, abs=0.05) and followup["test"] == pytest.approx(0.1, abs=0.05)
    assert set(pairs.part[pairs.positive]) == set(SSL_PARTS)


def test_negatives_pair_an_earlier_scan_with_a_later_scan_of_another_subject_never_twice(split):
    _, volumes, pairs = split
    by_row = volumes.set_index("row")
    first = volumes.groupby("subject_id").days_since_first_study.min()
    positives, negatives = pairs[pairs.positive], pairs[~pairs.positive]
    a, b = by_row.loc[negatives.a], by_row.loc[negatives.b]
    # a: the earlier scan of one of the part's positive pairs (at that level)
    assert set(zip(negatives.part, negatives.a)) <= set(zip(positives.part, positives.a))
    # b: the same level of another subject's later scan (not its first), in the same part
    assert (a.subject_id.to_numpy() != b.subject_id.to_numpy()).all()
    assert (b.level.to_numpy() == negatives.level.to_numpy()).all()
    assert (b.days_since_first_study.to_numpy() > b.subject_id.map(first).to_numpy()).all()
    assert (a.ssl_part.to_numpy() == negatives.part.to_numpy()).all()
    assert (b.ssl_part.to_numpy() == negatives.part.to_numpy()).all()
    # hard: the twin; the others from other families
    assert ((a.family_id.to_numpy() == b.family_id.to_numpy()) == negatives.hard.to_numpy()).all()
    assert 0 < negatives.hard.mean() < 0.5
    # without replacement: no pair of volumes twice within a part, in either order
    key = [(p, min(x, y), max(x, y)) for p, x, y in zip(negatives.part, negatives.a, negatives.b)]
    assert len(set(key)) == len(key)


def test_same_seed_same_negatives_other_seed_other_negatives(split):
    _, volumes, pairs = split
    pd.testing.assert_frame_equal(make_pairs(volumes, CFG), pairs)
    other = make_pairs(volumes, SplitConfig.from_config({"seed": 1}))
    negatives = pairs[~pairs.positive].reset_index(drop=True)
    assert len(other[~other.positive]) == len(negatives)
    assert not other[~other.positive].reset_index(drop=True)[["a", "b"]].equals(negatives[["a", "b"]])


def test_negatives_run_out_rather_than_repeat_and_the_summary_counts_it():
    # one part, two follow-up subjects of different families: each positive has one negative to draw
    scans = {"sub-a": [0.0, 3650.0], "sub-b": [0.0, 4000.0], "sub-c": [0.0]}
    index = _index(scans)
    parts = subject_table(index, _own_families(scans), NO_GRADINGS).assign(ssl_part="train", downstream_part="none")
    volumes = volume_labels(index, NO_GRADINGS, parts)
    cfg = SplitConfig.from_config({"negative_ratio": 3.0})
    pairs = make_pairs(volumes, cfg)
    negatives = pairs[~pairs.positive]
    assert len(pairs[pairs.positive]) == 2 * 7 and len(negatives) == 2 * 7
    assert not negatives.duplicated(["a", "b"]).any()
    counts = summarise(parts, volumes, pairs, cfg)["negative_pairs_per_ssl_part"]["train"]
    assert counts == {"wanted": 42, "drawn": 14, "hard": 0, "short": 28}


def test_two_scans_of_one_visit_make_no_follow_up_subject_and_are_same_session_positives():
    # SPIDER-like: a T1 and a T2 of one visit for every subject, every subject graded
    scans = {f"sub-{i:03d}": [0.0, 0.0] for i in range(100)}
    index = _index(scans)
    gradings = pd.DataFrame({"subject_id": list(scans), "study_id": [f"ses-{s}-0" for s in scans], "level": "L4-L5",
                             "pfirrmann": 2, "herniation": 0})
    table = subject_table(index, _own_families(scans), gradings)
    assert (table.n_scans == 2).all() and not table.has_followup.any()
    parts = assign_parts(table, CFG)
    counts = parts.downstream_part.value_counts()
    assert counts["val"] > 0 and counts["test"] > 0
    volumes = volume_labels(index, gradings, parts)
    pairs = make_pairs(volumes, CFG)
    positives = pairs[pairs.positive]
    for part in SSL_PARTS:
        assert (positives.part == part).sum() == 7 * (parts.ssl_part == part).sum()
    assert (positives.years == 0).all()
    by_row = volumes.set_index("row")
    negatives = pairs[~pairs.positive]
    assert len(negatives) == len(positives)
    assert (by_row.loc[negatives.a].subject_id.to_numpy() != by_row.loc[negatives.b].subject_id.to_numpy()).all()
    by_interval = summarise(parts, volumes, pairs, CFG)["positive_pairs_per_ssl_part"]
    assert sum(c["same_session"] for c in by_interval.values()) == len(positives)
    assert sum(c["years_apart"] for c in by_interval.values()) == 0
    assert make_pairs(volumes, SplitConfig.from_config({"same_session_pairs": False})).empty


def test_a_later_time_makes_a_follow_up_and_both_kinds_of_positive_are_counted():
    scans = {"sub-a": [0.0, 0.0, 3652.5], "sub-b": [0.0, 0.0], "sub-c": [0.0, 1826.25]}
    index = _index(scans)
    table = subject_table(index, _own_families(scans), NO_GRADINGS).set_index("subject_id")
    assert table.has_followup.to_dict() == {"sub-a": True, "sub-b": False, "sub-c": True}
    parts = table.reset_index().assign(ssl_part="train", downstream_part="none")
    volumes = volume_labels(index, NO_GRADINGS, parts)
    pairs = make_pairs(volumes, CFG)
    per_level = pairs[pairs.positive & (pairs.level == "L3")].sort_values(["years", "a"])
    assert per_level.years.tolist() == [0.0, 0.0, 5.0, 10.0, 10.0]  # a: 1 same-session, 2 years apart; b: 1; c: 1
    by_interval = summarise(parts, volumes, pairs, CFG)["positive_pairs_per_ssl_part"]["train"]
    assert by_interval == {"years_apart": 3 * 7, "same_session": 2 * 7, "unknown_interval": 0}
    only_years = make_pairs(volumes, SplitConfig.from_config({"same_session_pairs": False}))
    assert (only_years[only_years.positive].years > 0).all() and only_years.positive.sum() == 3 * 7


def test_disc_pairs_are_rows_of_the_disc_array_and_flagged_volumes_are_left_out(tmp_path):
    scans = {f"sub-{i:03d}": [0.0, 3650.0] if i % 2 else [0.0] for i in range(40)}
    index = _index(scans, discs=True)
    flagged = index[(index.kind == "disc") & (index.subject_id == "sub-001") & (index.level == "L4-L5")].index[0]
    index.loc[flagged, "flag"] = "no vertebral-body intensity to normalise by"
    index.to_parquet(tmp_path / "index.parquet")
    _own_families(scans).to_parquet(tmp_path / "subjects.parquet")
    NO_GRADINGS.to_parquet(tmp_path / "gradings.parquet")
    out = {name: tmp_path / "splits" / f"{name}.{'json' if name == 'summary' else 'parquet'}"
           for name in ("subjects", "volumes", "pairs", "summary")}
    assert main(["--index", str(tmp_path / "index.parquet"), "--subjects", str(tmp_path / "subjects.parquet"),
                 "--gradings", str(tmp_path / "gradings.parquet"), "--structure", "disc",
                 *[arg for name, path in out.items() for arg in (f"--out-{name}", str(path))]]) == 0
    pairs, volumes = pd.read_parquet(out["pairs"]), pd.read_parquet(out["volumes"])
    summary = json.loads(out["summary"].read_text())
    assert summary["structure"] == "disc" and summary["array"] == "discs.npy"
    assert summary["flagged_volumes_left_out"] == 1 and len(volumes) == len(index) - 1
    discs = index[index.kind == "disc"].set_index("row")  # disc rows count from 0 like the body rows
    assert set(pairs.level) <= set(levels.DISCS) and pairs.positive.any() and (~pairs.positive).any()
    a, b = discs.loc[pairs.a], discs.loc[pairs.b]
    assert (a.level.to_numpy() == pairs.level.to_numpy()).all() and (b.level.to_numpy() == pairs.level.to_numpy()).all()
    assert ((a.subject_id.to_numpy() == b.subject_id.to_numpy()) == pairs.positive.to_numpy()).all()
    assert index.loc[flagged, "row"] not in set(pairs.a) | set(pairs.b)
    assert len(pairs[pairs.positive]) == 6 * 20 - 1  # every follow-up subject's discs, but the flagged one
