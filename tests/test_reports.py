"""The report's parts: standard Grad-CAM against the paper's equations written as plain loops (Hou et al.'s variant:
tests/test_gradcam_hou.py), the explained models against the probes they explain (on the two bodies, and the disc
classifier on the disc volume), the attention score, the disc masks cut like the model's input, the figures and
tables from synthetic result tables, the t-SNE inputs and the configuration page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from test_probes import FAST, SHAPE, write_probe_data

from stages import disc_masks, figures, gradcam
from stages.core import levels
from stages.embeddings import bodies_of_test_part
from stages.evaluation.metrics import roc_curve
from stages.evaluation.probe_data import run_folder
from stages.features import embed_all
from stages.nets.disc_cnn import (
    DiscClassifier,
    pooled_features,
    save_classifier,
    save_head,
)
from stages.nets.disc_net import DiscNet, load_net, save_net
from stages.nets.encoders import random_encoder
from stages.nets.heads import Head, fit_head
from stages.nets.siamese import EncoderSpec, VggM3dEncoder
from stages.probe import JobFiles
from stages.probe import run as run_probe
from stages.report_config import render

# --- Grad-CAM against the definitions -----------------------------------------------------------------------------

def naive_grad_cam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Selvaraju et al. 2017, eqs. 1-2, one sample ``(C, *spatial)``, as loops."""
    channels = acts.shape[0]
    weights = [grads[c].sum() / grads[c].size for c in range(channels)]
    total = np.zeros(acts.shape[1:])
    for c in range(channels):
        total += weights[c] * acts[c]
    return np.maximum(total, 0)


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
def test_grad_cam_matches_its_definition(spatial):
    rng = np.random.default_rng(0)
    acts, grads = rng.normal(size=(3, 6, *spatial)), rng.normal(size=(3, 6, *spatial))
    ours = gradcam.grad_cam(torch.tensor(acts), torch.tensor(grads)).numpy()
    for i in range(3):
        np.testing.assert_allclose(ours[i], naive_grad_cam(acts[i], grads[i]), atol=1e-10)


def test_cam_shapes_are_checked_and_a_flat_map_is_zero():
    with pytest.raises(ValueError, match="activations and gradients"):
        gradcam.grad_cam(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    flat = gradcam.hou_cam(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4))
    assert torch.equal(flat, torch.zeros(2, 4, 4))


def test_inside_share_and_upsampling():
    maps = torch.zeros(2, 4, 8, 8)
    maps[0, :, :4] = 1.0                    # all mass in the top half
    maps[1] = 1.0                           # uniform
    mask = torch.zeros(2, 4, 8, 8)
    mask[:, :, :2] = 1.0                    # the top quarter
    share = gradcam.inside_share(maps, mask)
    assert share[0].item() == pytest.approx(0.5) and share[1].item() == pytest.approx(0.25)
    assert torch.isnan(gradcam.inside_share(torch.zeros(1, 3), torch.ones(1, 3)))[0]
    up2d = gradcam.upsample(torch.rand(3, 2, 2), (5, 16, 16))
    assert up2d.shape == (3, 5, 16, 16) and torch.equal(up2d[:, 0], up2d[:, 4])    # a 2D map: every slice alike
    assert gradcam.upsample(torch.rand(3, 5, 4, 4), (5, 16, 16)).shape == (3, 5, 16, 16)


# --- The explained models are the probes --------------------------------------------------------------------------

def _encoder(seed: int = 0) -> VggM3dEncoder:
    torch.manual_seed(seed)
    return VggM3dEncoder(EncoderSpec(slices=SHAPE[0], height=SHAPE[1], width_px=SHAPE[2], width=0.125,
                                     embedding_dim=16, dropout=0.0)).eval()


@pytest.mark.parametrize("hidden", [0, 8])
def test_frozen_probe_reproduces_the_fitted_heads_probabilities(hidden):
    rng = np.random.default_rng(2)
    encoder = _encoder()
    upper = torch.tensor(rng.normal(size=(12, *SHAPE)), dtype=torch.float32)
    lower = torch.tensor(rng.normal(size=(12, *SHAPE)), dtype=torch.float32)
    with torch.no_grad():
        x = torch.cat([encoder(upper), encoder(lower)], dim=1).numpy()
    y = np.array([0, 1, 3] * 4)                       # class 2 and 4 absent: their probability is 0
    head = fit_head(x, y, 5, 1.0, hidden=hidden, seed=0, max_iter=50)
    saved = head.to_arrays("linear")
    rebuilt = Head.from_arrays(saved, "linear")
    np.testing.assert_allclose(rebuilt.predict_proba(x), head.predict_proba(x))
    probe = gradcam.FrozenProbe(encoder, rebuilt, inputs=2)
    with torch.no_grad():
        proba = torch.softmax(probe(upper, lower).double(), dim=1).numpy()
    np.testing.assert_allclose(proba, head.predict_proba(x), atol=1e-4)
    with pytest.raises(KeyError, match="no head 'mlp'"):
        Head.from_arrays(saved, "mlp")


def test_saved_end_to_end_network_loads_with_the_same_outputs():
    torch.manual_seed(3)
    net = DiscNet(EncoderSpec(slices=SHAPE[0], height=SHAPE[1], width_px=SHAPE[2], width=0.125, embedding_dim=16),
                  5, 2).eval()
    x = torch.randn(4, *SHAPE)
    loaded = load_net({k: v for k, v in save_net(net).items()})
    with torch.no_grad():
        assert torch.allclose(loaded(x, x.flip(0)), net(x, x.flip(0)))


