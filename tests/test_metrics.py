"""Downstream metrics against scikit-learn and hand-worked confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

from stages.evaluation.metrics import average_class_accuracy, binary_metrics, bootstrap_interval, confusion, roc_auc


def _from_matrix(matrix: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Label vectors that produce ``matrix`` (classes 1..K as Pfirrmann grades)."""
    y_true, y_pred = [], []
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            y_true += [i + 1] * n
            y_pred += [j + 1] * n
    return np.array(y_true), np.array(y_pred)


def test_average_class_accuracy_on_a_known_confusion_matrix():
    matrix = [[8, 2, 0, 0, 0],
              [1, 6, 3, 0, 0],
              [0, 2, 14, 4, 0],
              [0, 0, 5, 10, 5],
              [0, 0, 0, 1, 3]]
    y_true, y_pred = _from_matrix(matrix)
    expected = np.mean([8 / 10, 6 / 10, 14 / 20, 10 / 20, 3 / 4])
    assert average_class_accuracy(y_true, y_pred) == pytest.approx(expected)
    assert average_class_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(confusion(y_true, y_pred, np.arange(1, 6)), confusion_matrix(y_true, y_pred))


def test_average_class_accuracy_ignores_classes_absent_from_the_truth():
    # grade 5 is predicted once but never true (as on the demo's test part): it adds no row to the average
    y_true = np.array([1, 1, 2, 2, 3, 3, 4])
    y_pred = np.array([1, 2, 2, 2, 3, 5, 4])
    assert average_class_accuracy(y_true, y_pred) == pytest.approx(np.mean([0.5, 1.0, 0.5, 1.0]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.integers(1, 6, 50), rng.integers(1, 6, 50)
        assert average_class_accuracy(t, p) == pytest.approx(balanced_accuracy_score(t, p))


def test_binary_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    score = np.clip(0.35 * y + rng.random(200) * 0.7, 0, 1)
    got = binary_metrics(y, score, threshold=0.5)
    predicted = score >= 0.5
    assert got["accuracy"] == pytest.approx((predicted == y).mean())
    assert got["sensitivity"] == pytest.approx(recall_score(y, predicted))
    assert got["specificity"] == pytest.approx(recall_score(~y, ~predicted))
    assert got["auc"] == pytest.approx(roc_auc_score(y, score))
    one_class = binary_metrics(np.zeros(5, bool), np.linspace(0, 1, 5))
    assert np.isnan(one_class["auc"]) and np.isnan(one_class["sensitivity"]) and one_class["specificity"] == 0.4


def test_bootstrap_interval_resamples_subjects_and_covers_the_estimate():
    rng = np.random.default_rng(2)
    correct = rng.random(300) < 0.7
    groups = [np.arange(k, k + 5) for k in range(0, 300, 5)]          # 60 subjects, 5 discs each
    point, low, high = bootstrap_interval(groups, lambda idx: float(correct[idx].mean()), n_boot=500)
    assert point == pytest.approx(correct.mean())
    assert low < point < high and 0.55 < low and high < 0.85
    # fewer subjects, wider interval
    _, low2, high2 = bootstrap_interval(groups[:10], lambda idx: float(correct[idx].mean()), n_boot=500)
    assert high2 - low2 > high - low
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(groups, lambda idx: 0.0, level=1.5)


def test_roc_auc_equals_scikit_learn_with_ties_and_is_nan_for_one_class():
    rng = np.random.default_rng(5)
    for _ in range(20):
        y = rng.integers(0, 2, size=50)
        score = rng.integers(0, 6, size=50) / 5          # many tied scores
        if 0 < y.sum() < len(y):
            assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert roc_auc([0, 1, 1], [0.2, 0.2, 0.2]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([1, 1], [0.3, 0.4]))
