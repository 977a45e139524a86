"""The simclr method (Hou et al. 2023): NT-Xent against a loop written from their eqs. 5-6, the coupled rotation and
crop of eqs. 9-15, the negatives gathered across processes (2 gloo processes equal 1), the network from MONAI, and a
short run on a small cohort that resumes exactly after SIGKILL and beats its untrained network on the pretext top-1."""

from __future__ import annotations

import dataclasses
import json
import math
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
from ssl_data import write_ssl_data

from stages.nets.simclr import SimclrEncoder, SimclrNet, SimclrSpec, disc_features, load_simclr_encoder
from stages.training.harness import TIMING_COLUMNS, Outputs
from stages.training.ntxent import NTXentLoss
from stages.training.slice_views import (
    ViewParams,
    ViewRanges,
    box_corners,
    inside_rotated,
    make_views,
    sample_view_params,
    view_grid,
)

AXIAL = (3, 32, 32)
SMALL = {"depth": "10", "widen-factor": "0.125", "fc-units": "16", "batch-size": "16", "temperature": "0.5",
         "learning-rate": "0.001"}


def naive_ntxent(views: np.ndarray, tau: float) -> float:
    """Hou et al. 2023, eq. 5: P_ij = exp(<x_i, x_j>/tau) / sum_{k != i} exp(<x_i, x_k>/tau), and eq. 6:
    L = -sum over positive pairs of log P_ij; here divided by the 2n ordered positive pairs. ``views``: the 2n views,
    view i and view i + n are the two views of image i."""
    two_n = len(views)
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        j = (i + n) % two_n
        numerator = math.exp(float(np.dot(views[i], views[j])) / tau)
        denominator = sum(math.exp(float(np.dot(views[i], views[k])) / tau) for k in range(two_n) if k != i)
        total += -math.log(numerator / denominator)
    return total / two_n


@pytest.mark.parametrize("n,tau", [(2, 1.0), (5, 0.1), (8, 100.0), (16, 0.5)])
def test_ntxent_equals_a_loop_over_the_papers_equation(n, tau):
    generator = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 7, generator=generator, dtype=torch.float64), torch.randn(n, 7, generator=generator,
                                                                                     dtype=torch.float64)
    loss, _ = NTXentLoss(tau)(a, b)
    assert float(loss) == pytest.approx(naive_ntxent(torch.cat([a, b]).numpy(), tau), rel=1e-5)


def test_ntxent_uses_the_inner_product_not_the_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss_1, _ = NTXentLoss(1.0)(a, a)
    loss_3, _ = NTXentLoss(1.0)(3 * a, 3 * a)   # a cosine would not see the scale
    assert float(loss_3) < float(loss_1)


def test_ntxent_top1_counts_views_whose_positive_ranks_first():
    a = torch.eye(4)
    b = torch.eye(4)
    b[3] = a[0]    # image 3's second view (view 7) looks like image 0
    _, top1 = NTXentLoss(1.0)(a, b)
    # view 3's positive (view 7 = e0) is orthogonal to it, like every other view: it does not rank first; view 7's
    # positive (view 3 = e3) ranks below views 0 and 4 (e0); the other 6 views find theirs first (views 0 and 4 tie
    # with view 7 and take the lower index, their positive)
    assert float(top1) == pytest.approx(6 / 8)