def test_explain_targets_the_predicted_class_and_matches_a_manual_gradient():
    encoder = _encoder(4)
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(6, *SHAPE)), dtype=torch.float32)
    head = fit_head(rng.normal(size=(20, 32)), np.arange(20) % 3, 3, 1.0, max_iter=30)
    probe = gradcam.FrozenProbe(encoder, head, inputs=2)
    result = gradcam.explain(probe, encoder, x[:3], x[3:], "conv5")
    assert torch.equal(result["target"], result["logits"].argmax(1))
    # the same map by hand: conv5 maps of the upper volume of sample 0, gradient of its predicted logit
    maps = encoder.feature_maps(torch.cat([x[:3], x[3:]])).detach().requires_grad_(True)
    emb = encoder.fc(encoder.conv5[-1](maps))
    logits = probe.layers[0].T @ (((torch.cat(emb.chunk(2), 1)[0] - probe.mean) / probe.scale) @ probe.basis) \
        + probe.layers[1]
    grad, = torch.autograd.grad(logits[result["target"][0]], maps)
    manual = naive_grad_cam(maps[[0, 3]].detach().numpy().reshape(2, *maps.shape[1:])[0],
                            grad[0].numpy())
    cam = result["cam"][0, 0].numpy()
    scale = max(manual.max(), naive_grad_cam(maps[3].detach().numpy(), grad[3].numpy()).max())
    np.testing.assert_allclose(cam, manual / scale, atol=1e-5)
    assert result["hou"].shape == (3, 2, *maps.shape[2:])
    deep = gradcam.explain(probe, encoder, x[:3], x[3:], "conv3")
    assert deep["cam"].dim() == 5 and deep["cam"].shape[2] == SHAPE[0]     # a map per slice


def test_pair_maps_explain_the_distance_of_the_embeddings(tmp_path):
    encoder = _encoder(5)
    bodies = np.random.default_rng(5).normal(size=(8, *SHAPE)).astype(np.float16)
    with torch.no_grad():
        emb = encoder(torch.tensor(bodies, dtype=torch.float32)).numpy()
    pairs = pd.DataFrame({"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "level": ["L1", "L2", "L3", "L4"],
                          "positive": [True, True, False, False]})
    pairs["distance"] = np.linalg.norm(emb[pairs.a] - emb[pairs.b], axis=1)
    picked = gradcam.explain_pairs(encoder, bodies, pairs, "conv5", tmp_path / "pairs.npz", per_kind=2)
    np.testing.assert_allclose(picked.recomputed_distance, picked.distance, rtol=1e-4)
    saved = np.load(tmp_path / "pairs.npz")
    assert saved["cam_up"].shape == (4, 2, *SHAPE) and saved["positive"].tolist() == [True, True, False, False]


def test_gradcam_stage_scores_a_frozen_probe_job(tmp_path):
    """A real probe job on features of a real (random) encoder, explained through the command line (the files the
    rule declares); masks on the rows where the synthetic discs are (the top and bottom rows of each body's crop)."""
    root = write_probe_data(tmp_path, n_subjects=24)
    encoder = random_encoder(SHAPE, 0, 0.125, 16)
    vertebrae = root / "extract" / "vertebrae.npy"
    features = root / "features" / "random" / "features.npy"
    features.parent.mkdir(parents=True)
    embed_all(encoder, np.load(vertebrae, mmap_mode="r"), features)
    job = JobFiles.in_folder(root / "runs" / run_folder("random", "grade", 1.0, 0))
    run_probe("random", "grade", 1.0, 0, root / "splits" / "subjects.parquet", root / "splits" / "volumes.parquet",
              job, FAST, features=features)
    predictions = pd.read_parquet(job.predictions)
    linear = predictions[predictions["head"] == "linear"].reset_index(drop=True)
    masks = np.zeros((len(linear), 2, *SHAPE), np.uint8)
    masks[:, 0, :, -6:] = 1                 # the disc below the upper body, above the lower one
    masks[:, 1, :, :6] = 1
    has_mask = np.arange(len(linear)) % 5 != 0          # a few scans without a label map
    volumes = pd.read_parquet(root / "splits" / "volumes.parquet")
    row = {(s, lv): r for s, lv, r in volumes[volumes.kind == "vertebra"][["scan_id", "level", "row"]].itertuples(
        index=False)}
    np.savez(tmp_path / "masks.npz", masks=masks, has_mask=has_mask,
             sample_scan_id=linear.scan_id.to_numpy().astype(str), sample_level=linear.level.to_numpy().astype(str),
             sample_label=linear.label.to_numpy(),
             sample_upper=np.array([row[(s, lv.split("-")[0])] for s, lv in zip(linear.scan_id, linear.level)]),
             sample_lower=np.array([row[(s, lv.split("-")[1])] for s, lv in zip(linear.scan_id, linear.level)]))
    out = {"scores": tmp_path / "out" / "s.csv", "maps": tmp_path / "maps" / "m.npz", "summary": tmp_path / "x.json"}
    assert gradcam.main(["probe", "--model", "random", "--metrics", str(job.metrics), "--predictions",
                         str(job.predictions), "--model-file", str(job.model), "--masks", str(tmp_path / "masks.npz"),
                         "--vertebrae", str(vertebrae), "--random", "--seed", "0", "--width", "0.125",
                         "--embedding-dim", "16", "--gradcam-layer", "conv3", "--threads", "1",
                         *[f"--{k}={v}" for k, v in out.items()]]) == 0
    summary = json.loads(out["summary"].read_text())
    scores = pd.read_csv(out["scores"])
    assert len(scores) == len(linear) and summary["samples"] == int(has_mask.sum())
    # the explained model predicts what the probe job predicted
    merged = scores.merge(linear, on=["scan_id", "level"], suffixes=("", "_job"))
    assert (merged.predicted == merged.predicted_job).all()
    unscored = scores.disc_share_of_volume.isna()          # the samples without a label map
    assert unscored.sum() == (~has_mask).sum() and scores.inside_disc[unscored].isna().all()
    assert scores.hou_map.all()                            # the grade, a multi-class task: every sample a Hou map
    scored = scores.dropna(subset=["inside_disc"])         # an all-zero map has no attention
    assert len(scored) + summary["empty_maps"] == has_mask.sum() and scored.inside_disc.between(0, 1).all()
    assert summary["inside_disc"] == pytest.approx(scored.inside_disc.mean())
    assert summary["map_size"] == [SHAPE[0], 3, 3] and summary["task"] == "grade"     # conv3 of 48 px crops
    assert summary["model"] == "random" and summary["layer"] == "conv3"
    assert scored.disc_share_of_volume.to_numpy() == pytest.approx(6 / 48)   # 6 of 48 rows in each volume
    maps = np.load(out["maps"])
    assert maps["cam_up"].shape[1:] == (2, *SHAPE) and maps["has_mask"].all()   # examples with a mask come first
    with pytest.raises(ValueError, match="give its encoder"):
        gradcam.load_model(job.model, None)


