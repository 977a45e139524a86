"""Probes: label subsets and the leakage guard, the heads against scikit-learn, frozen and end-to-end jobs on a
synthetic cohort whose labels are visible in the volumes, and the summary's intervals and figure of merit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from stages.core import levels
from stages.evaluation.probe_data import (
    TASKS,
    LeakageError,
    label_subset,
    run_folder,
    task_samples,
)
from stages.nets.heads import balanced_weights, fit_head, grouped_folds
from stages.probe import JobFiles, ProbeConfig, run
from stages.probe_summary import (
    bootstrap,
    efficiency_differences,
    job_files,
    label_efficiency,
    load_runs,
    summarise,
)
from stages.splits import SplitConfig, assign_parts, volume_labels

SHAPE = (5, 48, 48)
FAST = ProbeConfig.from_config({"linear_c": [0.01, 0.1, 1.0], "mlp_hidden": 16, "max_iter": 200, "epochs": 2,
                                "batch_size": 8, "learning_rate": 0.01, "threads": 1, "device": "cpu"})


def probe(model: str, task: str, fraction: float, seed: int, splits: Path, job: Path, cfg: ProbeConfig,
          features: Path | None = None, extract: Path | None = None, **kwargs) -> dict:
    """stages.probe.run on the tables of a splits folder, the features or array store of a features or extract
    folder, writing the workflow's file names into the folder ``job``."""
    return run(model, task, fraction, seed, splits / "subjects.parquet", splits / "volumes.parquet",
               JobFiles.in_folder(job), cfg, features=None if features is None else features / "features.npy",
               vertebrae=None if extract is None else extract / "vertebrae.npy", **kwargs)


