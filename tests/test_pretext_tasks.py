"""The curricular multi-task study's pretext tasks (rotation, relative location, SwAV) on hand-built inputs, their
losses against the papers' equations, and curriculum steps: a second step that starts from the first step's encoder,
the learning-rate search that picks its candidate by the stated rule, and an exact resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from kill_run import kill_at_step
from ssl_data import store_files, write_ssl_data

from stages.nets.encoders import load_encoder
from stages.training.config import PretrainConfig
from stages.training.harness import TIMING_COLUMNS, Outputs, start_from
from stages.training.methods.pretext import (
    EDGE,
    NEIGHBOURS,
    Grid,
    RelativeLocationMethod,
    RotationMethod,
    SwavMethod,
    all_rotations,
    cut_patches,
    evaluation_jitter,
    rotate_volumes,
    sinkhorn,
    swapped_prediction,
)
from stages.training.protocol import configured
from stages.training.store import VolumeStore

# ---- labels and inputs


def test_a_rotated_volume_carries_its_quarter_turns_as_label_and_keeps_its_outline():
    square = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # a counter-clockwise quarter turn moves the top-right value to the top-left
    assert rotate_volumes(square, 1)[0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert rotate_volumes(square, 2)[0, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    x = torch.rand(2, 3, 6, 10) + 0.1                  # not square: the central 6 x 6 turns, the rest is blank
    rotated, labels = all_rotations(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[:2], torch.cat([torch.zeros(2, 3, 6, 2), x[..., 2:8], torch.zeros(2, 3, 6, 2)], -1))
    outlines = (rotated != 0).view(4, 2, 3, 6, 10)
    assert all(torch.equal(outlines[0], outlines[k]) for k in range(4))
    assert torch.equal(rotated[6:, ..., 2:8], torch.rot90(x[..., 2:8], 3, dims=(-2, -1)))   # 270 degrees


def test_relative_location_patches_sit_in_their_cells_with_a_gap_and_a_bounded_jitter():
    assert NEIGHBOURS == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert EDGE == [1, 3, 4, 6]                              # above, left, right, below
    grid = Grid(64, 64, gap_fraction=0.2, jitter_fraction=0.05)
    assert grid.cell() == (21, 21) and grid.patch() == (17, 17) and grid.max_jitter() == (1, 1)
    corners = grid.corners(torch.zeros(1, 9, 2, dtype=torch.long))[0]
    assert corners[0].tolist() == [2, 2] and corners[4].tolist() == [23, 23] and corners[8].tolist() == [44, 44]
    jitter = grid.draw_jitter(500, torch.Generator().manual_seed(0))
    assert set(jitter.unique().tolist()) == {-1, 0, 1}
    # neighbouring patches never touch: a gap of at least gap - 2 x jitter pixels between them
    placed = grid.corners(jitter)
    assert int((placed[:, 1, 1] - (placed[:, 0, 1] + 17)).min()) >= 2
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    patches = cut_patches(x, Grid(64, 64, 0.2, 0.0), torch.zeros(2, 9, 2, dtype=torch.long))
    assert patches.shape == (2, 9, 3, 64, 64)
    by_hand = F.interpolate(x[:, :, 23:40, 44:61], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(patches[:, 5], by_hand)            # the right-hand neighbour (cell (1, 2))
    with pytest.raises(ValueError, match="too small"):
        Grid(6, 6, 0.9, 0.0).patch()


# ---- SwAV against the paper's equations


def test_sinkhorn_codes_share_the_prototypes_equally_in_the_paper_s_form():
    """Caron et al. 2020, eq. 3 and its solution: Q* = Diag(u) exp(C^T Z / epsilon) Diag(v), with u and v such that
    Q is in {Q >= 0: Q 1_B = 1_K / K, Q^T 1_K = 1_B / B}; SwAV uses Q* scaled so that each sample's codes sum to 1."""
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.uniform(-1, 1, size=(12, 4)), dtype=torch.float32)   # B = 12 samples, K = 4
    q = sinkhorn(scores, epsilon=0.5, iterations=200).double().numpy()               # (B, K)
    assert q.shape == (12, 4) and (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-6)        # each sample: one unit
    np.testing.assert_allclose(q.sum(axis=0), 12 / 4, atol=1e-4)     # each prototype: B / K samples
    ratio = q.T / np.exp(scores.double().numpy().T / 0.5)            # (K, B): Diag(u) 1 1^T Diag(v), rank 1
    s = np.linalg.svd(ratio, compute_uv=False)
    assert s[1] / s[0] < 1e-6
    few = sinkhorn(scores, epsilon=0.5, iterations=3)                # SwAV's 3 iterations: columns exact still
    np.testing.assert_allclose(few.sum(1).numpy(), 1.0, atol=1e-6)