# --- Grad-CAM of the disc classifier on the disc volume (probes.disc_input: disc) --------------------------------

DISC_SHAPE = (5, 64, 64)    # slices, rows, columns of a disc volume: conv5 is 2 x 2 before its pooling, conv3 4 x 4


def _disc_classifier(n_classes: int, seed: int) -> DiscClassifier:
    torch.manual_seed(seed)
    spec = EncoderSpec(slices=DISC_SHAPE[0], height=DISC_SHAPE[1], width_px=DISC_SHAPE[2], width=0.125,
                       embedding_dim=16, dropout=0.0)
    return DiscClassifier(spec, n_classes, dropout=0.5).eval()


def _disc_probe_job(folder: Path, kind: str, task: str, n: int = 15, seed: int = 30) -> dict[str, Any]:
    """A probe job on the disc volume, its files as stages/probe.py, stages/disc_features.py and stages/disc_masks.py
    write them: ``kind`` "transfer" (model.npz: FC6-FC8 of a disc classifier whose Conv1-Conv5 are in
    disc_trunk.npz), "linear" (a logistic regression on the pooled Conv5 maps of that trunk, no transfer head) or
    "network" (the whole classifier trained end to end, "cnn"); predictions the classifier's own; discs.npy with the
    test discs at scattered rows; masks (n, 1, S, H, W) of the disc volume: the middle quarter of its rows."""
    classes = np.array([0, 1]) if task == "herniation" else np.arange(1, 6)
    net = _disc_classifier(len(classes), seed)
    rng = np.random.default_rng(seed)
    discs = rng.normal(0.5, 0.3, size=(n + 5, *DISC_SHAPE)).astype(np.float16)
    rows = rng.permutation(n + 5)[:n]                   # the test discs' rows of discs.npy, not in order
    np.save(folder / "discs.npy", discs)
    x = torch.tensor(discs[rows], dtype=torch.float32)
    label = classes[rng.integers(0, len(classes), n)]
    trunk = {k: v for k, v in save_classifier(net, "trunk").items() if not k.startswith("trunk/head.")}
    np.savez(folder / "disc_trunk.npz", **trunk)
    if kind == "linear":
        with torch.no_grad():
            pooled = pooled_features(net.feature_maps(x)).numpy()
        head = fit_head(pooled, np.arange(n) % len(classes), len(classes), 1.0, max_iter=100)
        arrays, proba = head.to_arrays("linear"), head.predict_proba(pooled)
    else:
        with torch.no_grad():
            if task == "herniation":                    # about half of the discs predicted positive
                logits = net(x)
                net.head.layers[-1].bias[1] -= (logits[:, 1] - logits[:, 0]).sort().values[n // 2 - 1:n // 2 + 1].mean()
            proba = torch.softmax(net(x), 1).numpy()
        arrays = save_head(net, "transfer") if kind == "transfer" else save_classifier(net, "cnn")
    with (folder / "model.npz").open("wb") as handle:
        np.savez(handle, classes=classes, **arrays)
    scan_id, level = np.array([f"scan-{i:02d}" for i in range(n)]), np.array(["L4-L5"] * n)
    predicted = classes[proba.argmax(1)]
    predictions = pd.DataFrame({"head": "network" if kind == "network" else kind, "subject_id": scan_id,
                                "scan_id": scan_id, "level": level, "label": label, "predicted": predicted,
                                **{f"p_{c}": proba[:, k] for k, c in enumerate(classes)}})
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    (folder / "metrics.json").write_text(json.dumps({"task": task}))
    has_mask = np.arange(n) % 5 != 0                    # a few scans without a label map
    masks = np.zeros((n, 1, *DISC_SHAPE), np.uint8)
    masks[has_mask, 0, :, 24:40] = 1                    # 16 of the disc volume's 64 rows
    np.savez(folder / "masks.npz", masks=masks, has_mask=has_mask, disc_input=np.array("disc"),
             sample_scan_id=scan_id, sample_level=level, sample_label=label, sample_row=rows)
    return {"net": net, "discs": discs, "rows": rows, "has_mask": has_mask, "predicted": predicted,
            "scan_id": scan_id, "classes": classes}


def test_pooled_disc_probe_reproduces_the_linear_heads_probabilities():
    net = _disc_classifier(3, 31)
    x = torch.randn(12, *DISC_SHAPE, generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        pooled = pooled_features(net.feature_maps(x)).numpy()
    head = fit_head(pooled, np.arange(12) % 3, 3, 1.0, max_iter=100)
    probe = gradcam.PooledDiscProbe(net, head)
    with torch.no_grad():
        proba = torch.softmax(probe(x), 1).numpy()
    np.testing.assert_allclose(proba, head.predict_proba(pooled), atol=1e-5)


@pytest.mark.parametrize("kind, task, layer", [("transfer", "herniation", "conv5"), ("network", "grade", "conv3"),
                                               ("linear", "grade", "conv5")])
def test_gradcam_stage_explains_the_disc_classifier_on_the_disc_volume(tmp_path, monkeypatch, kind, task, layer):
    """A probe job on the disc volume explained through the command line (the files the rule declares): the model is
    the job's own classifier (it predicts what the job predicted), its maps are Grad-CAM of that classifier on the disc
    volume at the row the masks name (K = 1 input volume), the attention inside the disc is a share in [0, 1] beside
    the disc's share of its own volume (uniform attention: 16 of 64 rows), and the figure and table are drawn from
    what it writes."""
    job = _disc_probe_job(tmp_path, kind, task)
    out = {"scores": tmp_path / "scores.csv", "maps": tmp_path / "maps.npz", "summary": tmp_path / "summary.json"}
    trunk = [] if kind == "network" else ["--disc-trunk", str(tmp_path / "disc_trunk.npz")]
    assert gradcam.main(["probe", "--model", "scratch" if kind == "network" else "siamese", "--metrics",
                         str(tmp_path / "metrics.json"), "--predictions", str(tmp_path / "predictions.parquet"),
                         "--model-file", str(tmp_path / "model.npz"), "--masks", str(tmp_path / "masks.npz"),
                         "--discs", str(tmp_path / "discs.npy"), *trunk, "--gradcam-layer", layer, "--threads", "1",
                         *[f"--{k}={v}" for k, v in out.items()]]) == 0
    scores, summary, maps = pd.read_csv(out["scores"]), json.loads(out["summary"].read_text()), np.load(out["maps"])
    assert list(scores.columns) == gradcam.SCORE_COLUMNS and len(scores) == len(job["rows"])
    assert summary["head"] == kind and summary["input"] == "disc volume" and summary["layer"] == layer
    # the explained model is the job's classifier on the disc volume: it predicts what the job predicted
    index = {s: i for i, s in enumerate(job["scan_id"])}
    at = scores.scan_id.map(index).to_numpy()
    assert (scores.predicted.to_numpy() == job["predicted"][at]).all()
    # uniform attention: the disc's share of its own volume; no label map, no score
    with_mask = job["has_mask"][at]
    assert scores.disc_share_of_volume[with_mask].to_numpy() == pytest.approx(16 / 64)
    assert scores.disc_share_of_volume[~with_mask].isna().all() and scores.inside_disc[~with_mask].isna().all()
    scored = scores[with_mask].dropna(subset=["inside_disc"])
    assert len(scored) == summary["samples"] > 0 and scored.inside_disc.between(0, 1).all()
    assert summary["inside_disc"] == pytest.approx(scored.inside_disc.mean())
    assert summary["disc_share_of_volume"] == pytest.approx(16 / 64)
    made = scores.hou_map.to_numpy(dtype=bool)
    if task == "herniation":                            # Hou's maps: positive predictions only
        assert (made == (scores.predicted == 1).to_numpy()).all() and 0 < made[with_mask].sum() < with_mask.sum()
    else:
        assert made.all()
    hou = scores[with_mask & made].dropna(subset=["inside_disc_hou"])
    assert summary["samples_hou"] == len(hou) > 0 and hou.inside_disc_hou.between(0, 1).all()
    assert summary["disc_share_of_volume_hou"] == pytest.approx(16 / 64)
    assert scores.inside_disc_hou[~made].isna().all()
    # the maps: one input volume, the disc's own, as discs.npy holds it at the row of each example
    size = [2, 2] if layer == "conv5" else [DISC_SHAPE[0], 4, 4]
    assert summary["map_size"] == size and maps["cam"].shape == (len(scores), 1, *size)
    assert maps["cam_up"].shape[1:] == (1, *DISC_SHAPE) and maps["parts"].tolist() == ["disc volume"]
    shown = len(maps["inputs"])
    assert shown == 6 and maps["has_mask"].all()        # examples with a mask come first
    np.testing.assert_array_equal(maps["inputs"][:, 0], job["discs"][maps["row"]])
    np.testing.assert_array_equal(maps["hou_map"], made[:shown])
    if layer == "conv5" and kind != "linear":           # Grad-CAM by hand: the classifier's Conv5, its own head
        net, i = job["net"], 0
        x = torch.tensor(job["discs"][maps["row"][i:i + 1]], dtype=torch.float32)
        fm = net.feature_maps(x).detach().requires_grad_(True)
        logits = net.head(net.encoder.pool(fm))
        grad, = torch.autograd.grad(logits[0, logits[0].argmax()], fm)
        manual = naive_grad_cam(fm[0].detach().numpy(), grad[0].numpy())
        np.testing.assert_allclose(maps["cam"][i, 0], manual / max(manual.max(), 1e-12), atol=1e-5)
    # the figure (one input volume per model; a negative prediction's row says it has no Hou map) and the table
    texts = []
    save = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, files: texts.extend(
        [ax.get_ylabel() for ax in fig.axes] + [fig._suptitle.get_text()]) or save(fig, files))
    example = int(np.flatnonzero(~maps["hou_map"])[0]) if not maps["hou_map"].all() else 0
    written = figures.gradcam_figure({"siamese": dict(maps)}, None, _figure(tmp_path, "hou"), "hou", example)
    assert all(_is_image(p) for p in written if p.suffix == ".png")
    assert ("negative prediction:\nno Hou map" in "\n".join(texts)) == (task == "herniation")
    assert "softmax over every map and channel" in texts[-1] and "min" not in texts[-1]
    figures.attention_table([summary], _table(tmp_path, "attention"))
    table = pd.read_csv(tmp_path / "attention.csv")
    assert table.loc[0, "test discs scored, Hou et al."] == summary["samples_hou"]
    assert table.loc[0, "uniform attention, Hou et al.'s discs"] == pytest.approx(16 / 64)
    assert table.loc[0, "input"] == "disc volume"
    page = (tmp_path / "attention.html").read_text()
    assert ("positive predictions only" in page) == (task == "herniation")


def test_gradcam_stage_refuses_mismatched_disc_inputs_and_explains_nothing_of_a_one_class_job(tmp_path):
    """Refused: a transfer head without its trunk, masks cut for the bodies; a one-class job: nothing to explain."""
    _disc_probe_job(tmp_path, "transfer", "grade", n=6)
    with pytest.raises(ValueError, match="--disc-trunk"):
        gradcam.load_model(tmp_path / "model.npz", None, "transfer")
    store = dict(np.load(tmp_path / "masks.npz"))
    np.savez(tmp_path / "bodies.npz", masks=np.repeat(store["masks"], 2, axis=1), has_mask=store["has_mask"],
             **{k: store[k] for k in ("sample_scan_id", "sample_level", "sample_label")},
             sample_upper=store["sample_row"], sample_lower=store["sample_row"])
    job = gradcam.ProbeJob(tmp_path / "metrics.json", tmp_path / "predictions.parquet", tmp_path / "model.npz")
    out = gradcam.Outputs(tmp_path / "s.csv", tmp_path / "m.npz", tmp_path / "j.json")
    with pytest.raises(ValueError, match="cut for the bodies input"):
        gradcam.run("siamese", job, tmp_path / "bodies.npz", tmp_path / "discs.npy", out, "conv5", None,
                    trunk=tmp_path / "disc_trunk.npz", disc_input="disc")
    # a job whose training labels had one class fitted nothing: no model, no score, empty maps of one input volume
    with (tmp_path / "model.npz").open("wb") as handle:
        np.savez(handle, classes=np.arange(1, 6))
    summary = gradcam.run("siamese", job, tmp_path / "masks.npz", tmp_path / "discs.npy", out, "conv5", None,
                          trunk=tmp_path / "disc_trunk.npz")
    assert summary["samples"] == 0 and summary["head"] == "transfer" and "one class" in summary["note"]
    assert np.load(out.maps)["cam_up"].shape == (0, 1, 1, 1, 1) and pd.read_csv(out.scores).empty


# --- The disc masks: the disc's label map cut like the model's input -----------------------------------------------

def test_disc_masks_cut_the_disc_with_the_crop_of_the_input_the_model_reads(tmp_path):
    """A label map (1 mm voxels, sagittal slices) with the disc L4-L5 a slab of rows 44-51 and columns 16-47 between
    the bodies L4 (centre row 31) and L5 (row 65). Cut with the disc's own crop (24 x 32 pixels of 2 mm: the disc's
    32 mm span half the width), the mask is the volume's middle rows 10-13 and columns 8-23 on every slice; cut with
    the bodies' crops, the lower rows of the upper body's volume (18-21) and the upper rows of the lower one's (1-4).
    A scan without a label map gets an empty mask, and the training part's discs none at all."""
    label = np.zeros((9, 96, 64), np.uint8)
    label[:, 44:52, 16:48] = levels.DISC_LABELS["L4-L5"]
    label[:, 20:42, 16:48] = levels.VERTEBRA_LABELS["L4"]
    label[:, 54:76, 16:48] = levels.VERTEBRA_LABELS["L5"]
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "labels" / "scan-0.nii.gz"))
    scans = ["scan-0", "scan-1", "scan-2"]
    pd.DataFrame({"scan_id": scans, "label_map": ["labels/scan-0.nii.gz", None, "labels/scan-0.nii.gz"]}).to_parquet(
        tmp_path / "manifest.parquet")
    geometry = {"x": 32.0, "z": 4.0, "k": 4.0, "depth_mm": 32.0, "axis_x": 0.0, "axis_y": 1.0, "axis_z": 0.0,
                "ap_x": -1.0, "ap_y": 0.0, "ap_z": 0.0}
    pd.DataFrame([{"scan_id": s, "kind": kind, "level": lv, "y": y, **geometry} for s in scans
                  for kind, lv, y in (("vertebra", "L4", 31.0), ("disc", "L4-L5", 48.0), ("vertebra", "L5", 65.0))]
                 ).to_parquet(tmp_path / "structures.parquet")
    volumes = pd.DataFrame([{"subject_id": f"s{i}", "scan_id": s, "kind": kind, "level": lv, "row": row,
                             "downstream_part": "train" if s == "scan-2" else "test",
                             "pfirrmann": 3.0 if kind == "disc" else np.nan}
                            for i, s in enumerate(scans)
                            for kind, lv, row in (("vertebra", "L4", 10 * i), ("disc", "L4-L5", 10 * i + 3),
                                                  ("vertebra", "L5", 10 * i + 1))])
    volumes.to_parquet(tmp_path / "volumes.parquet")
    files = ["--manifest", str(tmp_path / "manifest.parquet"), "--structures", str(tmp_path / "structures.parquet"),
             "--volumes", str(tmp_path / "volumes.parquet"), "--width-fraction", "0.5"]
    assert disc_masks.main([*files, "--disc-size", "24", "32", "5", "--out", str(tmp_path / "disc.npz")]) == 0
    store = np.load(tmp_path / "disc.npz")
    assert str(store["disc_input"]) == "disc" and store["masks"].shape == (2, 1, 5, 24, 32)
    assert store["sample_scan_id"].tolist() == ["scan-0", "scan-1"] and store["sample_row"].tolist() == [3, 13]
    assert store["has_mask"].tolist() == [True, False] and "sample_upper" not in store
    expected = np.zeros((5, 24, 32), np.uint8)
    expected[:, 10:14, 8:24] = 1
    np.testing.assert_array_equal(store["masks"][0, 0], expected)
    assert not store["masks"][1].any()
    assert disc_masks.main([*files, "--disc-input", "bodies", "--vertebra-size", "24", "32", "5", "--out",
                            str(tmp_path / "bodies.npz")]) == 0
    store = np.load(tmp_path / "bodies.npz")
    assert store["masks"].shape == (2, 2, 5, 24, 32) and store["sample_upper"].tolist() == [0, 10]
    assert store["sample_lower"].tolist() == [1, 11] and "sample_row" not in store
    upper, lower = np.zeros((5, 24, 32), np.uint8), np.zeros((5, 24, 32), np.uint8)
    upper[:, 18:22, 8:24] = 1
    lower[:, 1:5, 8:24] = 1
    np.testing.assert_array_equal(store["masks"][0, 0], upper)
    np.testing.assert_array_equal(store["masks"][0, 1], lower)
    with pytest.raises(SystemExit):                     # the disc input needs the disc's crop size
        disc_masks.main([*files, "--vertebra-size", "24", "32", "5", "--out", str(tmp_path / "x.npz")])


