"""The report of the simclr method (Hou et al. 2023): Grad-CAM of its linear probe through the concatenated features of
a disc's 3 axial slices (stages/gradcam.py ``AxialProbe``; standard Grad-CAM per slice and Hou et al.'s eqs. 16-20
over the K = 3 slices, against loops written from the equations), the test discs' masks on those slices
(stages/axial_masks.py, their rows of the axial_slices stage's masks), and the figures that show a view method
(pretext top-1, training curves, the axial row of the Grad-CAM figure)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_gradcam_hou import naive_grad_cam, naive_hou

from stages import axial_masks, figures, gradcam
from stages.core import levels
from stages.nets.heads import Head, fit_head
from stages.nets.simclr import SimclrEncoder, SimclrSpec, disc_features

SIZE = 64              # 64-pixel slices: layer4 of the ResNet is 2 x 2, layer3 4 x 4 (maps with several positions)


def _encoder(seed: int = 0, size: int = SIZE) -> SimclrEncoder:
    torch.manual_seed(seed)
    return SimclrEncoder(SimclrSpec(height=size, width_px=size, depth=10, widen_factor=0.125, fc_units=8)).eval()


def _slices(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fitted_head(encoder: SimclrEncoder, slices: torch.Tensor, classes: int, seed: int) -> tuple[Head, np.ndarray]:
    """A linear head fitted on the discs' concatenated slice features, labels from a random projection of them."""
    with torch.no_grad():
        features = disc_features(encoder, slices).numpy().astype(np.float64)
    projection = features @ np.random.default_rng(seed).normal(size=features.shape[1])
    cuts = np.quantile(projection, np.linspace(0, 1, classes + 1)[1:-1])
    y = np.searchsorted(cuts, projection)
    return fit_head(features, y, classes, 0.01, max_iter=200), features