def write_probe_data(root: Path, n_subjects: int = 60, seed: int = 0, dim: int = 12) -> Path:
    """splits/{subjects,volumes}.parquet, extract/vertebrae.npy, and two feature sets: ``informative`` (each body's
    features hold the grades of its two discs and its level, plus noise) and ``noise``."""
    rng = np.random.default_rng(seed)
    subjects, index, gradings, bodies = [], [], [], []
    for s in range(n_subjects):
        sid = f"sub-{s:04d}"
        scans = 2 if s % 4 == 0 else 1
        subjects.append({"subject_id": sid, "family_id": f"fam-{s:04d}", "n_scans": scans,
                         "has_followup": scans > 1, "graded": s % 10 != 9})
        for visit in range(scans):
            scan, study = f"scan-{sid}-{visit}", f"ses-{sid}-{visit}"
            grades = rng.integers(1, 6, size=len(levels.DISCS))
            for k, disc in enumerate(levels.DISCS):
                gradings.append({"subject_id": sid, "study_id": study, "level": disc, "pfirrmann": float(grades[k]),
                                 "herniation": float(grades[k] >= 4)})
                index.append({"array": "discs", "row": k, "scan_id": scan, "subject_id": sid, "study_id": study,
                              "days_since_first_study": 3650.0 * visit, "kind": "disc", "level": disc})
            for k, level in enumerate(levels.VERTEBRAE):
                above = grades[k - 1] if k > 0 else 3
                below = grades[k] if k < len(levels.DISCS) else 3
                volume = 0.2 * rng.normal(size=SHAPE)
                volume[:, :6, :] += 0.4 * above       # the disc above shows at the top of the body's crop
                volume[:, -6:, :] += 0.4 * below      # and the disc below at its bottom
                bodies.append((volume.astype(np.float16), above, below, k))
                index.append({"array": "vertebrae", "row": len(bodies) - 1, "scan_id": scan, "subject_id": sid,
                              "study_id": study, "days_since_first_study": 3650.0 * visit, "kind": "vertebra",
                              "level": level})
    parts = assign_parts(pd.DataFrame(subjects), SplitConfig.from_config({}))
    volumes = volume_labels(pd.DataFrame(index), pd.DataFrame(gradings), parts)
    for folder in ("splits", "extract", "features/informative", "features/noise"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    parts.to_parquet(root / "splits" / "subjects.parquet", index=False)
    np.save(root / "extract" / "vertebrae.npy", np.stack([b[0] for b in bodies]))
    signal = np.array([[b[1], b[2], *np.eye(len(levels.VERTEBRAE))[b[3]] * 3] for b in bodies])
    informative = np.concatenate([signal, rng.normal(size=(len(bodies), dim))], axis=1)
    np.save(root / "features" / "informative" / "features.npy", informative.astype(np.float32))
    np.save(root / "features" / "noise" / "features.npy",
            rng.normal(size=informative.shape).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe_data(tmp_path_factory.mktemp("probes"))


def test_no_test_subject_in_any_training_subset(data):
    subjects = pd.read_parquet(data / "splits" / "subjects.parquet")
    held_out = set(subjects.subject_id[subjects.downstream_part.isin(["val", "test"])])
    train = set(subjects.subject_id[subjects.downstream_part == "train"])
    assert held_out and train
    for seed in range(5):
        for fraction in (0.1, 0.358, 0.539, 1.0):
            members = set(label_subset(subjects, fraction, seed, seed=0))
            assert members <= train and not members & held_out


def test_a_job_trains_only_on_its_subset_and_scores_only_the_test_subjects(data, tmp_path):
    result = probe("informative", "grade", 0.5, 1, data / "splits", tmp_path / "job", FAST,
                 features=data / "features" / "informative")
    subjects = pd.read_parquet(data / "splits" / "subjects.parquet")
    members = set(label_subset(subjects, 0.5, 1, seed=0))
    assert result["n_subjects"] == len(members)
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    samples, _ = task_samples(volumes, TASKS["grade"])
    assert result["n_train"] == samples.subject_id.isin(members).sum()
    predictions = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    test = set(subjects.subject_id[subjects.downstream_part == "test"])
    assert set(predictions.subject_id) == test and not set(predictions.subject_id) & members
    assert set(predictions["head"]) == {"linear", "mlp"}


def test_a_test_subject_forged_into_training_stops_the_job(data, tmp_path):
    forged = tmp_path / "splits"
    forged.mkdir()
    subjects = pd.read_parquet(data / "splits" / "subjects.parquet")
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    victim = subjects.subject_id[subjects.downstream_part == "test"].iloc[0]
    fake = subjects.copy()
    fake.loc[fake.subject_id == victim, "downstream_part"] = "train"   # the subset draw sees a test subject as training
    fake.to_parquet(forged / "subjects.parquet", index=False)
    volumes.to_parquet(forged / "volumes.parquet", index=False)        # while its volumes say test
    assert victim in label_subset(fake, 1.0, 0, seed=0)
    with pytest.raises(LeakageError):
        probe("informative", "grade", 1.0, 0, forged, tmp_path / "job", FAST,
            features=data / "features" / "informative")


def test_frozen_heads_read_the_features_they_are_given(data, tmp_path):
    scores, n_test = {}, {}
    for name in ("informative", "noise"):
        for task in ("grade", "herniation", "level"):
            result = probe(name, task, 1.0, 0, data / "splits", tmp_path / name / task, FAST,
                         features=data / "features" / name)
            scores[name, task], n_test[task] = result["heads"], result["n_test"]
    for head in ("linear", "mlp"):
        assert scores["informative", "grade"][head]["average_class_accuracy"] > 0.8
        assert scores["noise", "grade"][head]["average_class_accuracy"] < 0.45
        assert scores["informative", "herniation"][head]["auc"] > 0.9
        assert scores["noise", "herniation"][head]["auc"] < 0.75
        assert scores["informative", "level"][head]["accuracy"] > 0.95
    grade = scores["informative", "grade"]["linear"]
    assert np.array(grade["confusion"]["counts"]).sum() == n_test["grade"] > 0


def test_end_to_end_from_scratch_is_seeded_and_learns(data, tmp_path):
    cfg = ProbeConfig.from_config({**{k: list(v) if isinstance(v, tuple) else v for k, v in FAST.__dict__.items()},
                                   "epochs": 6, "patience": 6})
    kwargs = dict(extract=data / "extract", end_to_end=True, width=0.125, embedding_dim=32)
    one = probe("scratch", "grade", 1.0, 0, data / "splits", tmp_path / "one", cfg, **kwargs)
    two = probe("scratch", "grade", 1.0, 0, data / "splits", tmp_path / "two", cfg, **kwargs)
    p1 = pd.read_parquet(tmp_path / "one" / "predictions.parquet")
    p2 = pd.read_parquet(tmp_path / "two" / "predictions.parquet")
    pd.testing.assert_frame_equal(p1, p2)
    assert one["heads"]["network"]["average_class_accuracy"] == two["heads"]["network"]["average_class_accuracy"]
    assert one["heads"]["network"]["average_class_accuracy"] > 0.35          # 5 grades: chance is 0.2
    history = pd.read_csv(tmp_path / "one" / "history.csv")
    assert history.kept.sum() == 1 and len(history) <= 6
    # the saved network (model.npz, for Grad-CAM) is the one that made the job's predictions
    import torch

    from stages.nets.disc_net import load_net
    net = load_net(np.load(tmp_path / "one" / "model.npz"))
    bodies = np.load(data / "extract" / "vertebrae.npy")
    first = p1.iloc[:5]
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    row = {(s, lv): r for s, lv, r in volumes[volumes.kind == "vertebra"][["scan_id", "level", "row"]].itertuples(
        index=False)}
    upper = torch.tensor(bodies[[row[(s, lv.split("-")[0])] for s, lv in zip(first.scan_id, first.level)]],
                         dtype=torch.float32)
    lower = torch.tensor(bodies[[row[(s, lv.split("-")[1])] for s, lv in zip(first.scan_id, first.level)]],
                         dtype=torch.float32)
    with torch.no_grad():
        proba = torch.softmax(net(upper, lower), dim=1).numpy()
    np.testing.assert_allclose(proba, first[[f"p_{g}" for g in range(1, 6)]].to_numpy(), atol=1e-5)


def test_logistic_head_equals_scikit_learn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 150))            # more features than samples: the rotation must not change the answer
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=60) > 0.4).astype(int) + (x[:, 2] > 1)
    ours = fit_head(x, y, 3, alpha=1 / 0.1, max_iter=5000)
    scaler = StandardScaler().fit(x)
    theirs = LogisticRegression(C=0.1, class_weight="balanced", max_iter=20000, tol=1e-10).fit(scaler.transform(x), y)
    x_new = rng.normal(size=(40, 150))
    np.testing.assert_allclose(ours.predict_proba(x_new), theirs.predict_proba(scaler.transform(x_new)), atol=2e-3)