# --- Figures and tables -------------------------------------------------------------------------------------------

def test_roc_curve_matches_scikit_learn():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.normal(size=200) + y, 1)        # ties
    fpr, tpr = roc_curve(y, score)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, score))
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.ones(3), np.arange(3))


def synthetic_results(seeds: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """results, summary and predictions tables shaped like the probes stage's."""
    rng = np.random.default_rng(7)
    results, summary, predictions = [], [], []
    for model, heads in (("siamese", ["linear", "mlp"]), ("random", ["linear"]), ("scratch", ["linear"])):
        for head in heads:
            for fraction, n in ((0.5, 10), (1.0, 20)):
                for task, metrics in (("grade", ("average_class_accuracy", "accuracy")),
                                      ("herniation", ("auc", "accuracy", "sensitivity", "specificity"))):
                    for seed in range(seeds):
                        results.append({"model": model, "head": head, "task": task, "fraction": fraction,
                                        "seed": seed, "n_subjects": n, "n_scans": 1.5 * n, "n_train": 6 * n,
                                        **{m: rng.uniform(0.5, 0.9) for m in metrics}})
                        truth = rng.integers(1, 6, 30) if task == "grade" else rng.integers(0, 2, 30)
                        p1 = np.clip(0.3 * truth + rng.uniform(0, 0.7, 30), 0, 1) if task == "herniation" else None
                        predictions.append(pd.DataFrame({
                            "model": model, "head": head, "task": task, "fraction": fraction, "seed": seed,
                            "subject_id": [f"s{i % 6}" for i in range(30)], "scan_id": [f"c{i % 9}" for i in range(30)],
                            "level": "L4-L5", "label": truth,
                            "predicted": truth if task == "grade" else (p1 >= 0.5).astype(int),
                            **({"p_0": 1 - p1, "p_1": p1} if p1 is not None else {})}))
                    for metric in metrics:
                        v = pd.DataFrame(results).query("model == @model and head == @head and task == @task and "
                                                        "fraction == @fraction")[metric]
                        summary.append({"model": model, "head": head, "task": task, "fraction": fraction,
                                        "n_subjects": n, "n_scans": 1.5 * n, "n_train": 6.0 * n, "metric": metric,
                                        "mean": v.mean(), "std": v.std(), "ci_low": v.min(), "ci_high": v.max(),
                                        "seeds": seeds})
    return pd.DataFrame(results), pd.DataFrame(summary), pd.concat(predictions, ignore_index=True)


def _figure(folder: Path, name: str) -> figures.FigureFiles:
    return figures.FigureFiles(folder / f"{name}.png", folder / f"{name}.pdf")


def _table(folder: Path, name: str) -> figures.TableFiles:
    return figures.TableFiles(folder / f"{name}.html", folder / f"{name}.csv")


def _is_image(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_every_result_figure_is_written_as_png_and_pdf(tmp_path):
    results, summary, predictions = synthetic_results()
    written = []
    written += figures.label_efficiency_figure(summary, _figure(tmp_path, "eff"), ["scratch"])
    written += figures.label_curves_figure(summary, _figure(tmp_path, "curves"), ["scratch"])
    written += figures.roc_figure(predictions, _figure(tmp_path, "roc"), ["scratch"])
    written += figures.confusion_figure(predictions, _figure(tmp_path, "confusion"), ["scratch"])
    distances = pd.DataFrame({"positive": [True] * 20 + [False] * 40,
                              "distance": np.r_[np.linspace(0, 1, 20), np.linspace(0.5, 2, 40)],
                              "untrained_distance": np.linspace(0, 1, 60)})
    written += figures.pretext_figure({"siamese": distances}, _figure(tmp_path, "pretext"))
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95],
                            "kept": [False, True, False]})
    metrics = pd.DataFrame({"epoch": [1, 1, 2, 2], "split": ["train", "val"] * 2, "loss": [1.0, 1.1, 0.8, 0.9],
                            "level_accuracy": [0.3, 0.3, 0.6, 0.5]})
    written += figures.training_figure({"siamese": metrics}, history, {"scratch": history},
                                       _figure(tmp_path, "training"))
    for path in written:
        assert path.exists() and path.stat().st_size > 1000, path
    assert all(_is_image(p) for p in written if p.suffix == ".png")
    assert sorted(p.suffix for p in written) == [".pdf"] * 6 + [".png"] * 6