def _resnet_to(encoder: SimclrEncoder, x: torch.Tensor, stage: str) -> torch.Tensor:
    """MONAI's ResNet forward written out, up to the output of ``stage`` (the test's own path to the layer)."""
    r = encoder.resnet
    x = r.maxpool(r.act(r.bn1(r.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(r, name)(x)
        if name == stage:
            return x
    raise ValueError(stage)


def _resnet_from(encoder: SimclrEncoder, x: torch.Tensor, stage: str) -> torch.Tensor:
    """The rest of the encoder after ``stage``: the later stages, the global average pool and the first FC block."""
    r = encoder.resnet
    for name in ("layer1", "layer2", "layer3", "layer4")[("layer1", "layer2", "layer3", "layer4").index(stage) + 1:]:
        x = getattr(r, name)(x)
    return encoder.fc1(r.avgpool(x).flatten(1))


# --- the model explained ------------------------------------------------------------------------------------------

def test_axial_probe_is_the_probe_jobs_linear_head_on_the_concatenated_slice_features(tmp_path):
    encoder = _encoder(1)
    slices = _slices(12, 1)
    head, features = _fitted_head(encoder, slices, 2, 1)
    with (tmp_path / "model.npz").open("wb") as handle:
        np.savez(handle, classes=np.array([0, 1]), **head.to_arrays("linear"))
    model = gradcam.load_model(tmp_path / "model.npz", encoder)
    assert isinstance(model, gradcam.AxialProbe) and gradcam.reads(model) == "axial"
    with torch.no_grad():
        logits = model(*[slices[:, k:k + 1] for k in range(3)])        # the 3 slices as 3 inputs
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), head.predict_proba(features), rtol=1e-5, atol=1e-6)


# --- the maps: standard Grad-CAM per slice, Hou et al.'s eqs. 16-20 over the 3 slices -----------------------------

@pytest.mark.parametrize("layer, stage", [("conv5", "layer4"), ("conv3", "layer3")])
@pytest.mark.parametrize("classes", [2, 5])
def test_axial_maps_match_grad_cam_and_hou_equations_written_as_loops(layer, stage, classes):
    """The layer's activations A_kc of each slice k and the gradients of the explained output are taken here by the
    ResNet's forward written out (not the stage's hook), the maps by loops from the equations: standard Grad-CAM of
    each slice with its own channel weights, the 3 maps of a disc divided by their common maximum; Hou et al.'s K = 3
    maps of a disc from eqs. 16-20 (for 2 classes, as theirs, y = z1 - z0 and positive predictions only)."""
    encoder = _encoder(2)
    n = 8
    slices = _slices(n, 2)
    head, _ = _fitted_head(encoder, slices, classes, 2)
    model = gradcam.AxialProbe(encoder, head).eval()
    if classes == 2:   # both kinds of prediction among the discs: the bias of class 1 set at the median margin
        with torch.no_grad():
            logits = model(*[slices[:, k:k + 1] for k in range(3)])
        margin = (logits[:, 1] - logits[:, 0]).sort().values
        model.layers[1][1] -= (margin[3] + margin[4]) / 2
    result = gradcam.explain_inputs(model, encoder, [slices[:, k:k + 1] for k in range(3)], layer,
                                    binary=classes == 2)
    assert result["cam"].shape == (n, 3, *result["cam"].shape[2:]) and np.prod(result["cam"].shape[2:]) > 1

    # the reference: A for every (disc, slice), then y through the rest of the network and the head
    acts = _resnet_to(encoder, slices.reshape(n * 3, 1, SIZE, SIZE), stage).detach().requires_grad_(True)
    features = _resnet_from(encoder, acts, stage).reshape(n, 3 * encoder.spec.fc_units)   # disc-major, slice order
    logits = model.head_logits(features)
    torch.testing.assert_close(logits.detach(), result["logits"])
    predicted = logits.detach().argmax(1)
    standard, = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), acts, retain_graph=True)
    y = logits[:, 1] - logits[:, 0] if classes == 2 else logits.gather(1, predicted[:, None])[:, 0]
    hou_grads, = torch.autograd.grad(y.sum(), acts)
    a = acts.detach().double().numpy().reshape(n, 3, *acts.shape[1:])
    g = standard.double().numpy().reshape(a.shape)
    gh = hou_grads.double().numpy().reshape(a.shape)
    positive = (predicted == 1).numpy() if classes == 2 else np.ones(n, bool)
    if classes == 2:
        assert 0 < positive.sum() < n
    assert result["hou_made"].numpy().tolist() == positive.tolist()
    for i in range(n):
        cams = np.stack([naive_grad_cam(a[i, k], g[i, k]) for k in range(3)])
        np.testing.assert_allclose(result["cam"][i].double().numpy(), cams / max(cams.max(), 1e-12), rtol=1e-4,
                                   atol=1e-5)
        if positive[i]:
            np.testing.assert_allclose(result["hou"][i].double().numpy(), naive_hou(a[i], gh[i]), rtol=1e-4,
                                       atol=1e-5)
        else:
            assert torch.isnan(result["hou"][i]).all()
    assert (result["cam"] >= 0).all() and (result["hou"][positive] >= 0).all()


# --- the stage ----------------------------------------------------------------------------------------------------

def _axial_job(folder: Path, task: str, n: int = 14, size: int = 32) -> dict[str, Path]:
    """A simclr probe job on ``n`` test discs: axial.npy, the encoder.pt, a fitted linear head (model.npz), its
    predictions, metrics and axial masks (a disc-shaped ellipse in the middle of every slice; every 5th disc without a
    label map)."""
    encoder = _encoder(3, size)
    slices = _slices(n, 3, size)
    np.save(folder / "axial.npy", slices.numpy().astype(np.float16))
    torch.save({"method": "simclr", "spec": encoder.spec.to_dict(), "state_dict": encoder.state_dict()},
               folder / "encoder.pt")
    classes = np.array([0, 1]) if task == "herniation" else np.arange(1, 6)
    head, _ = _fitted_head(encoder, slices.half().float(), len(classes), 3)
    with (folder / "model.npz").open("wb") as handle:
        np.savez(handle, classes=classes, **head.to_arrays("linear"))
    scan_id = np.array([f"scan-{i:02d}" for i in range(n)])
    level = np.array([levels.DISCS[i % len(levels.DISCS)] for i in range(n)])
    pd.DataFrame({"scan_id": scan_id, "level": level}).to_parquet(folder / "predictions.parquet")
    (folder / "metrics.json").write_text(json.dumps({"task": task}))
    rows, cols = np.ogrid[:size, :size]
    disc = ((rows - size / 2) / (size / 4)) ** 2 + ((cols - size / 2) / (size / 3)) ** 2 <= 1
    masks = np.broadcast_to(disc, (n, 3, 1, size, size)).astype(np.uint8).copy()
    has_mask = np.arange(n) % 5 != 0
    masks[~has_mask] = 0
    np.savez(folder / "axial_masks.npz", masks=masks, has_mask=has_mask, disc_input=np.array("axial"),
             sample_scan_id=scan_id, sample_level=level, sample_label=classes[np.arange(n) % len(classes)],
             sample_row=np.arange(n))
    return {"axial": folder / "axial.npy", "encoder": folder / "encoder.pt", "model": folder / "model.npz",
            "predictions": folder / "predictions.parquet", "metrics": folder / "metrics.json",
            "masks": folder / "axial_masks.npz"}