def test_a_class_absent_from_training_gets_probability_zero_and_one_class_is_refused():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6))
    y = np.where(x[:, 0] > 0, 3, 1)                      # classes 1 and 3 of 0..4
    head = fit_head(x, y, 5, alpha=1.0)
    proba = head.predict_proba(rng.normal(size=(10, 6)))
    assert proba.shape == (10, 5) and (proba[:, [0, 2, 4]] == 0).all()
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert head.converged
    with pytest.raises(ValueError, match="two or more classes"):
        fit_head(x, np.ones(40, dtype=int), 5, alpha=1.0)


def test_a_subset_with_one_class_predicts_it_and_says_so(data, tmp_path):
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    volumes.loc[volumes.downstream_part == "train", "herniation"] = 0.0
    one = tmp_path / "splits"
    one.mkdir()
    volumes.to_parquet(one / "volumes.parquet", index=False)
    pd.read_parquet(data / "splits" / "subjects.parquet").to_parquet(one / "subjects.parquet", index=False)
    result = probe("informative", "herniation", 1.0, 0, one, tmp_path / "job", FAST,
                 features=data / "features" / "informative")
    for head in ("linear", "mlp"):
        assert "one class" in result["heads"][head]["note"] and result["heads"][head]["auc"] == 0.5
        assert result["heads"][head]["sensitivity"] == 0.0


def test_balanced_weights_and_grouped_folds():
    y = np.array([0, 0, 0, 1, 2, 2])
    w = balanced_weights(y, 4)
    assert w.sum() == pytest.approx(len(y))
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum()) == pytest.approx(w[y == 2].sum())
    groups = np.repeat([f"s{i}" for i in range(7)], 3)
    folds = grouped_folds(groups, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for fold in folds:
        inside = set(groups[fold])
        assert all(set(groups[other]).isdisjoint(inside) for other in folds if other is not fold)


def _fake_predictions(rng: np.random.Generator, accuracy: float, subjects: int = 20) -> pd.DataFrame:
    truth = rng.integers(0, 2, size=subjects * 5)
    right = rng.random(len(truth)) < accuracy
    predicted = np.where(right, truth, 1 - truth)
    score = np.clip(predicted * 0.6 + 0.2 + 0.1 * rng.normal(size=len(truth)), 0, 1)
    names = np.repeat([f"s{i}" for i in range(subjects)], 5)
    return pd.DataFrame({"subject_id": names, "scan_id": names, "level": np.tile(levels.DISCS[1:], subjects),
                         "label": truth, "predicted": predicted, "p_1": score})


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_subjects():
    rng = np.random.default_rng(0)
    small = [_fake_predictions(rng, 0.8, 10) for _ in range(3)]
    large = [_fake_predictions(rng, 0.8, 80) for _ in range(3)]
    ci_small = bootstrap("herniation", small, 400, 0.95)
    ci_large = bootstrap("herniation", large, 400, 0.95)
    mean = np.mean([(p.label == p.predicted).mean() for p in small])
    assert ci_small["accuracy"][0] <= mean <= ci_small["accuracy"][1]
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]
    assert width(ci_large) < width(ci_small)


