"""Hou et al. 2023's Grad-CAM variant (stages/gradcam.py): equations 16-20 against loops written from the paper (never
from the code under test), the output the maps explain (a binary task: the pre-sigmoid logit z1 - z0, positive
predictions only; a multi-class task: the predicted class's logit, every sample), the disc classifier read as one
input volume (K = 1 at conv5, its slices at conv3), and what the stage writes for the samples without a Hou map (NaN
in the maps and in ``inside_disc_hou``, ``hou_map`` False, left out of the summary's Hou averages)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from stages import gradcam
from stages.nets.disc_cnn import DiscClassifier
from stages.nets.encoders import random_encoder
from stages.nets.heads import fit_head
from stages.nets.siamese import EncoderSpec

SHAPE = (5, 48, 48)          # slices, rows, columns of a body volume: conv3 is 3 x 3 per slice (conv5 1 x 1)
SHAPE_OF = {"conv3": SHAPE, "conv5": (5, 64, 64)}    # conv5 2 x 2: a map with more than one position


# --- the references, loops over k and c written from the equations -----------------------------------------------

def naive_hou(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Hou et al. 2023, eqs. 16-20, one sample of K maps of C channels: ``acts`` A_kc and ``grads`` dy/dA_kc, both
    ``(K, C, *spatial)`` -> ``(K, *spatial)``."""
    k_maps, channels = acts.shape[:2]
    # (16) w_kc = mean over positions of |dy/dA_kc|
    w = np.zeros((k_maps, channels))
    for k in range(k_maps):
        for c in range(channels):
            w[k, c] = np.abs(grads[k, c]).sum() / grads[k, c].size
    # (17) w_kc <- w_kc / sd, the standard deviation of all of the sample's K x C weights (the sample standard
    #      deviation, n - 1, as the module documents; the paper does not say which)
    n = k_maps * channels
    mean = sum(w[k, c] for k in range(k_maps) for c in range(channels)) / n
    sd = math.sqrt(sum((w[k, c] - mean) ** 2 for k in range(k_maps) for c in range(channels)) / (n - 1))
    for k in range(k_maps):
        for c in range(channels):
            w[k, c] = w[k, c] / sd
    # (18) a_kc = exp(w_kc) / sum_{k', c'} exp(w_k'c'): one softmax over all K x C weights jointly
    total = sum(math.exp(w[k2, c2]) for k2 in range(k_maps) for c2 in range(channels))
    a = np.zeros((k_maps, channels))
    for k in range(k_maps):
        for c in range(channels):
            a[k, c] = math.exp(w[k, c]) / total
    out = []
    for k in range(k_maps):
        # (19) L_k = ReLU(sum_c a_kc A_kc)
        total_k = np.zeros(acts.shape[2:])
        for c in range(channels):
            total_k += a[k, c] * acts[k, c]
        l_k = np.maximum(total_k, 0)
        # (20) L_k / max(L_k); a map whose maximum is 0 (zero everywhere) stays 0
        out.append(l_k / l_k.max() if l_k.max() > 0 else l_k)
    return np.stack(out)