def test_two_gloo_processes_give_the_loss_and_gradient_of_one_process_on_the_global_batch(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from ntxent_ddp import batch_and_model

    out = tmp_path / "ddp.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "ntxent_ddp.py"), str(out)], capture_output=True, text=True,
                         cwd=ROOT, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(out, weights_only=False)
    a, b, net = batch_and_model()
    z = net(torch.cat([a, b]))
    loss, _ = NTXentLoss(0.5)(z[:8], z[8:])
    loss.backward()
    assert float(saved["losses"].mean()) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert not torch.allclose(saved["losses"][0], saved["losses"][1])   # each process's own anchors
    for name, p in net.named_parameters():
        assert p.grad.abs().max() > 0
        assert torch.allclose(saved["grads"][name], p.grad, rtol=1e-5, atol=1e-7), name


# ---- the two views (eqs. 9-15)

def _draw(n: int = 64, size: tuple[int, int] = (48, 40), seed: int = 0, **ranges) -> ViewParams:
    return sample_view_params(n, size, ViewRanges(**ranges), torch.Generator().manual_seed(seed))


def test_the_two_views_of_an_image_share_the_operation_centre_and_each_crop_contains_it():
    params = _draw()
    n = len(params.centre)
    o = torch.cat([params.centre, params.centre])
    box = params.box
    assert ((box[:, 0] <= o[:, 0]) & (o[:, 0] <= box[:, 2]) & (box[:, 1] <= o[:, 1]) & (o[:, 1] <= box[:, 3])).all()
    assert params.centre.shape == (n, 2) and box.shape == (2 * n, 4)
    assert ((params.centre >= 0) & (params.centre <= torch.tensor([48.0, 40.0]))).all()


def test_crops_keep_the_aspect_and_area_limits_and_no_corner_leaves_the_rotated_image():
    size = (48, 40)
    params = _draw(256, size, rotation_deg=30.0)
    ok = ~params.fallback
    assert ok.float().mean() > 0.5
    box = params.box[ok]
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert ((w / h >= 0.75 - 1e-6) & (w / h <= 4 / 3 + 1e-6)).all()
    assert (w * h >= 0.1 * 48 * 40 - 1e-3).all()
    o = torch.cat([params.centre, params.centre])[ok]
    assert inside_rotated(box_corners(box), o[:, None, :], params.angle[ok][:, None], size).all()
    # and the resampling reads inside the source image only: no zero padding enters a view
    grid = F.affine_grid(view_grid(params, size), [len(params.angle), 1, size[1], size[0]], align_corners=False)
    assert grid.abs().max() <= 1.0 + 1e-4


def test_a_crop_that_cannot_be_found_in_the_tries_falls_back_to_neither_rotation_nor_crop():
    # the whole image is the only crop of area 1, and it leaves any rotated image: every view falls back
    params = _draw(16, crop_min_area=1.0, rotation_deg=10.0)
    assert params.fallback.all()
    assert (params.angle == 0).all()
    assert torch.equal(params.box, torch.tensor([0.0, 0.0, 48.0, 40.0]).expand(32, 4))
    # with one try, some views fall back and others do not
    some = _draw(256, crop_tries=1)
    assert 0 < some.fallback.float().mean() < 1


def test_an_unrotated_whole_image_view_is_the_image_and_a_crop_is_resized_back():
    x = torch.arange(40 * 48, dtype=torch.float32).reshape(1, 40, 48)
    params = ViewParams(centre=torch.tensor([[24.0, 20.0]]), angle=torch.zeros(2),
                        box=torch.tensor([[0.0, 0.0, 48.0, 40.0], [8.0, 4.0, 32.0, 24.0]]),
                        fallback=torch.zeros(2, dtype=torch.bool), flip=torch.zeros(2, dtype=torch.bool),
                        brightness=torch.ones(2), contrast=torch.ones(2), sigma=torch.full((2,), 1e-3))
    a, b = make_views(x, params, ViewRanges())
    assert torch.allclose(a[0], x[0], atol=1e-3)
    crop = F.interpolate(x[None, :, 4:24, 8:32], size=(40, 48), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(b[0][2:-2, 2:-2], crop[2:-2, 2:-2], atol=1e-2)


def test_rotation_turns_about_the_operation_centre_and_the_flip_mirrors():
    x = torch.zeros(1, 40, 40)
    x[0, 5:10, 20:22] = 1.0                      # a mark 13 pixels above the centre
    params = ViewParams(centre=torch.tensor([[20.0, 20.0]]), angle=torch.tensor([math.pi / 2, 0.0]),
                        box=torch.tensor([[0.0, 0.0, 40.0, 40.0]]).repeat(2, 1),
                        fallback=torch.zeros(2, dtype=torch.bool), flip=torch.tensor([False, True]),
                        brightness=torch.ones(2), contrast=torch.ones(2), sigma=torch.full((2,), 1e-3))
    a, b = make_views(x, params, ViewRanges())
    rotated = torch.nonzero(a[0] > 0.5).float().mean(0)
    assert torch.allclose(rotated, torch.tensor([20.5, 32.0]), atol=0.6)      # now 13 pixels right of O (row, col)
    mirrored = torch.nonzero(b[0] > 0.5).float().mean(0)
    assert torch.allclose(mirrored, torch.tensor([7.0, 18.5]), atol=0.6)


def test_the_two_views_differ_and_the_same_generator_gives_the_same_views():
    x = torch.randn(8, 32, 32)
    a1, b1 = make_views(x, _draw(8, (32, 32), seed=3), ViewRanges())
    a2, b2 = make_views(x, _draw(8, (32, 32), seed=3), ViewRanges())
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert all(not torch.allclose(a1[i], b1[i]) for i in range(8))
    a3, _ = make_views(x, _draw(8, (32, 32), seed=4), ViewRanges())
    assert not torch.allclose(a1, a3)


def test_a_process_keeps_its_share_of_the_global_draw():
    params = _draw(8)
    mine = params.take(slice(4, 8))
    assert torch.equal(mine.centre, params.centre[4:8])
    assert torch.equal(mine.angle, torch.cat([params.angle[4:8], params.angle[12:16]]))


def test_brightness_and_contrast_follow_their_equations():
    x = torch.rand(1, 32, 32) + 0.5
    params = ViewParams(centre=torch.tensor([[16.0, 16.0]]), angle=torch.zeros(2),
                        box=torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(2, 1),
                        fallback=torch.zeros(2, dtype=torch.bool), flip=torch.zeros(2, dtype=torch.bool),
                        brightness=torch.tensor([1.3, 1.0]), contrast=torch.tensor([1.0, 0.7]),
                        sigma=torch.full((2,), 1e-3))
    a, b = make_views(x, params, ViewRanges())
    assert torch.allclose(a[0], 1.3 * x[0], atol=1e-3)                                 # kappa I
    assert torch.allclose(b[0], (x[0] - x[0].mean()) * 0.7 + x[0].mean(), atol=1e-3)   # (I - mean) kappa + mean


# ---- the network


def test_the_resnet_is_monais_and_the_feature_is_the_first_fc_blocks_output():
    from monai.networks.nets import ResNet

    spec = SimclrSpec(height=32, width_px=32, depth=10, widen_factor=0.125, fc_units=16)
    net = SimclrNet(spec)
    assert isinstance(net.encoder.resnet, ResNet)
    assert len(net.projection) == 3 and not isinstance(net.projection[-1][-1], torch.nn.ReLU)
    x = torch.randn(4, 32, 32)
    features = net.encoder(x)
    assert features.shape == (4, 16) and (features >= 0).all()        # after the first block's ReLU
    assert net(x).shape == (4, 16)
    slices = torch.randn(2, 3, 32, 32)
    concatenated = disc_features(net.encoder.eval(), slices)
    assert concatenated.shape == (2, 48)
    assert torch.allclose(concatenated[1, 16:32], net.encoder(slices[1, 1:2])[0], atol=1e-5)


def test_the_papers_resnet50_has_bottleneck_blocks():
    spec = SimclrSpec(height=64, width_px=64, depth=50)
    encoder = SimclrEncoder(spec)
    assert encoder.resnet.layer1[0].__class__.__name__ == "ResNetBottleneck"
    assert encoder.fc1[0].in_features == 2048


def test_a_bad_spec_names_the_value():
    with pytest.raises(ValueError, match="depth must be one of"):
        SimclrSpec(height=32, width_px=32, depth=20)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(0.0)


# ---- the method, end to end on a small cohort


@pytest.fixture(scope="module")
def axial_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretraining test cohort with discs, and an axial array (3 slices per disc) in which every slice carries
    a coarse pattern of its own under noise (what instance discrimination can learn to recognise through the views);
    one disc's slices are blank (as a crop-table cohort's are)."""
    root = write_ssl_data(tmp_path_factory.mktemp("axial"), structure="disc")
    volumes = pd.read_parquet(root / "splits" / "volumes.parquet")
    n_discs = int((volumes.kind == "disc").sum())
    rng = np.random.default_rng(0)
    patterns = np.kron(rng.normal(size=(n_discs, AXIAL[0], 4, 4)), np.ones((1, 1, 8, 8)))
    axial = (patterns + 0.2 * rng.normal(size=(n_discs, *AXIAL))).astype(np.float16)
    axial[0] = 0
    np.save(root / "extract" / "axial.npy", axial)
    return root


def _stage(data: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.pretrain", "--method", "simclr", "--pairs",
            str(data / "splits" / "pairs.parquet"), "--volumes", str(data / "splits" / "volumes.parquet"),
            "--array", str(data / "extract" / "axial.npy"), "--threads", "1", "--device", "cpu",
            "--checkpoint-every", "2"]
    for option, path in dataclasses.asdict(Outputs.under(out)).items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    for key, value in SMALL.items():
        args += [f"--simclr-{key}", value]
    return args + list(extra)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_a_simclr_run_killed_with_sigkill_resumes_and_ends_exactly_as_an_uninterrupted_run(axial_data, tmp_path):
    extra = ("--simclr-max-epochs", "2")
    _run(_stage(axial_data, tmp_path / "whole", *extra))
    out = tmp_path / "killed"
    kill_at_step(_stage(axial_data, out, *extra), out / "resume" / "last.pt", 3, cwd=ROOT)
    assert not (out / "encoder.pt").exists()
    again = _run(_stage(axial_data, out, *extra))
    assert "resuming from" in again.stderr
    a, b = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    numbers = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert {"loss", "top1"} <= set(numbers) and len(a) == 4
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    wa = torch.load(tmp_path / "whole" / "encoder.pt", weights_only=False)["state_dict"]
    wb = torch.load(out / "encoder.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_simclr_reads_only_self_supervision_slices_with_adam_and_hands_on_a_loadable_encoder(axial_data, tmp_path):
    from stages.training.methods.simclr import slice_samples
    from stages.training.store import VolumeStore

    store = VolumeStore(None, axial_data / "splits" / "volumes.parquet", axial_data / "extract" / "axial.npy",
                        structure="axial")
    train, val = slice_samples(store, "train"), slice_samples(store, "val")
    table = store.table
    assert set(table.loc[train[:, 0], "ssl_part"]) == {"train"} and set(table.loc[val[:, 0], "ssl_part"]) == {"val"}
    assert not set(table.loc[train[:, 0], "downstream_part"]) & {"val", "test"}
    assert 0 not in set(train[:, 0]) | set(val[:, 0])          # the blank disc is no sample
    _run(_stage(axial_data, tmp_path / "run", "--simclr-max-epochs", "1"))
    encoder, saved = load_simclr_encoder(tmp_path / "run" / "encoder.pt")
    assert saved["structure"] == "axial" and encoder.spec.fc_units == 16
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["identity"]["config"]["optimiser"] == "adam"
    assert ckpt["identity"]["config"]["method_config"]["temperature"] == 0.5
    assert "exp_avg" in next(iter(ckpt["optimiser"]["state"].values()))   # Adam's state


def test_a_short_simclr_run_beats_its_untrained_network_on_the_test_top1(axial_data, tmp_path):
    run = tmp_path / "run"
    # milder views than the paper's (larger crops, no blur) so that a few epochs suffice on this small cohort
    _run(_stage(axial_data, run, "--simclr-max-epochs", "6", "--simclr-patience", "6", "--simclr-crop-min-area", "0.5",
                "--simclr-blur-sigma", "0.1", "0.1"))
    evaluation = tmp_path / "evaluation.json"
    _run([sys.executable, "-m", "stages.pretext_eval", "--checkpoint", str(run / "checkpoint.pt"), "--pairs",
          str(axial_data / "splits" / "pairs.parquet"), "--volumes", str(axial_data / "splits" / "volumes.parquet"),
          "--array", str(axial_data / "extract" / "axial.npy"), "--evaluation", str(evaluation), "--scores",
          str(tmp_path / "scores.parquet"), "--scores-csv", str(tmp_path / "scores.csv"), "--threads", "1"])
    figures = json.loads(evaluation.read_text())
    assert figures["method"] == "simclr" and figures["structure"] == "axial"
    assert figures["trained"]["top1"] > figures["untrained"]["top1"] + 0.1
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    volumes = pd.read_parquet(axial_data / "splits" / "volumes.parquet").set_index("row")
    discs = volumes[volumes.kind == "disc"]
    assert set(discs.loc[scores.row, "ssl_part"]) == {"test"}
