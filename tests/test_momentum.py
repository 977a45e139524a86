"""The momentum-encoder family (MoCo v2, BYOL; Cao et al. 2022's baselines): InfoNCE with a queue against a loop
written from the equation, BYOL's loss from theirs, the momentum update, the queue's first-in first-out order, no
key of a query's own volume among its negatives, the keys of every process entering the queue (2 gloo processes
equal 1), the longitudinal loss against a loop over the supervised-contrastive equation and its positives, and a short
run of each method that resumes exactly after SIGKILL and hands on an encoder the downstream stages load."""

from __future__ import annotations

import dataclasses
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
from stages.nets.momentum import KeyQueue, MomentumNet
from stages.nets.siamese import EncoderSpec
from stages.training.config import PretrainConfig
from stages.training.harness import TIMING_COLUMNS, Outputs
from stages.training.infonce import (
    batch_top1,
    byol_loss,
    info_nce,
    own_keys,
    supervised_info_nce,
)
from stages.training.methods.momentum import (
    MocoMethod,
    longitudinal_masks,
    volume_samples,
)
from stages.training.protocol import configured
from stages.training.store import VolumeStore

SPEC = EncoderSpec(slices=9, height=48, width_px=48, width=0.125, embedding_dim=16, dropout=0.0)
SMALL = {"width": "0.125", "embedding-dim": "16", "threads": "1", "device": "cpu", "checkpoint-every": "2"}
METHOD_SMALL = {"batch-size": "16", "hidden-dim": "32", "projection-dim": "8"}


# ---- the losses, against their equations


def naive_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, tau: float, exclude: np.ndarray) -> float:
    """Cao et al. 2022 (and MoCo's eq. 1): L_N(v1, v2) = -E[ log e^{h(v1^i, v2^i)} / sum_{j=1}^{K+1} e^{h(v1^i, v2^j)} ]
    with h(u, v) = cos(u, v) / tau; the K+1 keys of query i are its positive and the queue's entries not excluded."""
    def h(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) / tau

    total = 0.0
    for i in range(len(q)):
        numerator = math.exp(h(q[i], k[i]))
        denominator = numerator + sum(math.exp(h(q[i], queue[j])) for j in range(len(queue)) if not exclude[i, j])
        total += -math.log(numerator / denominator)
    return total / len(q)


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_info_nce_with_a_queue_equals_a_loop_over_the_equation(tau):
    rng = np.random.default_rng(0)
    q, k, queue = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(11, 5))
    exclude = rng.random((6, 11)) < 0.2
    loss, _ = info_nce(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, queue)), tau,
                       exclude=torch.from_numpy(exclude))
    assert float(loss) == pytest.approx(naive_info_nce(q, k, queue, tau, exclude), rel=1e-5)
    none = np.zeros_like(exclude)
    loss, _ = info_nce(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, queue)), tau)
    assert float(loss) == pytest.approx(naive_info_nce(q, k, queue, tau, none), rel=1e-5)


def test_info_nce_top1_is_the_share_of_queries_whose_positive_beats_every_negative():
    e = torch.eye(4)
    q = torch.stack([e[0], e[1], e[2]])
    k = torch.stack([e[0], e[3], e[2] + 0.5 * e[1]])          # query 1's positive is orthogonal to it
    queue = torch.stack([e[1], e[3]])                         # query 1 finds e1 in the queue first
    _, top1 = info_nce(q, k, queue, 0.5)
    assert float(top1) == pytest.approx(2 / 3)
    _, top1 = info_nce(q, k, queue, 0.5, exclude=torch.tensor([[False, False], [True, False], [False, False]]))
    assert float(top1) == pytest.approx(1.0)               # e3 (orthogonal) ties with the positive: a hit
    assert float(info_nce(q, k, queue, 0.5, exclude=torch.ones(3, 2, dtype=torch.bool))[0]) == pytest.approx(0.0)


