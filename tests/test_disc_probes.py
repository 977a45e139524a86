"""The disc classifier (Jamaludin et al. 2017, section 4.2): frozen Conv1-Conv5 features cached once per encoder,
transfer / linear / MLP heads on them, scratch and fine-tuning end to end on the disc volume, the grade mapping, and
the guard that keeps test discs out of training; on a synthetic cohort whose grades are visible in the disc volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages import disc_features
from stages.core import levels
from stages.evaluation.probe_data import TASKS, ProbeConfig, task_samples
from stages.nets.disc_cnn import (
    DiscClassifier,
    disc_spec,
    load_classifier,
    load_transfer,
    pooled_features,
)
from stages.nets.encoders import random_encoder
from stages.nets.siamese import EncoderSpec, VggM3dEncoder
from stages.probe import JobFiles, JobInputs, grade_mapping, run
from stages.splits import SplitConfig, assign_parts, volume_labels
from stages.training.augment import AugmentRanges, augment_volumes, sample_volume_params

DISC = (5, 44, 48)
BODY = (5, 48, 48)
FAST = ProbeConfig.from_config({"linear_c": [0.01, 0.1, 1.0], "mlp_hidden": 16, "max_iter": 200, "epochs": 6,
                                "patience": 6, "batch_size": 16, "learning_rate": 0.01, "threads": 1,
                                "device": "cpu", "augment_views": 2, "dropout": 0.0})


def write_disc_cohort(root: Path, n_subjects: int = 50, seed: int = 0) -> Path:
    """splits/{subjects,volumes}.parquet and extract/discs.npy: each disc volume's centre brightness is its grade."""
    rng = np.random.default_rng(seed)
    subjects, index, gradings, discs = [], [], [], []
    for s in range(n_subjects):
        sid = f"sub-{s:04d}"
        scans = 2 if s % 5 == 0 else 1
        subjects.append({"subject_id": sid, "family_id": f"fam-{s:04d}", "n_scans": scans,
                         "has_followup": scans > 1, "graded": True})
        for visit in range(scans):
            scan, study = f"scan-{sid}-{visit}", f"ses-{sid}-{visit}"
            for disc in levels.DISCS:
                grade = int(rng.integers(1, 6))
                volume = 0.1 * rng.normal(size=DISC)
                volume[:, 14:30, 12:36] += 0.3 * grade
                discs.append(volume.astype(np.float16))
                gradings.append({"subject_id": sid, "study_id": study, "level": disc, "pfirrmann": float(grade),
                                 "herniation": float(grade >= 4)})
                index.append({"array": "discs", "row": len(discs) - 1, "scan_id": scan, "subject_id": sid,
                              "study_id": study, "days_since_first_study": 3650.0 * visit, "kind": "disc",
                              "level": disc})
    parts = assign_parts(pd.DataFrame(subjects), SplitConfig.from_config({}))
    volumes = volume_labels(pd.DataFrame(index), pd.DataFrame(gradings), parts)
    for folder in ("splits", "extract"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    parts.to_parquet(root / "splits" / "subjects.parquet", index=False)
    np.save(root / "extract" / "discs.npy", np.stack(discs))
    return root


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_disc_cohort(tmp_path_factory.mktemp("discs"))
    encoder = random_encoder(BODY, 0, 0.125, 32)   # an encoder trained on bodies of another height and width
    torch.save({"method": "siamese", "spec": encoder.spec.to_dict(), "state_dict": encoder.state_dict()},
               root / "encoder.pt")
    out = {k: root / "features" / f"disc_{k}" for k in ("maps", "pooled", "trunk", "meta")}
    disc_features.run(root / "extract" / "discs.npy", out, root / "encoder.pt", 0, 0.125, 32, FAST)
    return root


def _features(root: Path) -> JobInputs:
    f = root / "features"
    return JobInputs(disc_maps=f / "disc_maps", disc_pooled=f / "disc_pooled", disc_trunk=f / "disc_trunk")


def _probe(root: Path, model: str, job: Path, cfg: ProbeConfig = FAST, fraction: float = 1.0, **kwargs) -> dict:
    return run(model, kwargs.pop("task", "grade"), fraction, 0, root / "splits" / "subjects.parquet",
               root / "splits" / "volumes.parquet", JobFiles.in_folder(job), cfg, disc_input="disc", **kwargs)


def test_disc_classifier_takes_the_encoders_convolutions_and_sizes_fc6_for_the_disc():
    encoder = VggM3dEncoder(EncoderSpec(5, 48, 48, width=0.125, embedding_dim=32))
    spec = disc_spec(encoder.spec, DISC)
    net = DiscClassifier(spec, n_classes=5)
    net.load_trunk(encoder.state_dict())
    copied = [name for name in net.state_dict() if name.startswith(("encoder.conv.", "encoder.conv5."))]
    assert len(copied) == 20                                   # Conv1-Conv5 and their group norms, weight and bias
    for name in copied:
        assert torch.equal(net.state_dict()[name], encoder.state_dict()[name.removeprefix("encoder.")])
    rows, cols = spec.conv5_size()
    assert net.head.layers[0].in_features == encoder.conv5[0].out_channels * rows * cols
    assert net(torch.zeros(3, *DISC)).shape == (3, 5)
    with pytest.raises(ValueError, match="slices"):
        disc_spec(encoder.spec, (9, 44, 48))
    with pytest.raises(ValueError, match="disc_size"):
        disc_spec(encoder.spec, (5, 24, 48))


def test_random_encoder_convolutions_do_not_depend_on_the_crop_size():
    a, b = random_encoder(BODY, 3, 0.125, 32), random_encoder(DISC, 3, 0.125, 32)
    for name, value in a.state_dict().items():
        if name.startswith(("conv.", "conv5.")):
            assert torch.equal(value, b.state_dict()[name]), name


def test_single_volume_augmentation_identity_and_flip():
    x = torch.randn(4, *DISC)
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(augment_volumes(x, sample_volume_params(4, AugmentRanges.identity(), generator)), x,
                          atol=1e-5)
    flip_only = AugmentRanges(rotation_deg=0, shift_fraction=(0, 0), shift_slices=0, scale=(1, 1), intensity=0,
                              flip=True)
    params = sample_volume_params(4, flip_only, torch.Generator().manual_seed(1))
    out = augment_volumes(x, params)
    for k in range(4):
        expected = x[k].flip(0) if params.flip[k] else x[k]
        assert torch.allclose(out[k], expected, atol=1e-5)


def test_cached_features_match_the_classifier_and_view_zero_is_unaugmented(cohort: Path):
    maps = np.load(cohort / "features" / "disc_maps", mmap_mode="r")
    pooled = np.load(cohort / "features" / "disc_pooled")
    discs = np.load(cohort / "extract" / "discs.npy")
    meta = json.loads((cohort / "features" / "disc_meta").read_text())
    assert maps.shape[:2] == (len(discs), 2) and meta["views"] == 2 and meta["encoder"] == "siamese"
    trunk = load_classifier(np.load(cohort / "features" / "disc_trunk"), "trunk")
    x = torch.from_numpy(discs[:4].astype(np.float32))
    with torch.no_grad():
        expected = trunk.conv_features(x).numpy()
        expected_pooled = pooled_features(trunk.feature_maps(x)).numpy()
    np.testing.assert_allclose(maps[:4, 0].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(pooled[:4], expected_pooled, rtol=1e-5, atol=1e-5)
    assert not np.allclose(maps[:, 1], maps[:, 0])   # view 1 is augmented


def test_transfer_linear_mlp_heads_on_the_disc_volume(cohort: Path, tmp_path: Path):
    result = _probe(cohort, "siamese", tmp_path / "job", inputs=_features(cohort))
    assert set(result["heads"]) == {"transfer", "linear", "mlp"} and result["input"] == "disc volume"
    for head in ("transfer", "linear", "mlp"):   # the grade is the disc's brightness: every head learns it
        assert result["heads"][head]["average_class_accuracy"] > 0.5, head
    model = np.load(tmp_path / "job" / "model.npz")
    net = load_transfer(np.load(cohort / "features" / "disc_trunk"), model)
    predictions = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    transfer = predictions[predictions["head"] == "transfer"]
    volumes = pd.read_parquet(cohort / "splits" / "volumes.parquet")
    samples, _ = task_samples(volumes, TASKS["grade"], "disc")
    test = samples[samples.downstream_part == "test"]
    x = torch.from_numpy(np.load(cohort / "extract" / "discs.npy")[test.row.to_numpy()].astype(np.float32))
    with torch.no_grad():
        proba = torch.softmax(net(x), 1).numpy()   # the saved classifier gives the job's predictions (float16 cache)
    assert (proba.argmax(1) + 1 == transfer.predicted.to_numpy()).mean() > 0.95
    history = pd.read_csv(tmp_path / "job" / "history.csv")
    assert history.kept.sum() == 1 and set(history["head"]) == {"transfer"}


def test_same_seed_same_transfer_head(cohort: Path, tmp_path: Path):
    a = _probe(cohort, "siamese", tmp_path / "a", inputs=_features(cohort))
    b = _probe(cohort, "siamese", tmp_path / "b", inputs=_features(cohort))
    assert a["heads"]["transfer"]["confusion"] == b["heads"]["transfer"]["confusion"]
    pa, pb = (pd.read_parquet(tmp_path / k / "predictions.parquet") for k in "ab")
    pd.testing.assert_frame_equal(pa, pb)


def test_scratch_and_finetune_on_the_disc_volume_never_read_test_discs(cohort: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    from stages.nets import disc_net
    read_rows: list[int] = []
    original = disc_net.BodyReader.__call__

    def spy(self, rows):
        if self.allowed.sum() > 200:   # the training reader (train + val rows), not the test reader
            read_rows.extend(np.asarray(rows).tolist())
        return original(self, rows)
    monkeypatch.setattr(disc_net.BodyReader, "__call__", spy)
    discs = cohort / "extract" / "discs.npy"
    scratch = _probe(cohort, "scratch", tmp_path / "scratch", end_to_end=True, width=0.125, embedding_dim=32,
                     inputs=JobInputs(discs=discs))
    assert set(scratch["heads"]) == {"network"} and scratch["heads"]["network"]["init"] == "random"
    assert scratch["heads"]["network"]["average_class_accuracy"] > 0.4
    volumes = pd.read_parquet(cohort / "splits" / "volumes.parquet")
    test_rows = set(volumes.row[(volumes.kind == "disc") & (volumes.downstream_part == "test")])
    assert read_rows and not test_rows & set(read_rows)
    finetune = _probe(cohort, "siamese-finetune", tmp_path / "ft", end_to_end=True,
                      inputs=JobInputs(discs=discs, encoder=cohort / "encoder.pt"))
    assert finetune["heads"]["network"]["init"] == "pretrained"
    net = load_classifier(np.load(tmp_path / "ft" / "model.npz"), "cnn")
    start = torch.load(cohort / "encoder.pt", weights_only=False)["state_dict"]
    assert not torch.equal(net.state_dict()["encoder.conv.0.weight"], start["conv.0.weight"])  # moved


def test_grade_mapping_merges_classes(cohort: Path, tmp_path: Path):
    assert grade_mapping((1, 1, 2, 3, 4)) == {1: 1, 2: 1, 3: 2, 4: 3, 5: 4}
    for bad in ((1, 3, 3, 4, 5), (2, 2, 3, 4, 5), (1, 2, 3)):
        with pytest.raises(ValueError):
            grade_mapping(bad)
    result = _probe(cohort, "siamese", tmp_path / "job", inputs=_features(cohort), grade_classes=(1, 1, 2, 3, 4))
    assert result["heads"]["linear"]["confusion"]["labels"] == [1, 2, 3, 4]
    predictions = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    assert set(predictions.label) <= {1, 2, 3, 4} and "p_5" not in predictions