@pytest.mark.parametrize("task", ["herniation", "grade"])
def test_gradcam_stage_explains_the_simclr_probe_on_its_axial_slices(tmp_path, task):
    files = _axial_job(tmp_path, task)
    out = {k: tmp_path / f"{k}.{ext}" for k, ext in (("scores", "csv"), ("maps", "npz"), ("summary", "json"))}
    assert gradcam.main(["probe", "--model", "simclr", "--metrics", str(files["metrics"]), "--predictions",
                         str(files["predictions"]), "--model-file", str(files["model"]), "--masks",
                         str(files["masks"]), "--axial", str(files["axial"]), "--encoder", str(files["encoder"]),
                         "--scores", str(out["scores"]), "--maps", str(out["maps"]), "--summary",
                         str(out["summary"])]) == 0
    summary = json.loads(out["summary"].read_text())
    scores = pd.read_csv(out["scores"])
    maps = np.load(out["maps"])
    assert summary["input"] == "3 axial slices" and summary["layer"] == "resnet.layer4" and summary["head"] == "linear"
    assert [str(p) for p in maps["parts"]] == list(gradcam.INPUTS["axial"][1])
    # per disc, 3 maps of one slice each at the input's size, non-negative, on one scale (standard: max 1)
    assert maps["cam_up"].shape[1:] == (3, 1, 32, 32) and maps["inputs"].shape[1:] == (3, 1, 32, 32)
    assert maps["cam"].shape == (14, 3, 1, 1)                        # layer4 of 32-pixel slices: 1 x 1
    assert (maps["cam_up"] >= 0).all() and np.isin(maps["cam"].reshape(14, -1).max(1).round(4), [0, 1]).all()
    made = scores.hou_map.to_numpy(dtype=bool)
    assert (maps["hou_up"][made[:len(maps["hou_up"])]] >= 0).all()
    # the slices given to the figure are the disc's rows of axial.npy, slice k as input k
    axial = np.load(files["axial"])
    rows = maps["row"]
    np.testing.assert_array_equal(maps["inputs"][:, :, 0], axial[rows])
    # the score: over the discs with a label map; a 1 x 1 map upsampled is uniform, so it scores the disc's share
    with_mask = scores.scan_id.map(lambda s: int(s[-2:]) % 5 != 0)
    scored = scores[with_mask].dropna(subset=["inside_disc"])
    assert summary["samples"] == len(scored) > 0 and summary["without_label_map"] == 3
    np.testing.assert_allclose(scored.inside_disc, scored.disc_share_of_volume, atol=2e-3)
    assert 0 < summary["disc_share_of_volume"] < 1


def test_gradcam_stage_needs_the_simclr_encoder_for_the_axial_slices(tmp_path):
    files = _axial_job(tmp_path, "grade", n=5)
    job = gradcam.ProbeJob(files["metrics"], files["predictions"], files["model"])
    out = gradcam.Outputs(tmp_path / "s.csv", tmp_path / "m.npz", tmp_path / "j.json")
    with pytest.raises(ValueError, match="simclr encoder"):
        gradcam.run("simclr", job, files["masks"], files["axial"], out, "conv5", None)
    with pytest.raises(SystemExit):
        gradcam.main(["probe", "--model", "simclr", "--metrics", str(files["metrics"]), "--predictions",
                      str(files["predictions"]), "--model-file", str(files["model"]), "--masks", str(files["masks"]),
                      "--axial", str(files["axial"]), "--scores", "s", "--maps", "m", "--summary", "j"])