def test_results_summary_and_label_efficiency_from_job_folders(tmp_path):
    rng = np.random.default_rng(1)
    accuracy = {("scratch", 0.5): 0.6, ("scratch", 1.0): 0.8, ("ssl", 0.5): 0.85, ("ssl", 1.0): 0.9,
                ("random", 0.5): 0.55, ("random", 1.0): 0.65}
    for (model, fraction), acc in accuracy.items():
        for seed in range(3):
            folder = tmp_path / run_folder(model, "herniation", fraction, seed)
            folder.mkdir(parents=True)
            preds = _fake_predictions(rng, acc, 40).assign(head="linear")
            metrics = {"accuracy": float((preds.label == preds.predicted).mean()), "auc": acc,
                       "sensitivity": 0.5, "specificity": 0.5, "average_class_accuracy": 0.5}
            job = {"n_subjects": int(100 * fraction), "n_scans": int(150 * fraction), "n_train": 1, "n_test": 200,
                   "heads": {"linear": metrics}}
            (folder / "metrics.json").write_text(json.dumps(job))
            preds.to_parquet(folder / "predictions.parquet")
    results, predictions = load_runs(job_files(sorted(tmp_path.rglob("metrics.json")),
                                               sorted(tmp_path.rglob("predictions.parquet"))),
                                     ["ssl", "random", "scratch"], ["herniation"], [0.5, 1.0], 3)
    assert len(results) == 18
    summary = summarise(results, predictions, 200, 0.95)
    acc = summary[summary.metric == "accuracy"]
    assert ((acc.ci_low <= acc["mean"] + 0.05) & (acc["mean"] - 0.05 <= acc.ci_high)).all()
    efficiency = label_efficiency(efficiency_differences(summary, predictions, 200, 0.95, 0.05)).set_index("model")
    assert efficiency.loc["ssl", "matched_at_fraction"] == 0.5 and efficiency.loc["ssl", "matched_scans"] == 75
    assert efficiency.loc["random", "matched_at_fraction"] is None or np.isnan(efficiency.loc["random",
                                                                                           "matched_at_fraction"])
    assert "not reached" in efficiency.loc["random", "verdict"]


def test_fine_tuning_starts_from_the_given_encoder(data, tmp_path):
    import torch

    from stages.nets.siamese import EncoderSpec, VggM3dEncoder
    torch.manual_seed(5)
    encoder = VggM3dEncoder(EncoderSpec(slices=SHAPE[0], height=SHAPE[1], width_px=SHAPE[2], width=0.125,
                                        embedding_dim=32))
    torch.save({"method": "test", "spec": encoder.spec.to_dict(), "state_dict": encoder.state_dict()},
               tmp_path / "encoder.pt")
    cfg = ProbeConfig.from_config({"epochs": 1, "batch_size": 8, "threads": 1, "device": "cpu"})
    result = probe("test-finetune", "herniation", 0.5, 0, data / "splits", tmp_path / "job", cfg,
                 extract=data / "extract", encoder=tmp_path / "encoder.pt", end_to_end=True)
    assert result["heads"]["network"]["init"] == "pretrained" and result["n_test"] > 0


def test_the_supervised_encoder_learns_only_from_self_supervision_training_and_validation(data, tmp_path):
    from stages.supervised import run as supervised
    from stages.supervised import training_samples
    subjects = pd.read_parquet(data / "splits" / "subjects.parquet")
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    train, val = training_samples(volumes, subjects)
    part = subjects.set_index("subject_id")
    assert (part.loc[train.subject_id, "ssl_part"] == "train").all()
    assert (part.loc[val.subject_id, "ssl_part"] == "val").all()
    assert not part.loc[pd.concat([train, val]).subject_id, "downstream_part"].isin(["val", "test"]).any()
    cfg = ProbeConfig.from_config({"epochs": 1, "batch_size": 8, "threads": 1, "device": "cpu"})
    sup = tmp_path / "sup"
    history = supervised(data / "splits" / "subjects.parquet", data / "splits" / "volumes.parquet",
                         data / "extract" / "vertebrae.npy", sup / "encoder.pt", sup / "history.csv", cfg,
                         width=0.125, embedding_dim=32)
    assert len(history) == 1 and (tmp_path / "sup" / "encoder.pt").is_file()