def test_cao_table_gives_mean_and_std_over_seeds(tmp_path):
    results, _, _ = synthetic_results()
    figures.metrics_table(results, _table(tmp_path, "table"), ["scratch"])
    table = pd.read_csv(tmp_path / "table.csv")
    full = results[(results.task == "herniation") & (results.fraction == 1.0) & (results.model == "random")]
    row = table[table.method == "random (linear probe)"].iloc[0]
    assert row["ACC (%)"] == f"{100 * full.accuracy.mean():.1f} \u00b1 {100 * full.accuracy.std():.1f}"
    assert set(table.method) == {"siamese (linear probe)", "siamese (mlp probe)", "random (linear probe)",
                                 "scratch (end to end)"}
    page = (tmp_path / "table.html").read_text()
    assert "<table" in page and "AUC (%)" in page


def test_mlsscl_ablation_table_gives_each_loss_its_pretext_top1_and_disc_tasks(tmp_path):
    results, _, _ = synthetic_results()
    siamese = results[results.model == "siamese"]
    results = pd.concat([results, siamese.assign(model="mlsscl"), siamese.assign(model="mlsscl_long_short")])
    evaluations = {m: {"trained": {"multiview_top1": 0.25, "long_short_top1": t},
                       "untrained": {"multiview_top1": 0.1, "long_short_top1": 0.1}}
                   for m, t in (("mlsscl", 0.5), ("mlsscl_long_short", 0.75))}
    figures.ablation_table(results, evaluations, _table(tmp_path, "ablation"))
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert table["loss"].unique().tolist() == ["both (L = alpha L_multiview + beta L_long-short)", "long-short only"]
    assert table["pretext short-long top-1, trained (untrained)"].unique().tolist() == ["0.500 (0.100)", "0.750 (0.100)"]
    full = siamese[(siamese.task == "herniation") & (siamese.fraction == 1.0) & (siamese["head"] == "linear")]
    row = table[(table.method == "mlsscl") & (table["head"] == "linear")].iloc[0]
    assert row["herniation: ROC AUC"] == f"{full.auc.mean():.3f} \u00b1 {full.auc.std():.3f}"
    figures.ablation_table(results, {}, _table(tmp_path, "none"))
    assert "no mlsscl method" in pd.read_csv(tmp_path / "none.csv").note[0]