# --- the disc's label map in the axial slices ---------------------------------------------------------------------

def test_axial_masks_are_the_test_discs_rows_of_the_axial_slices_masks(tmp_path):
    """The axial_slices stage's masks (one per disc row, aligned with slices.npy) and index (has_mask, source): the
    npz holds the task's downstream test discs' rows, in gradcam's layout (K = 3 inputs of one slice), and no mask
    where the index has none."""
    rng = np.random.default_rng(0)
    every = (rng.random((6, 3, 16, 16)) < 0.3).astype(np.uint8)
    np.save(tmp_path / "masks.npy", every)
    scans = ["scan-0", "scan-0", "scan-1", "scan-1", "scan-2", "scan-2"]
    discs = ["L3-L4", "L4-L5"] * 3
    pd.DataFrame({"row": np.arange(6), "scan_id": scans, "level": discs,
                  "source": ["native", "resliced", "native", "native", "none", "native"],
                  "has_mask": [True, True, False, False, False, True]}).to_parquet(tmp_path / "index.parquet")
    parts = ["test", "test", "test", "train", "test", "test"]
    pd.DataFrame([{"subject_id": f"s{s[-1]}", "scan_id": s, "kind": "disc", "level": lv, "row": i,
                   "downstream_part": part, "pfirrmann": 3.0}
                  for i, (s, lv, part) in enumerate(zip(scans, discs, parts)) if i != 4]).to_parquet(
        tmp_path / "volumes.parquet")   # row 4 (flagged by extraction) is left out by the splits stage
    assert axial_masks.main(["--axial-index", str(tmp_path / "index.parquet"), "--axial-masks",
                             str(tmp_path / "masks.npy"), "--volumes", str(tmp_path / "volumes.parquet"),
                             "--axial-spacing-mm", "4", "--out", str(tmp_path / "axial_masks.npz")]) == 0
    store = np.load(tmp_path / "axial_masks.npz")
    assert str(store["disc_input"]) == "axial" and float(store["axial_spacing_mm"]) == 4.0
    assert store["masks"].shape == (4, 3, 1, 16, 16) and store["masks"].dtype == np.uint8
    rows = store["sample_row"]
    assert sorted(rows.tolist()) == [0, 1, 2, 5]
    assert store["has_mask"].tolist() == [r in (0, 1, 5) for r in rows]
    assert store["sample_source"].tolist() == [["native", "resliced", "native", "native", "none", "native"][r]
                                               for r in rows]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(store["masks"][i, :, 0], every[r] if r != 2 else 0)
    # what gradcam reads from it: the test samples of the job, K = 3 inputs of one slice
    pd.DataFrame({"scan_id": ["scan-0", "scan-1"], "level": ["L3-L4"] * 2}).to_parquet(tmp_path / "p.parquet")
    table, masks, read_as = gradcam.explained_samples(tmp_path / "p.parquet", tmp_path / "axial_masks.npz")
    assert read_as == "axial" and masks.shape == (2, 3, 1, 16, 16) and sorted(table.row.tolist()) == [0, 2]


def test_axial_masks_refuse_masks_of_another_extraction(tmp_path):
    np.save(tmp_path / "masks.npy", np.zeros((2, 3, 8, 8), np.uint8))
    pd.DataFrame({"row": [0, 1], "scan_id": ["a", "a"], "level": ["L3-L4", "L4-L5"], "source": ["native"] * 2,
                  "has_mask": [True, True]}).to_parquet(tmp_path / "index.parquet")
    pd.DataFrame([{"subject_id": "s", "scan_id": "a", "kind": "disc", "level": "L3-L4", "row": 1,
                   "downstream_part": "test", "pfirrmann": 3.0}]).to_parquet(tmp_path / "volumes.parquet")
    with pytest.raises(ValueError, match="not those of"):
        axial_masks.run(tmp_path / "index.parquet", tmp_path / "masks.npy", tmp_path / "volumes.parquet", "grade",
                        2.0, tmp_path / "out.npz")