def test_byol_loss_is_two_minus_twice_the_cosine_and_stops_the_targets_gradient():
    rng = np.random.default_rng(1)
    p, z = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    # Grill et al. 2020, eq. 2: L = || p/||p|| - z/||z|| ||^2 = 2 - 2 <p, z> / (||p|| ||z||)
    expected = np.mean([np.sum((p[i] / np.linalg.norm(p[i]) - z[i] / np.linalg.norm(z[i])) ** 2) for i in range(5)])
    pt, zt = torch.tensor(p, requires_grad=True), torch.tensor(z, requires_grad=True)
    loss = byol_loss(pt, zt)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pt.grad.abs().sum() > 0 and zt.grad is None
    assert float(batch_top1(pt, pt)) == 1.0


def naive_supcon(q: np.ndarray, keys: np.ndarray, positive: np.ndarray, tau: float, exclude: np.ndarray) -> float:
    """Khosla et al. 2020, eq. 2 (L_out): L = sum_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / tau) /
    sum_{a in A(i)} exp(z_i . z_a / tau) ), z normalised; A(i) the candidates not excluded; here a mean over i."""
    def h(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) / tau

    total = 0.0
    for i in range(len(q)):
        denominator = sum(math.exp(h(q[i], keys[a])) for a in range(len(keys)) if not exclude[i, a])
        members = [p for p in range(len(keys)) if positive[i, p]]
        total += -sum(math.log(math.exp(h(q[i], keys[p])) / denominator) for p in members) / len(members)
    return total / len(q)


def test_the_longitudinal_loss_equals_a_loop_over_the_supervised_contrastive_equation():
    rng = np.random.default_rng(2)
    q, keys = rng.normal(size=(5, 4)), rng.normal(size=(9, 4))
    positive = rng.random((5, 9)) < 0.3
    positive[np.arange(5), np.arange(5)] = True              # every query's own key
    exclude = (rng.random((5, 9)) < 0.2) & ~positive
    loss, top1 = supervised_info_nce(torch.tensor(q), torch.tensor(keys), torch.from_numpy(positive), 0.2,
                                     torch.from_numpy(exclude))
    assert float(loss) == pytest.approx(naive_supcon(q, keys, positive, 0.2, exclude), rel=1e-5)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    sim[exclude] = -np.inf
    assert float(top1) == pytest.approx(positive[np.arange(5), sim.argmax(1)].mean())
    with pytest.raises(ValueError, match="at least one positive"):
        supervised_info_nce(torch.tensor(q), torch.tensor(keys), torch.zeros(5, 9, dtype=torch.bool), 0.2)


def test_longitudinal_positives_are_the_subjects_same_level_and_its_other_levels_are_left_out():
    # rows 0-3: subject 0 at levels 0, 1 (study 1) and 0, 1 (study 2); rows 4-5: subject 1 at levels 0, 1
    subject = torch.tensor([0, 0, 0, 0, 1, 1])
    level = torch.tensor([0, 1, 0, 1, 0, 1])
    queries = torch.tensor([0, 5])
    candidates = torch.tensor([0, 1, 2, 3, 4, 5, -1])         # -1: an initial random key of the queue
    positive, exclude = longitudinal_masks(queries, candidates, subject, level)
    assert positive.tolist() == [[True, False, True, False, False, False, False],
                                 [False, False, False, False, False, True, False]]
    assert exclude.tolist() == [[False, True, False, True, False, False, False],
                                [False, False, False, False, True, False, False]]


# ---- the momentum update and the queue


def test_the_momentum_update_moves_the_target_towards_the_online_network_by_one_minus_m():
    torch.manual_seed(0)
    net = MomentumNet(SPEC, hidden_dim=8, out_dim=4, predictor=True, batch_norm=False)
    online = [p.detach().clone() for p in net.online_parameters()]
    target = [p.detach().clone() for p in net.target_parameters()]
    assert all(torch.equal(o, t) for o, t in zip(online, target))          # the target starts as a copy
    assert not any(p.requires_grad for p in net.target_parameters())
    with torch.no_grad():
        for p in net.online_parameters():
            p.add_(torch.randn_like(p))
    moved = [p.detach().clone() for p in net.online_parameters()]
    net.update_target(0.9)
    for t0, o, t1 in zip(target, moved, net.target_parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o, atol=1e-6)        # theta_t <- m theta_t + (1 - m) theta_o
    assert all(torch.equal(a, b) for a, b in zip(moved, net.online_parameters()))   # the online one is untouched
    net.update_target(0.0)
    assert all(torch.equal(t, o) for t, o in zip(net.target_parameters(), net.online_parameters()))
    with pytest.raises(ValueError, match="momentum coefficient"):
        net.update_target(1.5)
    x = torch.randn(3, *SPEC_SHAPE)
    p, z = net(x, x)
    assert p.shape == z.shape == (3, 4) and p.requires_grad and not z.requires_grad


