"""Hou et al. 2023's three-slice classifier (stages/training/slice_head.py) and its probe jobs (stages/probe.py): the
crop shared by a disc's slices, the frozen extractor, the Table 3 grid of heads, the random-frozen and from-scratch
baselines, seeding, and the guard that keeps test discs out of training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.evaluation.probe_data import SliceHeadConfig
from stages.nets.simclr import SimclrSpec, SimclrEncoder, initial_encoder
from stages.probe import JobFiles, JobInputs, ProbeConfig, run
from stages.training.classify import ClassifierFit
from stages.training.slice_head import SliceClassifier, crop_boxes, crop_resize, fit_slices
from test_probes import write_probe_data

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
SPEC = SimclrSpec(height=SIZE, width_px=SIZE, depth=10, widen_factor=0.125, fc_units=8, fc_blocks=2)
CFG = ProbeConfig.from_config({"heads": ["linear", "slices"], "linear_c": [0.1, 1.0], "max_iter": 100, "threads": 1,
                               "device": "cpu"})
FAST = SliceHeadConfig.from_config({"epochs": 8, "patience": 8, "batch_size": 16, "learning_rate": 0.01})


def test_crop_corners_lie_in_their_margins():
    """P_ul in (0, 0.25 W) x (0, 0.25 H) and P_br in (0.75 W, W) x (0.75 H, H) (Hou et al. 2023, section 2.3)."""
    w, h = 40, 30
    boxes = crop_boxes(5000, (w, h), 0.25, torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (x0 <= 0.25 * w).all() and (y0 >= 0).all() and (y0 <= 0.25 * h).all()
    assert (x1 >= 0.75 * w).all() and (x1 <= w).all() and (y1 >= 0.75 * h).all() and (y1 <= h).all()
    # uniform: the corners fill their ranges (means at the middle of each range)
    np.testing.assert_allclose(boxes.mean(0).numpy(), [0.125 * w, 0.125 * h, 0.875 * w, 0.875 * h], rtol=0.03)


def test_a_whole_image_box_is_the_identity_and_a_crop_is_the_region_resized():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    torch.testing.assert_close(crop_resize(x, whole), x)
    # the left half of the image stretched to the full width: output pixel (i, j) samples source column (j + 0.5) / 2
    # - 0.5 (pixel centres, the image spanning [0, 8]), so even output columns average two source columns
    left = torch.tensor([[0.0, 0.0, 4.0, 8.0]] * 2)
    out = crop_resize(x, left)
    source_x = (np.arange(8) + 0.5) / 2 - 0.5
    expected = np.stack([np.interp(source_x, np.arange(8), row) for row in x.reshape(-1, 8).numpy()])
    np.testing.assert_allclose(out.reshape(-1, 8).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_the_three_slices_of_a_disc_share_its_crop():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, SIZE, SIZE, generator=gen)
    boxes = crop_boxes(4, (SIZE, SIZE), 0.25, gen)
    together = crop_resize(x, boxes)
    for k in range(3):
        alone = crop_resize(x[:, k:k + 1], boxes)
        torch.testing.assert_close(together[:, k:k + 1], alone)
    assert not torch.allclose(together, x)


def _labelled_slices(n: int, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Three 16 x 16 slices per disc; a herniated disc (label 1) has a bright blob at the back of its middle slice,
    every disc noise."""
    rng = np.random.default_rng(seed)
    slices = 0.3 * rng.normal(size=(n, 3, SIZE, SIZE))
    slices[labels == 1, 1, 10:14, 6:10] += 2.0
    return slices.astype(np.float16)


def test_a_frozen_extractor_keeps_its_weights_and_statistics_while_the_fc_layer_learns():
    labels = np.tile([0, 1], 40)
    x = torch.from_numpy(_labelled_slices(80, labels).astype(np.float32))
    torch.manual_seed(0)
    encoder = SimclrEncoder(SPEC)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    fit = ClassifierFit(epochs=4, patience=4, batch_size=16, learning_rate=0.01, weight_decay=0.0, grad_clip=0.0,
                        seed=0, threads=1, optimiser="adam")
    proba, history, net = fit_slices(encoder, True, 0.0, lambda p: x[p], lambda p: x[60:][p], labels[:60], 50, 10,
                                     20, 2, fit, 0.25, torch.device("cpu"))
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)       # BN running statistics too
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert proba.shape == (20, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert len(history) == 4 and history.kept.sum() == 1


def test_the_end_to_end_classifier_trains_its_extractor():
    labels = np.tile([0, 1], 20)
    x = torch.from_numpy(_labelled_slices(40, labels).astype(np.float32))
    encoder = initial_encoder(SPEC, 0)
    before = [p.detach().clone() for p in encoder.parameters()]
    fit = ClassifierFit(epochs=2, patience=2, batch_size=8, learning_rate=0.01, weight_decay=0.0, grad_clip=0.0,
                        seed=0, threads=1, optimiser="adam")
    fit_slices(encoder, False, 0.0, lambda p: x[p], lambda p: x[p], labels, 30, 10, 40, 2, fit, 0.25,
               torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))


