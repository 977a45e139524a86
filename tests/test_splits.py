"""Splits by subject and family, leakage, nested label subsets, and pair counts computed independently."""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd
import pytest

from stages.core import levels
from stages.evaluation.probe_data import label_subset
from stages.splits import SplitConfig, assign_parts, check_leakage, make_pairs, volume_labels

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
        assert all(small < large for small, large in zip(members, members[1:]))
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
