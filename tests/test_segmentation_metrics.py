"""Cao et al. 2022's segmentation metrics (DSC, PPV, LTPR, LFPR) on cases counted by hand, and their bootstrap over
subjects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.evaluation.segmentation import Tally, bootstrap, scan_metrics, summarise, tally, tally_scan


def test_counts_of_a_hand_drawn_case():
    truth = np.zeros((1, 6, 8), dtype=bool)
    truth[0, 0:2, 0:2] = True          # structure A: 4 voxels
    truth[0, 4:6, 0:3] = True          # structure B: 6 voxels, missed
    predicted = np.zeros_like(truth)
    predicted[0, 1:3, 1:3] = True      # overlaps A in 1 voxel (1, 1): 4 predicted voxels
    predicted[0, 0:2, 6:8] = True      # a false component: 4 voxels
    t = tally(predicted, truth)
    assert t == Tally(intersection=1, predicted=8, truth=10, true_structures=2, detected=1, predicted_structures=2,
                      false_structures=1)
    row = scan_metrics(pd.DataFrame([vars(t)])).iloc[0]
    assert row.dice == pytest.approx(2 * 1 / (8 + 10))          # DSC = 2|P n G| / (|P| + |G|)
    assert row.ppv == pytest.approx(1 / 8)                       # PPV = |P n G| / |P|
    figures = summarise(scan_metrics(pd.DataFrame([vars(t)])))
    assert figures["ltpr"] == pytest.approx(1 / 2)               # A detected, B not
    assert figures["lfpr"] == pytest.approx(1 / 2)               # one of two predicted components overlaps nothing


def test_components_are_face_connected_and_empty_cases_are_defined():
    truth = np.zeros((3, 3, 3), dtype=bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True                       # touching by a corner only: two structures
    assert tally(truth, truth).true_structures == 2
    empty = np.zeros_like(truth)
    both_empty = scan_metrics(pd.DataFrame([vars(tally(empty, empty))])).iloc[0]
    assert both_empty.dice == 1.0 and np.isnan(both_empty.ppv)
    missed = scan_metrics(pd.DataFrame([vars(tally(empty, truth))])).iloc[0]
    assert missed.dice == 0.0 and np.isnan(missed.ppv)
    with pytest.raises(ValueError, match="differ in shape"):
        tally(empty, truth[0])


def test_per_class_rows_of_label_maps_and_pooled_detection_rates():
    truth = np.zeros((1, 4, 4), dtype=np.int16)
    truth[0, 0, :] = 1                 # a body
    truth[0, 2, :] = 2                 # a disc
    predicted = truth.copy()
    predicted[0, 2, :] = 0             # the disc missed
    rows = tally_scan(predicted, truth, {"vertebra": 1, "disc": 2})
    assert rows.structure.tolist() == ["vertebra", "disc"]
    assert rows.set_index("structure").loc["vertebra", "intersection"] == 4
    assert rows.set_index("structure").loc["disc", "detected"] == 0
    # two scans: DSC is the mean of their values, LTPR pools their structures (1 of 1 and 1 of 3 detected: 2 / 4)
    counts = pd.DataFrame([vars(Tally(4, 4, 4, 1, 1, 1, 0)), vars(Tally(0, 0, 6, 3, 1, 1, 0))])
    figures = summarise(scan_metrics(counts))
    assert figures["dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert figures["ltpr"] == pytest.approx(2 / 4) and figures["lfpr"] == 0.0
    assert figures["ppv"] == pytest.approx(1.0)                  # the scan with nothing predicted is left out


def test_the_bootstrap_resamples_subjects_and_brackets_the_point_value():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(12):
        for scan in range(2):          # a subject's two scans are drawn together
            inter = int(rng.integers(20, 40))
            rows.append({"subject_id": f"sub-{s}", "structure": "disc", **vars(Tally(inter, 40, 40, 2, 2, 2, 0))})
    counts = pd.DataFrame(rows)
    table = bootstrap(counts, n_boot=200, level=0.95, seed=1).set_index("metric")
    dice = table.loc["dice"]
    assert dice.ci_low <= dice.value <= dice.ci_high and dice.ci_low < dice.ci_high
    assert dice.value == pytest.approx(np.mean(2 * counts.intersection / 80))
    assert dice.subjects == 12 and dice.scans == 24
    assert table.loc["ltpr"].value == 1.0 and table.loc["ltpr"].ci_low == 1.0
    again = bootstrap(counts, n_boot=200, level=0.95, seed=1)
    pd.testing.assert_frame_equal(again, bootstrap(counts, n_boot=200, level=0.95, seed=1))