def test_initial_weights_are_pretrainings_for_the_seed():
    a, b, c = initial_encoder(SPEC, 0), initial_encoder(SPEC, 0), initial_encoder(SPEC, 1)
    for (key, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        torch.testing.assert_close(x, y, msg=key)
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_the_grid_names_one_head_per_dropout_and_weight_decay():
    assert SliceHeadConfig.from_config({}).settings() == [("slices", 0.0, 0.0)]
    grid = SliceHeadConfig.from_config({"dropout": [0.0, 0.5], "weight_decay": [0.0, 0.001]}).settings()
    assert grid == [("slices dr0 wd0", 0.0, 0.0), ("slices dr0 wd0.001", 0.0, 0.001),
                    ("slices dr0.5 wd0", 0.5, 0.0), ("slices dr0.5 wd0.001", 0.5, 0.001)]
    with pytest.raises(ValueError, match="crop_margin"):
        SliceHeadConfig.from_config({"crop_margin": 0.6})


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probes' synthetic cohort with one row per disc (renumbered) and its axial slices, in which a herniated
    disc shows; a simclr encoder.pt of the small spec; the linear head's pooled features of the pretrained and the
    initial-weights extractor."""
    root = write_probe_data(tmp_path_factory.mktemp("slices"), n_subjects=40)
    volumes = pd.read_parquet(root / "splits" / "volumes.parquet")
    discs = volumes.kind == "disc"
    volumes.loc[discs, "row"] = np.arange(int(discs.sum()))
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    labels = volumes.loc[discs, "herniation"].fillna(0).to_numpy().astype(int)
    np.save(root / "extract" / "slices.npy", _labelled_slices(len(labels), labels))
    torch.manual_seed(5)
    torch.save({"method": "simclr", "spec": SPEC.to_dict(), "state_dict": SimclrEncoder(SPEC).state_dict()},
               root / "encoder.pt")
    from stages.axial_features import run as features
    for name, seed in (("pretrained", None), ("initial", 0)):
        features(root / "extract" / "slices.npy", root / "encoder.pt",
                 {"pooled": root / name / "disc_pooled.npy", "meta": root / name / "meta.json"}, device="cpu",
                 initial_seed=seed)
    return root


def _job(root: Path, job: Path, model: str, slice_cfg: SliceHeadConfig = FAST, end_to_end: bool = False,
         initial: bool = False, cfg: ProbeConfig = CFG) -> dict:
    pooled = None if end_to_end else root / ("initial" if initial else "pretrained") / "disc_pooled.npy"
    inputs = JobInputs(disc_pooled=pooled, axial=root / "extract" / "slices.npy", encoder=root / "encoder.pt",
                       initial_weights=initial)
    return run(model, "herniation", 1.0, 0, root / "splits" / "subjects.parquet", root / "splits" / "volumes.parquet",
               JobFiles.in_folder(job), cfg, end_to_end=end_to_end, disc_input="disc", inputs=inputs,
               slice_cfg=slice_cfg)


def test_a_frozen_job_trains_the_slices_head_beside_the_linear_head_and_is_seeded(axial, tmp_path):
    one = _job(axial, tmp_path / "one", "simclr")
    two = _job(axial, tmp_path / "two", "simclr")
    assert set(one["heads"]) == {"linear", "slices"}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / "predictions.parquet"),
                                  pd.read_parquet(tmp_path / "two" / "predictions.parquet"))
    head = one["heads"]["slices"]
    assert head["extractor"] == "pretrained" and head["epochs_run"] <= FAST.epochs
    assert head["auc"] > 0.8      # the blob is plain to see through a random extractor's features
    history = pd.read_csv(tmp_path / "one" / "history.csv")
    assert set(history["head"]) == {"slices"} and history.kept.sum() == 1
    saved = np.load(tmp_path / "one" / "model.npz")
    assert saved["slices/fc_weight"].shape == (2, 3 * SPEC.fc_units)


def test_the_grid_trains_one_head_per_setting(axial, tmp_path):
    grid = SliceHeadConfig.from_config({"epochs": 2, "patience": 2, "learning_rate": 0.01, "dropout": [0.0, 0.5],
                                        "weight_decay": [0.0]})
    result = _job(axial, tmp_path, "simclr", grid)
    assert {"slices dr0 wd0", "slices dr0.5 wd0", "linear"} == set(result["heads"])
    assert result["heads"]["slices dr0.5 wd0"]["dropout"] == 0.5
    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    assert set(predictions["head"]) == set(result["heads"])


def test_the_random_frozen_baseline_reads_pretrainings_initial_weights(axial, tmp_path):
    result = _job(axial, tmp_path, "simclr-random", initial=True)
    assert result["heads"]["slices"]["extractor"] == "initial weights"
    trained = _job(axial, tmp_path / "trained", "simclr")
    assert result["heads"]["slices"]["auc"] != trained["heads"]["slices"]["auc"]


def test_the_fully_supervised_baseline_trains_the_extractor_end_to_end_and_learns(axial, tmp_path):
    result = _job(axial, tmp_path, "simclr-scratch", end_to_end=True, initial=True)
    assert set(result["heads"]) == {"network"}
    assert result["heads"]["network"]["init"] == "initial weights" and result["heads"]["network"]["auc"] > 0.8
    saved = np.load(tmp_path / "model.npz")
    assert any(k.startswith("network/encoder.resnet.") for k in saved.files)


def test_training_never_reads_a_test_disc(axial, tmp_path, monkeypatch):
    """Every slice the classifier trains or validates on belongs to the subset's or the validation subjects."""
    from stages.nets import disc_net
    opened: list[np.ndarray] = []
    original = disc_net.BodyReader.__init__

    def spy(self, path, rows):
        opened.append(np.asarray(rows))
        original(self, path, rows)
    monkeypatch.setattr(disc_net.BodyReader, "__init__", spy)
    _job(axial, tmp_path, "simclr")
    volumes = pd.read_parquet(axial / "splits" / "volumes.parquet")
    discs = volumes[volumes.kind == "disc"]
    test_rows = set(discs.row[discs.downstream_part == "test"])
    fit_rows, read_test = opened[0], opened[1]
    assert not set(fit_rows.tolist()) & test_rows and set(read_test.tolist()) <= test_rows


def test_the_cli_names_what_the_slices_head_needs(axial, tmp_path):
    base = [sys.executable, "-m", "stages.probe", "--model", "simclr", "--task", "herniation", "--fraction", "1",
            "--subset-seed", "0", "--subjects", str(axial / "splits" / "subjects.parquet"), "--volumes",
            str(axial / "splits" / "volumes.parquet"), "--metrics", str(tmp_path / "m.json"), "--predictions",
            str(tmp_path / "p.parquet"), "--model-file", str(tmp_path / "model.npz"), "--history",
            str(tmp_path / "h.csv")]
    missing = subprocess.run(base + ["--axial", str(axial / "extract" / "slices.npy")], capture_output=True,
                             text=True, cwd=ROOT)
    assert missing.returncode == 2 and "--axial and --initial-weights need --encoder" in missing.stderr
    bad = subprocess.run(base + ["--axial", str(axial / "extract" / "slices.npy"), "--encoder",
                                 str(axial / "encoder.pt"), "--slice-crop-margin", "0.7"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "crop_margin" in bad.stderr
    done = subprocess.run(base + ["--axial", str(axial / "extract" / "slices.npy"), "--encoder",
                                  str(axial / "encoder.pt"), "--heads", "slices", "--slice-epochs", "1",
                                  "--threads", "1", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads((tmp_path / "m.json").read_text())["heads"]) == {"slices"}


def test_a_training_disc_with_a_second_sample_is_trained_on_both_and_no_other_disc_is(axial, tmp_path, monkeypatch):
    """Hou et al.: a disc with 4 axial slices gives two samples (slices 1-3 and 2-4). Its second sample joins the
    training set when the disc is a training disc; validation and test discs are seen through their first."""
    from stages.nets import disc_net
    volumes = pd.read_parquet(axial / "splits" / "volumes.parquet")
    discs = volumes[volumes.kind == "disc"]
    slices = np.load(axial / "extract" / "slices.npy")
    second = np.zeros_like(slices)
    with_second = discs.row.to_numpy()[::3]
    second[with_second] = slices[with_second] + np.float16(0.5)
    np.save(axial / "second.npy", second)
    opened: list[tuple[str, set]] = []
    original = disc_net.BodyReader.__init__

    def spy(self, path, rows):
        opened.append((Path(path).name, set(np.asarray(rows).tolist())))
        original(self, path, rows)
    monkeypatch.setattr(disc_net.BodyReader, "__init__", spy)
    inputs = JobInputs(disc_pooled=axial / "pretrained" / "disc_pooled.npy", axial=axial / "extract" / "slices.npy",
                       axial_second=axial / "second.npy", encoder=axial / "encoder.pt")
    result = run("simclr", "herniation", 1.0, 0, axial / "splits" / "subjects.parquet",
                 axial / "splits" / "volumes.parquet", JobFiles.in_folder(tmp_path), CFG, disc_input="disc",
                 inputs=inputs, slice_cfg=FAST)
    (first_name, fit_rows), (second_name, second_rows) = opened[0], opened[1]
    assert first_name == "slices.npy" and second_name == "second.npy"
    held_out = set(discs.row[discs.downstream_part.isin(["val", "test"])])
    train_rows = fit_rows - held_out
    expected = train_rows & set(with_second.tolist())
    assert second_rows == expected and expected and not second_rows & held_out
    assert result["heads"]["slices"]["second_samples"] == len(expected)