def test_a_retrieval_method_s_pretext_panels_show_its_two_tasks_against_chance(tmp_path):
    table = pd.DataFrame({"scan_id": [f"scan-{i}" for i in range(8)], "level": "T12-S1",
                          "trained_view1_top1": [1.0, 0, 1, 1, 0, 1, 1, 1], "trained_view2_top1": [1.0] * 8,
                          "untrained_view1_top1": [0.0] * 7 + [1.0], "untrained_view2_top1": [0.0] * 8})
    evaluation = {"chance_top1": 1 / 8, "views": {"view1": "axial query, sagittal keys",
                                                  "view2": "short axial query, long axial keys"}}
    written = figures.pretext_figure({"mlsscl": table}, _figure(tmp_path, "pretext"), {"mlsscl": evaluation})
    assert all(p.exists() and p.stat().st_size > 1000 for p in written)
    fig, ax = figures.plt.subplots()
    figures._view_panel(ax, "mlsscl", table, evaluation["views"], evaluation["chance_top1"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["axial query,\nsagittal keys",
                                                           "short axial query,\nlong axial keys"]
    trained, untrained = (c.lines[0].get_ydata() for c in ax.containers)
    assert np.allclose(trained, [0.75, 1.0]) and np.allclose(untrained, [0.125, 0.0])
    assert any(np.allclose(line.get_ydata(), 1 / 8) for line in ax.lines)      # the chance line
    figures.plt.close(fig)


def test_figure_of_merit_table_says_not_reached(tmp_path):
    efficiency = pd.DataFrame([{"task": "grade", "metric": "average_class_accuracy", "model": "siamese",
                                "head": "linear", "reference_value": 0.7, "reference_scans": 30.0,
                                "matched_at_fraction": 0.5, "matched_scans": 15.0, "scan_share": 0.5,
                                "value_there": 0.72},
                               {"task": "grade", "metric": "average_class_accuracy", "model": "random",
                                "head": "linear", "reference_value": 0.7, "reference_scans": 30.0,
                                "matched_at_fraction": None, "matched_scans": None, "scan_share": None,
                                "value_there": None}])
    figures.figure_of_merit_table(efficiency, _table(tmp_path, "merit"))
    table = pd.read_csv(tmp_path / "merit.csv", keep_default_na=False)
    assert table["first subset matching it"].tolist() == ["0.5", "not reached"]
    assert table["share of scans"].tolist() == ["50%", ""]


def test_embeddings_map_the_test_parts_bodies_with_the_grade_of_the_disc_below(tmp_path):
    root = write_probe_data(tmp_path, n_subjects=24)
    volumes = pd.read_parquet(root / "splits" / "volumes.parquet")
    scans = volumes.scan_id.unique()
    manifest = pd.DataFrame({"scan_id": scans, "field_strength_t": 1.494, "manufacturer": "SIEMENS",
                             "age_years": np.arange(len(scans)) % 50 + 30,
                             "sex": [("F", "")[i % 2] for i in range(len(scans))]})
    table = bodies_of_test_part(volumes, manifest)
    assert (table.field_strength_t == 1.5).all() and (table.vendor == "SIEMENS").all()
    first = table.scan_id.map(dict(zip(scans, range(len(scans)))))
    assert (table.age_years == first % 50 + 30).all()
    assert table.sex[first % 2 == 1].isna().all() and (table.sex[first % 2 == 0] == "F").all()   # empty: unknown
    days = table.scan_id.map(volumes.drop_duplicates("scan_id").set_index("scan_id").days_since_first_study)
    assert np.allclose(table.years_since_baseline * 365.25, days) and (days > 0).any()
    held_out = (volumes.downstream_part == "test") | (volumes.ssl_part == "test")
    assert set(table.subject_id) == set(volumes[held_out].subject_id)
    assert not set(table.subject_id) & set(volumes[volumes.downstream_part == "train"].subject_id
                                          ) - set(volumes[volumes.ssl_part == "test"].subject_id)
    assert set(table.part) <= {"downstream test", "self-supervision test"}
    assert set(table.level) == set(levels.VERTEBRAE)
    one = table[table.level == "L4"].iloc[0]
    disc = volumes[(volumes.scan_id == one.scan_id) & (volumes.level == "L4-L5")].iloc[0]
    assert one.grade == disc.pfirrmann
    assert table[table.level == "S1"].grade.isna().all()          # no disc below S1 in the table
    coords = table.assign(x=np.arange(len(table)), y=np.arange(len(table)) % 7).rename(
        columns={"subject_id": "subject"})
    paths = figures.embeddings_figure({"siamese": coords, "random": coords}, _figure(tmp_path, "emb"))
    assert all(p.exists() for p in paths)


def test_configuration_page_round_trips_and_names_the_keys_left_out():
    config = {"pretrain": {"methods": ["siamese"], "seed": 0}, "results": "results", "note": "<b>"}
    text, page = render(config)
    assert yaml.safe_load(text) == config
    assert "&lt;b&gt;" in page and "<h4>pretrain</h4>" in page
    assert "pretrain.threads" in page.split("Not listed")[1] and "reports." not in page   # only its sections' keys


def test_figures_cli_rejects_mismatched_names(tmp_path):
    distances = tmp_path / "d.parquet"
    pd.DataFrame({"positive": [True, False], "distance": [0.1, 1.0]}).to_parquet(distances)
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["pretext", "--distances", str(distances), "--methods", "a", "b", "--png", str(tmp_path / "x.png"),
                      "--pdf", str(tmp_path / "x.pdf")])
    assert exit_info.value.code == 2


def test_figures_cli_writes_exactly_the_files_it_is_given(tmp_path):
    efficiency = tmp_path / "in" / "label_efficiency.csv"
    efficiency.parent.mkdir()
    pd.DataFrame(columns=["task", "metric", "model", "head"]).to_csv(efficiency, index=False)
    html, csv = tmp_path / "a" / "merit.page", tmp_path / "b" / "merit.table"
    assert figures.main(["figure-of-merit", "--efficiency", str(efficiency), "--html", str(html), "--csv",
                         str(csv)]) == 0
    assert "<table" in html.read_text() and pd.read_csv(csv).columns.tolist() == ["note"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/merit.page", "b/merit.table", "in/label_efficiency.csv"]
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, a=np.zeros(0, np.int64))
    np.save(tmp_path / "vertebrae.npy", np.zeros((2, *SHAPE), np.float16))
    png, pdf = tmp_path / "f" / "pairs.png", tmp_path / "g" / "pairs.pdf"
    figures.main(["pairs", "--pairs", str(pairs), "--vertebrae", str(tmp_path / "vertebrae.npy"), "--png", str(png),
                  "--pdf", str(pdf)])
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"


def test_end_to_end_histories_are_named_by_their_probe_job(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [1.1, 0.9], "kept": [False, True]})
    paths = []
    for model, table in (("scratch", history), ("siamese-finetune", history), ("other", history.iloc[:0])):
        path = tmp_path / "runs" / run_folder(model, "grade", 1.0, 0) / "history.csv"
        path.parent.mkdir(parents=True)
        table.to_csv(path, index=False)
        paths.append(path)
    named = figures.histories(paths)
    assert list(named) == ["scratch", "siamese-finetune"]       # a job that trained nothing has no curve
    pd.testing.assert_frame_equal(named["scratch"], history)