def test_swapped_prediction_equals_the_papers_loss_written_as_a_loop():
    """L(z_t, z_s) = l(z_t, q_s) + l(z_s, q_t), l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k),
    p_t^(k) = exp(z_t^T c_k / tau) / sum_k' exp(z_t^T c_k' / tau); averaged over the batch and halved."""
    rng = np.random.default_rng(1)
    z1, z2 = (F.normalize(torch.tensor(rng.normal(size=(5, 3)), dtype=torch.float32), dim=1) for _ in range(2))
    c = F.normalize(torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32), dim=1)
    q1, q2 = (torch.tensor(rng.dirichlet(np.ones(4), size=5), dtype=torch.float32) for _ in range(2))
    tau = 0.1

    def ell(z: np.ndarray, q: np.ndarray) -> float:
        logits = [float(z @ ck) / tau for ck in c.numpy()]
        norm = math.log(sum(math.exp(v) for v in logits))
        return -sum(qk * (v - norm) for qk, v in zip(q, logits))

    naive = sum(ell(z1[n].numpy(), q2[n].numpy()) + ell(z2[n].numpy(), q1[n].numpy()) for n in range(5)) / (2 * 5)
    assert float(swapped_prediction(z1, z2, c, q1, q2, tau)) == pytest.approx(naive, rel=1e-5)


# ---- the methods on the ssl data set


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ssl_data(tmp_path_factory.mktemp("pretext"), n_subjects=16)


def _method(build, data: Path, **section):
    cfg = configured(build, PretrainConfig(width=0.125, embedding_dim=16, device="cpu"),
                     {build.section: {"batch_size": 8, "hidden_dim": 16, **section}})
    torch.manual_seed(0)
    return build(cfg, VolumeStore(*store_files(data).values(), structure="vertebra"))


def test_each_task_scores_its_own_predictions(data):
    rotation = _method(RotationMethod, data)
    batch = rotation.load("train", np.arange(4))
    loss, stats = rotation.loss(rotation.model, batch, None)
    assert stats["count"] == 16 and 0 <= stats["correct"] <= 16
    with torch.no_grad():
        logits = rotation.model(all_rotations(batch["x"])[0])
    assert float(loss.detach()) == pytest.approx(
        float(F.cross_entropy(logits, torch.arange(4).repeat_interleave(4))), rel=1e-5)
    location = _method(RelativeLocationMethod, data)
    batch = location.load("val", np.arange(3))
    loss, stats = location.loss(location.model, batch, None)          # evaluation: each volume's fixed jitter
    assert stats["count"] == 3 * 8
    with torch.no_grad():
        logits = location.model(cut_patches(batch["x"], location.grid, evaluation_jitter(location.grid,
                                                                                          batch["idx"])))
    assert logits.shape == (24, 8)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, torch.arange(8).repeat(3))), rel=1e-5)
    swav = _method(SwavMethod, data, prototypes=5, projection_dim=8)
    loss, stats = swav.loss(swav.model, swav.load("train", np.arange(6)), None)
    assert math.isfinite(float(loss.detach())) and stats["count"] == 6
    row = swav.summarise(stats)
    assert row["accuracy"] == stats["correct"] / 6 and row["loss"] == pytest.approx(float(loss))


# ---- curriculum steps, end to end

SMALL = ["--width", "0.125", "--embedding-dim", "16", "--threads", "1", "--device", "cpu", "--checkpoint-every", "2"]


