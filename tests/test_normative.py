"""The normative model of healthy discs (the population analysis): the Mahalanobis deviation from its definition, a
planted degeneration that the deviation follows, the reference drawn from healthy training discs only, and the
stage's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.evaluation.normative import POOLED, bootstrap_trends, fit_normative
from stages.normative import disc_parts, run

LEVELS = ["L3-L4", "L4-L5"]


def test_the_deviation_is_the_mahalanobis_distance_of_the_reference_distribution():
    # d = sqrt((x - mu)^T Sigma^-1 (x - mu)); for N(0, diag(1, 4)) the points (1, 0) and (0, 2) are both at d = 1,
    # whatever standardisation and rotation (PCA with every component) come before: the distance is invariant to them
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2)) * np.array([1.0, 2.0])
    model = fit_normative(x, np.array(["L4-L5"] * len(x)), components=2, min_per_level=10)
    d = model.deviation(np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [3.0, 0.0]]), np.array(["L4-L5"] * 4))
    assert d == pytest.approx([1.0, 1.0, 0.0, 3.0], abs=0.03)


def test_a_level_with_too_few_reference_discs_uses_the_pooled_model():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    levels = np.array(["L4-L5"] * 25 + ["L3-L4"] * 5)
    model = fit_normative(x, levels, components=3, min_per_level=10)
    assert model.model_of("L4-L5") == "L4-L5" and model.model_of("L3-L4") == POOLED
    assert model.counts == {POOLED: 30, "L4-L5": 25}
    with pytest.raises(ValueError, match="at least 3 healthy reference discs"):
        fit_normative(x[:2], levels[:2], components=3, min_per_level=10)


def _cohort(rng: np.random.Generator, n_subjects: int = 60, shift: float = 1.5) -> tuple[pd.DataFrame, np.ndarray]:
    """Subjects with two discs each; a disc's features are its level's healthy pattern plus noise, moved along one
    direction by ``shift`` per grade above 2 (the planted degeneration)."""
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    centres = {lv: rng.normal(size=16) for lv in LEVELS}
    rows, features = [], []
    for s in range(n_subjects):
        part = "test" if s % 3 == 0 else "train"
        for level in LEVELS:
            grade = int(rng.integers(1, 6))
            features.append(centres[level] + rng.normal(size=16) + shift * max(grade - 2, 0) * direction)
            rows.append({"row": len(rows), "scan_id": f"scan-{s}", "subject_id": f"sub-{s}", "kind": "disc",
                         "level": level, "pfirrmann": float(grade), "downstream_part": part})
    rows.append({"row": len(rows), "scan_id": "scan-x", "subject_id": "sub-x", "kind": "vertebra", "level": "L4",
                 "pfirrmann": np.nan, "downstream_part": "train"})
    features.append(np.zeros(16))
    return pd.DataFrame(rows), np.array(features, dtype=np.float32)


def test_the_deviation_rises_with_a_planted_degeneration_and_the_reference_is_healthy_training_discs(tmp_path):
    rng = np.random.default_rng(2)
    volumes, features = _cohort(rng)
    manifest = pd.DataFrame({"scan_id": volumes.scan_id.unique(), "age_years": 40.0})
    paths = {name: tmp_path / name for name in ("volumes.parquet", "manifest.parquet", "pooled.npy")}
    volumes.to_parquet(paths["volumes.parquet"])
    manifest.to_parquet(paths["manifest.parquet"])
    np.save(paths["pooled.npy"], features)
    summary = run(paths["pooled.npy"], paths["volumes.parquet"], paths["manifest.parquet"], tmp_path / "dev.parquet",
                  tmp_path / "summary.json", healthy_max_grade=2, components=8, min_per_level=10, bootstrap=200)
    table = pd.read_parquet(tmp_path / "dev.parquet")
    reference = table[table.part == "reference"]
    train = set(volumes.subject_id[volumes.downstream_part == "train"])
    assert set(reference.subject_id) <= train and reference.grade.max() <= 2
    assert set(table.subject_id[table.part == "test"]).isdisjoint(train)
    assert "vertebra" not in set(volumes.set_index("row").loc[table.row, "kind"])
    test = summary["test"]
    means = [test["by_grade"][g]["mean"] for g in sorted(test["by_grade"])]
    assert means[2] < means[3] < means[4]                      # grades 3, 4, 5 lie ever further out
    assert test["spearman_grade"]["ci"][0] > 0.3
    assert json.loads((tmp_path / "summary.json").read_text())["reference_discs"]["L4-L5"] >= 10
    # without the planted effect the rank correlation's interval covers 0
    volumes, features = _cohort(np.random.default_rng(3), shift=0.0)
    np.save(paths["pooled.npy"], features)
    volumes.to_parquet(paths["volumes.parquet"])
    null = run(paths["pooled.npy"], paths["volumes.parquet"], paths["manifest.parquet"], tmp_path / "null.parquet",
               tmp_path / "null.json", bootstrap=200)
    low, high = null["test"]["spearman_grade"]["ci"]
    assert low < 0 < high


def test_ages_come_from_the_manifest_and_the_bootstrap_is_seeded():
    rng = np.random.default_rng(4)
    volumes, _ = _cohort(rng, n_subjects=12)
    manifest = pd.DataFrame({"scan_id": volumes.scan_id.unique()})
    manifest["age_years"] = np.arange(len(manifest), dtype=float) + 30
    table = disc_parts(volumes, manifest, healthy_max_grade=2)
    assert table.age_years.notna().all() and set(table.part) <= {"reference", "test"}
    table["deviation"] = rng.random(len(table)) + 0.1 * table.age_years
    test = table[table.part == "test"]
    a, b = bootstrap_trends(test, 100, 0.9, seed=5), bootstrap_trends(test, 100, 0.9, seed=5)
    assert a == b and a["slope_per_decade"]["value"] == pytest.approx(1.0, abs=0.6)


def test_a_cohort_too_small_for_a_model_gets_the_reason_in_the_summary_and_the_figure(tmp_path):
    from stages import figures
    volumes, features = _cohort(np.random.default_rng(6), n_subjects=2)   # one test subject
    volumes.to_parquet(tmp_path / "volumes.parquet")
    pd.DataFrame({"scan_id": volumes.scan_id.unique(), "age_years": 50.0}).to_parquet(tmp_path / "manifest.parquet")
    np.save(tmp_path / "pooled.npy", features)
    summary = run(tmp_path / "pooled.npy", tmp_path / "volumes.parquet", tmp_path / "manifest.parquet",
                  tmp_path / "dev.parquet", tmp_path / "summary.json", bootstrap=10)
    assert "test" not in summary and "at least" in summary["skipped"]
    assert pd.read_parquet(tmp_path / "dev.parquet").empty
    written = figures.normative_figure({"siamese": pd.read_parquet(tmp_path / "dev.parquet")}, {"siamese": summary},
                                       figures.FigureFiles(tmp_path / "f.png", tmp_path / "f.pdf"))
    assert all(p.stat().st_size > 0 for p in written)