def naive_grad_cam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Selvaraju et al. 2017, eqs. 1-2, one volume ``(C, *spatial)``: ReLU(sum_c mean(dy/dA_c) A_c)."""
    total = np.zeros(acts.shape[1:])
    for c in range(acts.shape[0]):
        total += grads[c].mean() * acts[c]
    return np.maximum(total, 0)


# --- equations 16-20 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_maps", [2, 3, 6])
@pytest.mark.parametrize("spatial", [(4, 5), (2, 4, 5)])
def test_hou_maps_match_equations_16_to_20_written_as_loops(spatial, k_maps):
    rng = np.random.default_rng(10 + k_maps)
    acts = np.abs(rng.normal(size=(k_maps, 7, *spatial)))           # post-ReLU activations
    acts[0, :, 0] = 0.0                                               # a row without activation: its map is 0 there
    grads = rng.normal(size=(k_maps, 7, *spatial)) * rng.uniform(0.1, 3.0, size=(k_maps, 7, *[1] * len(spatial)))
    ours = gradcam.hou_cam(torch.tensor(acts), torch.tensor(grads)).numpy()
    np.testing.assert_allclose(ours, naive_hou(acts, grads), rtol=1e-10, atol=1e-12)
    for k in range(k_maps):   # each map divided by its own maximum: the maximum is 1, the minimum is not moved to 0
        assert ours[k].max() == pytest.approx(1.0)
    assert ours[0].min() == 0.0 and ours[1:].min() > 0
    # the sign of the gradient does not matter (|dy/dA|), unlike standard Grad-CAM
    np.testing.assert_allclose(gradcam.hou_cam(torch.tensor(acts), torch.tensor(-grads)).numpy(), ours, atol=1e-12)


def test_hou_softmax_is_one_over_every_map_and_channel_not_per_channel():
    """Two maps, two channels, where the two readings of eq. 18 differ: map 0 has the larger weight on channel 0,
    map 1 on channel 1. A per-channel softmax across the maps would weight each map's own strong channel alike."""
    acts = np.zeros((2, 2, 1, 2))
    acts[:, 0, 0, 0] = 1.0             # channel 0 fires at position 0, channel 1 at position 1, in both maps
    acts[:, 1, 0, 1] = 1.0
    grads = np.ones((2, 2, 1, 2))
    grads[0, 0], grads[0, 1], grads[1, 0], grads[1, 1] = 3.0, 1.0, 1.0, 2.0
    ours = gradcam.hou_cam(torch.tensor(acts), torch.tensor(grads)).numpy()
    w = np.array([[3.0, 1.0], [1.0, 2.0]])
    w = w / w.std(ddof=1)                                              # (17)
    # (18) jointly: a_kc proportional to exp(w_kc); (19) L_k = [a_k0, a_k1]; (20) / max
    expected = np.exp(w) / np.exp(w).max(1, keepdims=True)
    np.testing.assert_allclose(ours[:, 0], expected, rtol=1e-12)
    # per channel it would have been exp(w_kc) / (exp(w_0c) + exp(w_1c)): a different map 1
    per_channel = np.exp(w) / np.exp(w).sum(0, keepdims=True)
    assert not np.allclose(ours[1, 0], per_channel[1] / per_channel[1].max())