def _stage(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.pretrain", "--method", method, *SMALL]
    for option, path in {**store_files(data), **dataclasses.asdict(Outputs.under(out))}.items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    prefix = method.replace("_", "-")
    return args + [f"--{prefix}-batch-size", "8", f"--{prefix}-hidden-dim", "16", *extra]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_a_second_step_starts_from_the_first_searches_its_rate_and_resumes_exactly(data, tmp_path):
    first = tmp_path / "step1"
    _run(_stage("rotation", data, first, "--rotation-max-epochs", "2"))
    encoder, saved = load_encoder(first / "encoder.pt")
    assert saved["method"] == "rotation"

    # the second step's network starts from the first step's encoder: its encoder's weights are those
    swav = _method(SwavMethod, data, prototypes=5, projection_dim=8)
    digest = start_from(swav, first / "encoder.pt")
    assert digest == hashlib.sha256((first / "encoder.pt").read_bytes()).hexdigest()[:16]
    assert all(torch.equal(a, b) for a, b in zip(swav.model.encoder.state_dict().values(),
                                                 encoder.state_dict().values()))
    other = _method(RotationMethod, data)
    with pytest.raises(ValueError, match="must share one backbone"):
        start_from(_method(RotationMethod, data, backbone="resnet18"), first / "encoder.pt")
    del other

    extra = ("--init-encoder", str(first / "encoder.pt"), "--lr-candidates", "0.5", "0.001", "--search-epochs", "1",
             "--swav-prototypes", "5", "--swav-projection-dim", "8", "--swav-max-epochs", "3")
    whole = tmp_path / "whole"
    _run(_stage("swav", data, whole, *extra, "--search-table", str(whole / "lr_search.csv")))
    search = pd.read_csv(whole / "lr_search.csv")
    assert search.learning_rate.tolist() == [0.5, 0.001] and (search.split == "val").all()
    assert search.chosen.sum() == 1
    assert search.learning_rate[search.chosen].iloc[0] == search.learning_rate[search.score.idxmin()]   # lowest loss
    for lr in (0.5, 0.001):                               # each candidate: the stated epochs, from the same start
        run = torch.load(whole / "lr_search" / f"lr{lr:g}" / "checkpoint.pt", weights_only=False)
        assert run["identity"]["data"]["init"] == digest and run["identity"]["config"]["max_epochs"] == 1
    final = torch.load(whole / "checkpoint.pt", weights_only=False)
    assert final["identity"]["data"]["init"] == digest
    assert final["identity"]["config"]["learning_rate"] == search.learning_rate[search.chosen].iloc[0]

    killed = tmp_path / "killed"
    kill_at_step(_stage("swav", data, killed, *extra, "--search-table", str(killed / "lr_search.csv")),
                 killed / "resume" / "last.pt", 3, cwd=ROOT,
                 env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    again = _run(_stage("swav", data, killed, *extra, "--search-table", str(killed / "lr_search.csv")))
    assert "resuming from" in again.stderr and "searched already" in again.stderr
    a, b = pd.read_csv(whole / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    numbers = [c for c in a.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    pd.testing.assert_frame_equal(search, pd.read_csv(killed / "lr_search.csv"), check_exact=True)
    ours = torch.load(killed / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(final["model"][k], ours[k]) for k in ours)


# ---- the orderings C, AC and MC


def _metrics(model: str, seed: int, value: float, fraction: float = 1.0, task: str = "grade") -> dict:
    return {"model": model, "task": task, "fraction": fraction, "seed": seed,
            "heads": {"linear": {"average_class_accuracy": value}, "mlp": {"average_class_accuracy": 1 - value}}}


def test_orderings_follow_the_single_tasks_mean_balanced_accuracy_at_the_largest_fraction(tmp_path):
    from stages.curriculum_order import orderings, run
    metrics = [_metrics("rotation", 0, 0.60), _metrics("rotation", 1, 0.70),            # mean 0.65
               _metrics("swav", 0, 0.50), _metrics("swav", 1, 0.52),                    # mean 0.51
               _metrics("relative_location", 0, 0.80), _metrics("relative_location", 1, 0.78),   # mean 0.79
               _metrics("swav", 0, 0.99, fraction=0.5),                                # a smaller fraction: not read
               _metrics("rotation", 0, 0.01, task="herniation")]                       # another task: not read
    files = []
    for i, m in enumerate(metrics):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(m))
    tasks = ["rotation", "relative_location", "swav"]
    result = run(files, tasks, "grade", "linear", tmp_path / "o.json", tmp_path / "o.csv")
    assert result["scores"] == pytest.approx({"rotation": 0.65, "relative_location": 0.79, "swav": 0.51})
    assert result["C"] == ["swav", "rotation", "relative_location"]                    # increasing
    assert result["AC"] == ["relative_location", "rotation", "swav"]                   # decreasing
    assert result["MC"] == ["rotation", "swav", "relative_location"]                   # neither
    table = pd.read_csv(tmp_path / "o.csv")
    assert table.step_in_C.tolist() == [2, 3, 1] and table.seeds.tolist() == [2, 2, 2]
    mlp = run(files, tasks, "grade", "mlp", tmp_path / "m.json", tmp_path / "m.csv")
    assert mlp["C"] == result["AC"]                                                    # 1 - value: the reverse
    assert orderings({"a": 0.5, "b": 0.5}, ["b", "a"]) == {"C": ["b", "a"], "AC": ["b", "a"]}   # ties: as listed
    with pytest.raises(ValueError, match="no grade probe results"):
        run(files, [*tasks, "moco"], "grade", "linear", tmp_path / "x.json", tmp_path / "x.csv")


def test_a_step_of_an_ordered_curriculum_reads_its_method_from_the_orderings(tmp_path):
    import argparse

    from stages.pretrain import ordered_method
    path = tmp_path / "orderings.json"
    path.write_text(json.dumps({"scores": {}, "C": ["swav", "rotation"], "AC": ["rotation", "swav"]}))
    parser = argparse.ArgumentParser()
    assert ordered_method(path, "C", 1, parser) == "swav" and ordered_method(path, "AC", 1, parser) == "rotation"
    for name, step in (("MC", 1), ("C", 3), ("scores", 1)):
        with pytest.raises(SystemExit):
            ordered_method(path, name, step, parser)


def test_the_curricula_table_sets_each_curriculum_beside_its_first_task_and_the_supervised_baseline(tmp_path):
    from stages.figures import TableFiles, curricula_table

    def row(model: str, mean: float, head: str = "linear", fraction: float = 1.0) -> dict:
        return {"model": model, "head": head, "task": "grade", "fraction": fraction, "metric": "average_class_accuracy",
                "mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1}

    summary = pd.DataFrame([row("rotation", 0.60), row("swav", 0.70), row("C", 0.75), row("supervised", 0.72),
                            row("C", 0.10, fraction=0.5), row("C", 0.99, head="mlp")])
    searches = {"C": [pd.DataFrame({"learning_rate": [0.01, 0.03], "chosen": [False, True]}),
                      pd.DataFrame({"learning_rate": [0.01, 0.03], "chosen": [True, False]})]}
    attention = {"C": {"inside_disc": 0.4, "disc_share_of_volume": 0.1}}
    out = TableFiles(tmp_path / "t.html", tmp_path / "t.csv")
    curricula_table(summary, {"C": ["rotation", "swav"]}, attention, searches, "grade", "linear", out)
    table = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False).set_index("model")
    assert list(table.index) == ["rotation", "swav", "C"]
    c = table.loc["C"]
    assert c["balanced accuracy [interval]"] == "0.750 [0.650, 0.850]"
    assert c["delta vs its first task alone"] == "+0.150" and c["vs supervised"] == "+0.030"    # 0.75 - 0.60, - 0.72
    assert c["learning rates (search)"] == "0.03, 0.01" and c["steps"] == "rotation \u2192 swav"
    assert c["attention inside the disc (uniform)"].startswith("0.4")
    assert table.loc["swav", "vs supervised"] == "-0.020"
    assert table.loc["rotation", "attention inside the disc (uniform)"] == "n/a"


def test_swav_s_queue_widens_the_assignment_and_takes_each_step_s_projections(data):
    """With a queue (SwAV's for small batches), a step's codes are Sinkhorn's over the queue's filled entries and the
    batch, the batch's rows; the step's projections then enter the queue, view 1 then view 2."""
    from stages.training.methods.pretext import swav_codes
    from stages.training.protocol import AugmentDraw
    swav = _method(SwavMethod, data, prototypes=5, projection_dim=8, queue_size=20)
    net = swav.model
    queue = net.queue
    queue.enqueue(F.normalize(torch.randn(6, 8), dim=1), torch.arange(100, 106))      # six past projections
    scores = torch.randn(4, 5)
    past = queue.keys[queue.ids >= 0] @ net.prototypes.weight.detach().T
    assert len(past) == 6
    expected = sinkhorn(torch.cat([past, scores]), 0.05, 3)[6:]
    assert torch.allclose(swav_codes(scores, net, swav.tc), expected)
    assert not torch.allclose(expected, sinkhorn(scores, 0.05, 3))                      # the queue changes them
    batch = swav.load("train", np.arange(4))
    draw = AugmentDraw(torch.Generator().manual_seed(1), 4, slice(0, 4))
    swav.loss(net, batch, draw)
    keys, ids = queue.ordered()
    assert ids[-8:].tolist() == batch["row"].tolist() * 2                              # view 1, then view 2
    assert torch.allclose(keys[-8:].norm(dim=1), torch.ones(8), atol=1e-5)