SPEC_SHAPE = (SPEC.slices, SPEC.height, SPEC.width_px)


def test_the_queue_is_first_in_first_out_and_wraps_around():
    queue = KeyQueue(size=5, dim=2)
    assert (queue.ids == -1).all() and torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    for start in (0, 3, 6):
        ids = torch.arange(start, start + 3)
        queue.enqueue(torch.stack([ids.float(), -ids.float()], 1), ids)
    keys, ids = queue.ordered()
    assert ids.tolist() == [4, 5, 6, 7, 8]                    # the five newest, oldest first
    assert keys[:, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert int(queue.pointer) == 9 % 5
    queue.enqueue(torch.zeros(7, 2), torch.arange(100, 107))  # more than the queue holds: the last five stay
    assert queue.ordered()[1].tolist() == [102, 103, 104, 105, 106]
    with pytest.raises(ValueError, match="expected keys"):
        queue.enqueue(torch.zeros(2, 3), torch.arange(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ssl_data(tmp_path_factory.mktemp("momentum"))


def _moco(data: Path, **section) -> MocoMethod:
    values = {"batch_size": 8, "hidden_dim": 16, "projection_dim": 4, "queue_size": 32, **section}
    cfg = configured(MocoMethod, PretrainConfig(width=0.125, embedding_dim=16, device="cpu"), {"moco": values})
    store = VolumeStore(*store_files(data).values(), structure="vertebra")
    torch.manual_seed(0)
    return MocoMethod(cfg, store)


def test_a_moco_step_scores_against_the_queue_before_its_own_keys_which_enter_after_it(data):
    method = _moco(data)
    queue = method.model.queue
    batch = method.load("train", np.arange(8))
    rows = batch["row"]
    # earlier keys of two of the batch's own volumes sit in the queue: they are no negatives of their queries
    queue.enqueue(torch.randn(2, 4), rows[:2])
    before_keys, before_ids = queue.keys.clone(), queue.ids.clone()
    a, b = torch.randn(8, *method.store.shape), torch.randn(8, *method.store.shape)
    loss, _ = method.step(method.model, a, b, rows, train=True)
    with torch.no_grad():
        q, k = method.model.online(a), method.model.target(b)
    mine = own_keys(rows, before_ids)
    assert mine.sum() == 2 and mine[0].any() and mine[1].any()
    expected = naive_info_nce(q.numpy(), k.numpy(), before_keys.numpy(), method.mc.temperature, mine.numpy())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    keys, ids = queue.ordered()
    assert ids[-8:].tolist() == rows.tolist()                 # the batch's keys are the newest, in order
    assert torch.allclose(keys[-8:], F.normalize(k, dim=1), atol=1e-6)
    # evaluation changes neither the queue nor the target
    state = {n: t.clone() for n, t in method.model.state_dict().items()}
    method.loss(method.model, method.load("val", np.arange(4)), None)
    assert all(torch.equal(state[n], t) for n, t in method.model.state_dict().items())


def test_moco_and_byol_read_only_self_supervision_volumes(data):
    method = _moco(data)
    table = method.store.table
    for part in ("train", "val"):
        rows = volume_samples(method.store, part)
        assert len(rows) and set(table.loc[rows, "ssl_part"]) == {part}
        assert not set(table.loc[rows, "downstream_part"]) & {"val", "test"}
    assert method.n_samples("train") == len(volume_samples(method.store, "train"))


# ---- the methods, end to end


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _stage(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.pretrain", "--method", method]
    for option, path in {**store_files(data), **dataclasses.asdict(Outputs.under(out))}.items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    for key, value in SMALL.items():
        args += [f"--{key}", value]
    for key, value in METHOD_SMALL.items():
        args += [f"--{method.replace('_', '-')}-{key}", value]
    if method in ("moco", "longitudinal_nce"):
        args += [f"--{method.replace('_', '-')}-queue-size", "40"]
    return args + list(extra)


def _run(args: list[str], torchrun: bool = False) -> subprocess.CompletedProcess:
    if torchrun:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args[1:]]
    run = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.parametrize("method", ["moco", "longitudinal_nce"])
def test_keys_are_gathered_from_every_process_two_gloo_processes_equal_one(method, data, tmp_path):
    extra = ("--max-steps", "3")
    _run(_stage(method, data, tmp_path / "one", *extra))
    _run(_stage(method, data, tmp_path / "two", *extra), torchrun=True)
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("one", "two"))
    assert one["identity"]["world_size"] == 1 and two["identity"]["world_size"] == 2
    m1, m2 = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    columns = [c for c in m1.columns if c not in TIMING_COLUMNS and c not in ("epoch", "split")]
    assert {"loss", "top1"} <= set(columns)
    assert np.allclose(m1[columns], m2[columns], rtol=1e-4)
    # the queue holds the keys of all 3 x 16 volumes of the global batches, in the same slots and order
    assert torch.equal(one["model"]["queue.ids"], two["model"]["queue.ids"])
    assert int((one["model"]["queue.ids"] >= 0).sum()) == 40 and int(one["model"]["queue.pointer"]) == 48 % 40
    assert torch.allclose(one["model"]["queue.keys"], two["model"]["queue.keys"], atol=1e-5)
    for name, weight in one["model"].items():
        assert torch.allclose(weight.float(), two["model"][name].float(), rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("method", ["moco", "byol", "longitudinal_nce"])
def test_a_run_killed_with_sigkill_resumes_and_ends_exactly_as_an_uninterrupted_run(method, data, tmp_path):
    extra = (f"--{method.replace('_', '-')}-max-epochs", "2")
    _run(_stage(method, data, tmp_path / "whole", *extra))
    out = tmp_path / "killed"
    kill_at_step(_stage(method, data, out, *extra), out / "resume" / "last.pt", 5, cwd=ROOT, env=_env())
    assert not (out / "encoder.pt").exists()
    again = _run(_stage(method, data, out, *extra))
    assert "resuming from" in again.stderr
    a, b = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    numbers = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert {"loss", "top1"} <= set(numbers) and len(a) == 4 and a[numbers].notna().all().all()
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    killed = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert whole.keys() == killed.keys() and any(k.startswith("target_") for k in whole)
    assert all(torch.equal(whole[k], killed[k]) for k in whole)   # online, target and queue
    # the handed-on encoder is the Siamese trunk: the downstream stages load it as they load the Siamese one
    encoder, saved = load_encoder(out / "encoder.pt")
    assert saved["method"] == method and saved["structure"] == "vertebra" and encoder.spec.embedding_dim == 16
    evaluation = tmp_path / "evaluation.json"
    _run([sys.executable, "-m", "stages.pretext_eval", "--checkpoint", str(out / "checkpoint.pt"),
          *sum(([f"--{k}", str(v)] for k, v in store_files(data).items()), []), "--evaluation", str(evaluation),
          "--scores", str(tmp_path / "scores.parquet"), "--scores-csv", str(tmp_path / "scores.csv"),
          "--threads", "1"])
    figures = json.loads(evaluation.read_text())
    assert figures["method"] == method and figures["chance_top1"] == pytest.approx(1 / figures["test_volumes"])
    for network in ("trained", "untrained"):
        assert 0 <= figures[network]["auc"] <= 1 and 0 <= figures[network]["top1"] <= 1
        assert ("level_accuracy" in figures[network]) == (method == "longitudinal_nce")
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert {"positive", "distance", "untrained_distance"} <= set(scores.columns)   # the pretext figure's pair panels
    assert not np.allclose(scores.distance, scores.untrained_distance)