def test_hou_edge_cases_zero_map_constant_map_and_equal_weights():
    # a map that is 0 everywhere (max 0) stays 0, the other map is still scaled to a maximum of 1
    acts = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    acts[1] = 0.0
    out = gradcam.hou_cam(acts, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros(4, 4, dtype=torch.float64)) and out[0].max().item() == pytest.approx(1.0)
    assert torch.equal(gradcam.hou_cam(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)), torch.zeros(2, 4, 4))
    # a constant positive map is 1 everywhere (L / max L; a min-max scaling would have made it 0)
    flat = gradcam.hou_cam(torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64), torch.ones(2, 3, 4, 4,
                                                                                         dtype=torch.float64))
    assert torch.equal(flat, torch.ones(2, 4, 4, dtype=torch.float64))
    # equal weights (standard deviation 0, eq. 17 undefined): a uniform softmax, the map of the mean channel
    acts = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    out = gradcam.hou_cam(acts, torch.full((2, 3, 4, 4), 2.0, dtype=torch.float64))
    mean = acts.mean(1)
    torch.testing.assert_close(out, mean / mean.flatten(1).amax(1)[:, None, None])
    with pytest.raises(ValueError, match="activations and gradients"):
        gradcam.hou_cam(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


# --- the output explained ---------------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    """An encoder and a linear softmax classifier over a disc's two bodies: any model :func:`gradcam.explain` takes."""

    def __init__(self, encoder: nn.Module, n_classes: int, seed: int, embedding_dim: int = 16):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(2 * embedding_dim, n_classes)

    def forward(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(torch.cat([upper, lower]))
        return self.head(torch.cat(emb.chunk(2), dim=1))


def _layer_and_logits(model: LinearProbe, upper: torch.Tensor, lower: torch.Tensor,
                      layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output ``(2n, C, ...)`` (upper volumes, then lower ones) and the logits, by a hook of the test's
    own (the layer is chosen with gradcam.layer_module: which layer is not what is tested here)."""
    seen = []
    handle = gradcam.layer_module(model.encoder, layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(upper, lower)
    finally:
        handle.remove()
    return seen[0], logits


def _k_maps(layer_output: np.ndarray, i: int, n: int) -> np.ndarray:
    """Sample ``i``'s K maps ``(K, C, h, w)`` from the layer's output ``(2n, C, [s,] h, w)``: the upper and the lower
    body (conv5, K = 2), or every slice of the upper body then every slice of the lower one (conv3, K = 2 s)."""
    volumes = (layer_output[i], layer_output[n + i])
    if layer_output.ndim == 4:
        return np.stack(volumes)
    return np.stack([v[:, s] for v in volumes for s in range(v.shape[1])])


def _balanced_binary_probe(seed: int, shape: tuple[int, int, int]) -> tuple[LinearProbe, torch.Tensor,
                                                                                torch.Tensor]:
    """A 2-class model and 8 samples, its class-1 bias set so that half of them are predicted positive."""
    encoder = random_encoder(shape, seed, 0.125, 16).eval()
    model = LinearProbe(encoder, 2, seed).eval()
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(seed))
    upper, lower = x[:8], x[8:]
    with torch.no_grad():
        logits = model(upper, lower)
        margin = logits[:, 1] - logits[:, 0]
        model.head.bias[1] -= margin.sort().values[3:5].mean()
    return model, upper, lower


@pytest.mark.parametrize("layer", ["conv5", "conv3"])
def test_binary_task_maps_only_positive_predictions_and_explains_z1_minus_z0(layer):
    model, upper, lower = _balanced_binary_probe(20, SHAPE_OF[layer])
    result = gradcam.explain(model, model.encoder, upper, lower, layer, binary=True)
    predicted = result["logits"].argmax(1)
    positive = predicted == 1
    assert 0 < int(positive.sum()) < len(positive)                   # both kinds of prediction are there
    assert torch.equal(result["hou_made"], positive)
    assert torch.isnan(result["hou"][~positive]).all() and torch.isfinite(result["hou"][positive]).all()

    acts, logits = _layer_and_logits(model, upper, lower, layer)
    n = len(upper)
    assert np.prod(acts.shape[-2:]) > 1                             # maps with more than one position
    pre_sigmoid, = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), acts, retain_graph=True)   # z1 - z0
    class_1, = torch.autograd.grad(logits[:, 1].sum(), acts, retain_graph=True)
    predicted_logit, = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), acts)
    a = acts.detach().double().numpy()
    for i in range(n):
        sample = [i, n + i]                                          # the upper and the lower body
        got = result["hou"][i].double().numpy()
        if positive[i]:
            reference = naive_hou(_k_maps(a, i, n), _k_maps(pre_sigmoid.double().numpy(), i, n)).reshape(got.shape)
            np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
            # the target matters: the gradient of z1 alone gives another map
            other = naive_hou(_k_maps(a, i, n), _k_maps(class_1.double().numpy(), i, n)).reshape(got.shape)
            assert np.abs(other - reference).max() > 1e-3
        # standard Grad-CAM unchanged: every sample, the predicted class's logit, both volumes on one scale
        cams = [naive_grad_cam(a[j], predicted_logit.double().numpy()[j]) for j in sample]
        scale = max(c.max() for c in cams)
        np.testing.assert_allclose(result["cam"][i].double().numpy(), np.stack(cams) / max(scale, 1e-12),
                                   rtol=1e-4, atol=1e-5)
    # z1 - z0 is the logit of a sigmoid that gives the softmax's probability of class 1
    torch.testing.assert_close(torch.sigmoid(result["logits"][:, 1] - result["logits"][:, 0]),
                               torch.softmax(result["logits"], 1)[:, 1])


def test_multiclass_task_explains_the_predicted_logit_with_every_slice_of_both_volumes_as_a_map():
    encoder = random_encoder(SHAPE, 21, 0.125, 16).eval()
    model = LinearProbe(encoder, 5, 21).eval()
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(21))
    upper, lower = x[:3], x[3:]
    result = gradcam.explain(model, encoder, upper, lower, "conv3", binary=False)
    assert result["hou_made"].all() and torch.isfinite(result["hou"]).all()
    acts, logits = _layer_and_logits(model, upper, lower, "conv3")            # (2n, C, s, h, w)
    predicted = logits.detach().argmax(1)
    assert torch.equal(predicted, result["target"])
    grads, = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), acts)
    a, g = acts.detach().double().numpy(), grads.double().numpy()
    n, slices = len(upper), acts.shape[2]
    for i in range(n):
        # K = 2 x s maps: every slice of the upper body, then every slice of the lower one
        reference = naive_hou(_k_maps(a, i, n), _k_maps(g, i, n)).reshape(2, slices, *acts.shape[3:])
        np.testing.assert_allclose(result["hou"][i].double().numpy(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["conv5", "conv3"])
def test_disc_classifier_is_read_as_one_volume_k_1_at_conv5_and_its_slices_at_conv3(layer):
    """The disc classifier reads one volume, the disc's: Hou's K maps of a sample are that volume at conv5 (K = 1,
    eq. 18's softmax over its channels alone) and each of its slices at conv3 (K = s); standard Grad-CAM is its one
    map on its own scale."""
    shape = SHAPE_OF[layer]
    torch.manual_seed(24)
    net = DiscClassifier(EncoderSpec(slices=shape[0], height=shape[1], width_px=shape[2], width=0.125,
                                     embedding_dim=16, dropout=0.0), 5).eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(24))
    result = gradcam.explain(net, net, x, layer=layer, binary=False)
    seen = []
    handle = gradcam.layer_module(net, layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = net(x)
    finally:
        handle.remove()
    acts = seen[0]                                                  # (n, C, [s,] h, w): one volume per sample
    predicted = logits.detach().argmax(1)
    grads, = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), acts)
    a, g = acts.detach().double().numpy(), grads.double().numpy()
    assert result["hou"].shape == (3, 1, *acts.shape[2:]) and np.prod(acts.shape[-2:]) > 1
    for i in range(3):
        k_maps = (a[i][None], g[i][None]) if a.ndim == 4 else (a[i].swapaxes(0, 1), g[i].swapaxes(0, 1))
        reference = naive_hou(*k_maps).reshape(result["hou"][i].shape)
        np.testing.assert_allclose(result["hou"][i].double().numpy(), reference, rtol=1e-4, atol=1e-5)
        cam = naive_grad_cam(a[i], g[i])
        np.testing.assert_allclose(result["cam"][i, 0].double().numpy(), cam / max(cam.max(), 1e-12), rtol=1e-4,
                                   atol=1e-5)


def test_hou_target_checks_its_input():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    y, made = gradcam.hou_target(logits, binary=False)
    assert y.tolist() == [2.0] and made.tolist() == [True]
    y, made = gradcam.hou_target(torch.tensor([[1.0, 3.0], [2.0, 0.5]]), binary=True)
    assert y.tolist() == [2.0, -1.5] and made.tolist() == [True, False]
    with pytest.raises(ValueError, match="2 logits"):
        gradcam.hou_target(logits, binary=True)
    with pytest.raises(ValueError, match="not finite"):
        gradcam.hou_target(torch.tensor([[float("-inf"), 1.0]]), binary=True)


# --- the stage's tables -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["herniation", "grade"])
def test_stage_scores_hou_maps_of_positive_predictions_only_in_a_binary_task(tmp_path, task):
    """A frozen probe job (a fitted linear head on a random encoder's features) explained by the stage: in the binary
    task only the positive predictions get a Hou map and a Hou score (``hou_map``; NaN otherwise) and the summary's
    Hou averages are over them; in the multi-class task every sample gets one. Standard Grad-CAM scores every sample
    with a label map either way."""
    rng = np.random.default_rng(22)
    n = 24
    bodies = rng.normal(size=(2 * n, *SHAPE)).astype(np.float16)
    np.save(tmp_path / "vertebrae.npy", bodies)
    encoder = random_encoder(SHAPE, 0, 0.125, 16).eval()
    with torch.no_grad():
        emb = encoder(torch.tensor(bodies, dtype=torch.float32)).numpy()
    features = np.concatenate([emb[:n], emb[n:]], axis=1)
    projection = features @ rng.normal(size=features.shape[1])
    if task == "herniation":
        classes, y = np.array([0, 1]), (projection > np.median(projection)).astype(int)
    else:
        classes, y = np.arange(1, 6), np.searchsorted(np.quantile(projection, [0.2, 0.4, 0.6, 0.8]), projection)
    head = fit_head(features, y, len(classes), 0.01, max_iter=200)
    with (tmp_path / "model.npz").open("wb") as handle:
        np.savez(handle, classes=classes, **head.to_arrays("linear"))
    scan_id, level = np.array([f"scan-{i:02d}" for i in range(n)]), np.array(["L4-L5"] * n)
    pd.DataFrame({"scan_id": scan_id, "level": level}).to_parquet(tmp_path / "predictions.parquet")
    (tmp_path / "metrics.json").write_text(json.dumps({"task": task}))
    masks = np.zeros((n, 2, *SHAPE), np.uint8)
    masks[:, 0, :, -6:] = 1
    masks[:, 1, :, :6] = 1
    has_mask = np.arange(n) % 6 != 0
    np.savez(tmp_path / "masks.npz", masks=masks, has_mask=has_mask, sample_scan_id=scan_id, sample_level=level,
             sample_label=classes[y], sample_upper=np.arange(n), sample_lower=np.arange(n, 2 * n))
    out = gradcam.Outputs(tmp_path / "scores.csv", tmp_path / "maps.npz", tmp_path / "summary.json")
    gradcam.run("random", gradcam.ProbeJob(tmp_path / "metrics.json", tmp_path / "predictions.parquet",
                                           tmp_path / "model.npz"),
                tmp_path / "masks.npz", tmp_path / "vertebrae.npy", out, "conv3", encoder, batch_size=5)
    scores = pd.read_csv(out.scores)
    summary = json.loads(out.summary.read_text())
    assert list(scores.columns) == gradcam.SCORE_COLUMNS
    mask_of = dict(zip(scan_id, has_mask))
    with_mask = scores.scan_id.map(mask_of).to_numpy(dtype=bool)
    if task == "herniation":
        positive = (scores.predicted == 1).to_numpy()
        assert 0 < positive[with_mask].sum() < with_mask.sum()     # both kinds among the scored samples
        assert (scores.hou_map.to_numpy() == positive).all()
        assert summary["hou_maps_for"].startswith("positive predictions")
    else:
        assert scores.hou_map.all()
    made = scores.hou_map.to_numpy(dtype=bool)
    assert scores.inside_disc_hou[~made].isna().all()               # no Hou map: no Hou score
    assert scores.inside_disc_hou[made & with_mask].between(0, 1).all()
    # standard Grad-CAM: every sample with a label map, whatever it predicts (NaN only for an all-zero map)
    standard = scores[with_mask].dropna(subset=["inside_disc"])
    assert summary["samples"] == len(standard) and summary["samples"] + summary["empty_maps"] == with_mask.sum()
    assert summary["inside_disc"] == pytest.approx(standard.inside_disc.mean())
    assert summary["disc_share_of_volume"] == pytest.approx(standard.disc_share_of_volume.mean())
    # Hou et al.: the samples with a label map and a Hou map, the uniform share over the same samples
    hou = scores[with_mask & made].dropna(subset=["inside_disc_hou"])
    assert summary["samples_hou"] == len(hou) > 0
    assert summary["samples_hou"] + summary["empty_maps_hou"] == (with_mask & made).sum()
    assert summary["without_hou_map"] == (~made).sum()
    assert summary["inside_disc_hou"] == pytest.approx(hou.inside_disc_hou.mean())
    assert summary["disc_share_of_volume_hou"] == pytest.approx(hou.disc_share_of_volume.mean())
    # the maps: NaN where there is no Hou map, each of the others' maps with a maximum of 1 (an all-zero one 0)
    hou_maps = np.load(out.maps)["hou"]                             # in the order of the scores' rows
    assert np.isnan(hou_maps[~made]).all() and np.isfinite(hou_maps[made]).all()
    peaks = hou_maps[made].reshape(made.sum(), 2 * SHAPE[0], -1).max(2)
    assert np.isin(np.round(peaks, 6), [0.0, 1.0]).all()