# --- figures ------------------------------------------------------------------------------------------------------

def _figure(folder: Path, name: str) -> figures.FigureFiles:
    return figures.FigureFiles(folder / f"{name}.png", folder / f"{name}.pdf")


def _top1_table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"row": np.arange(n) // 3, "slice": np.arange(n) % 3,
                         "level": [levels.DISCS[(i // 3) % 6] for i in range(n)],
                         **{f"trained_view{v}_top1": rng.random(n) < 0.7 for v in (1, 2)},
                         **{f"untrained_view{v}_top1": rng.random(n) < 0.2 for v in (1, 2)}})


def _pairs_table() -> pd.DataFrame:
    return pd.DataFrame({"positive": [True] * 20 + [False] * 40,
                         "distance": np.r_[np.linspace(0, 1, 20), np.linspace(0.5, 2, 40)],
                         "untrained_distance": np.linspace(0, 1, 60)})


def _panel_titles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the axes' titles of every figure saved."""
    seen: list[list[str]] = []
    real = figures.save

    def record(fig, out):
        seen.append([ax.get_title() for ax in fig.axes])
        return real(fig, out)
    monkeypatch.setattr(figures, "save", record)
    return seen


@pytest.mark.parametrize("methods", [("siamese",), ("simclr",), ("siamese", "simclr")])
def test_pretext_figure_gives_each_method_its_own_panels(tmp_path, monkeypatch, methods):
    seen = _panel_titles(monkeypatch)
    tables = {"siamese": _pairs_table(), "simclr": _top1_table()}
    written = figures.pretext_figure({m: tables[m] for m in methods}, _figure(tmp_path, "pretext"),
                                     {"simclr": {"batch_images": 8}})
    assert all(p.exists() and p.stat().st_size > 1000 for p in written)
    titles = " | ".join(seen[0])
    assert len(seen[0]) == 2 * len(methods)
    assert ("siamese: same-subject detection (ROC)" in titles) == ("siamese" in methods)
    assert ("simclr: pretext test top-1 (120 slices; 95% bootstrap intervals)" in titles) == ("simclr" in methods)
    assert ("simclr: top-1 per level" in titles) == ("simclr" in methods)


def test_top1_interval_is_a_bootstrap_over_slices_and_the_difference_is_paired():
    rng = np.random.default_rng(3)
    trained, untrained = rng.random(400) < 0.6, rng.random(400) < 0.3
    mean, low, high = figures.bootstrap_mean(trained.astype(float))
    assert mean == pytest.approx(trained.mean()) and low < mean < high
    se = np.sqrt(mean * (1 - mean) / 400)                         # the binomial interval, for scale
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
    diff, low, high = figures.bootstrap_mean(trained, paired=untrained)
    assert diff == pytest.approx(trained.mean() - untrained.mean()) and low < diff < high
    assert all(np.isnan(figures.bootstrap_mean(np.zeros(0))))
    table = _top1_table(6)
    expected = (table.trained_view1_top1.astype(float) + table.trained_view2_top1) / 2
    np.testing.assert_allclose(figures.slice_top1(table, "trained"), expected)


def test_pretext_figure_says_when_a_view_method_has_no_test_slices(tmp_path, monkeypatch):
    seen = _panel_titles(monkeypatch)
    figures.pretext_figure({"simclr": _top1_table().iloc[:0]}, _figure(tmp_path, "pretext"))
    assert (tmp_path / "pretext.png").exists() and seen


def test_training_figure_plots_each_methods_own_columns(tmp_path, monkeypatch):
    seen = _panel_titles(monkeypatch)
    siamese = pd.DataFrame({"epoch": [1, 1, 2, 2], "split": ["train", "val"] * 2, "loss": [1.0, 1.1, 0.8, 0.9],
                            "contrastive": [0.5] * 4, "level_loss": [0.5] * 4,
                            "level_accuracy": [0.3, 0.3, 0.6, 0.5]})
    simclr = pd.DataFrame({"epoch": [1, 1, 2, 2, 3, 3], "split": ["train", "val"] * 3,
                           "loss": [4.0, 4.1, 3.5, 3.7, 3.2, 3.6], "top1": [0.1, 0.1, 0.3, 0.25, 0.45, 0.3],
                           "lr": 1e-4})
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.95],
                            "kept": [False, True, False]})
    for name, pretrain in (("both", {"siamese": siamese, "simclr": simclr}), ("simclr", {"simclr": simclr}),
                           ("none", {})):
        figures.training_figure(pretrain, history, {"scratch": history}, _figure(tmp_path, name))
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    both = " | ".join(seen[0])
    assert "siamese pretraining: FC8 level accuracy" in both and "siamese pretraining: loss (contrastive + level)" in both
    assert "simclr pretraining: NT-Xent loss" in both and "simclr pretraining: top-1" in both
    assert len(seen[0]) == 5 and len(seen[1]) == 3 and len(seen[2]) == 3


def _maps(kind: str, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A model's maps.npz as stages/gradcam.py writes it: the disc volume (K = 1 of 5 slices) or the 3 axial slices
    (K = 3 of 1 slice); the axial model's test discs in another order."""
    rng = np.random.default_rng(seed)
    k, s, h, w = (1, 5, 44, 48) if kind == "disc" else (3, 1, 32, 32)
    order = np.arange(n) if kind == "disc" else np.arange(n)[::-1]
    masks = np.zeros((n, k, s, h, w), np.uint8)
    masks[..., h // 3:2 * h // 3, w // 4:3 * w // 4] = 1
    return {"cam_up": rng.random((n, k, s, h, w)).astype(np.float16),
            "hou_up": rng.random((n, k, s, h, w)).astype(np.float16),
            "inputs": rng.random((n, k, s, h, w)).astype(np.float16), "masks": masks,
            "parts": np.array(gradcam.INPUTS[kind][1]), "has_mask": np.ones(n, bool),
            "hou_map": np.array([True, False] * (n // 2)), "scan_id": np.array([f"scan-{i}" for i in order]),
            "level": np.array(["L4-L5"] * n), "label": order % 2, "predicted": np.ones(n, int),
            "task": np.array("herniation"), "head": np.array("linear")}


@pytest.mark.parametrize("variant", ["gradcam", "hou"])
def test_gradcam_figure_shows_the_axial_slices_beside_the_sagittal_models(tmp_path, monkeypatch, variant):
    seen = _panel_titles(monkeypatch)
    maps = {"siamese": _maps("disc"), "simclr": _maps("axial")}
    figures.gradcam_figure(maps, None, _figure(tmp_path, variant), variant)
    assert (tmp_path / f"{variant}.png").stat().st_size > 5000
    titles = seen[0]
    assert len(titles) == 2 * 3                                       # 3 columns: 3 slices of each input
    assert titles[:3] == [f"disc volume, slice {s}/5" for s in (1, 3, 5)]
    assert titles[3:] == list(gradcam.INPUTS["axial"][1])
    # the same test disc in both rows: scan-0 is the simclr model's last example
    shown = figures._shown_disc(maps, ["siamese", "simclr"], 0)
    assert shown == {"siamese": (0, True), "simclr": (3, True)}
    alone = figures.gradcam_figure({"simclr": _maps("axial")}, None, _figure(tmp_path, "alone"), variant)
    assert alone[0].exists()


def test_attention_table_names_the_axial_input_and_its_layer(tmp_path):
    summaries = [{"model": m, "head": "linear", "input": i, "layer": lay, "map_size": [2, 2], "task": "herniation",
                  "samples": 10, "inside_disc": 0.3, "disc_share_of_volume": 0.2, "samples_hou": 5,
                  "inside_disc_hou": 0.25, "disc_share_of_volume_hou": 0.2}
                 for m, i, lay in (("siamese", "disc volume", "conv5"), ("simclr", "3 axial slices", "resnet.layer4"))]
    figures.attention_table(summaries, figures.TableFiles(tmp_path / "a.html", tmp_path / "a.csv"))
    table = pd.read_csv(tmp_path / "a.csv")
    assert table.input.tolist() == ["disc volume", "3 axial slices"]
    assert table["layer (map size)"].tolist() == ["conv5 (2 x 2)", "resnet.layer4 (2 x 2)"]
    assert "axial slices" in (tmp_path / "a.html").read_text()
