"""Stage gradcam: where each downstream model looks. Grad-CAM for 3D volumes, the variant of Hou et al. 2023, and an
attention-inside-the-disc score per model.

The model explained is the probe of the report (``reports.gradcam_task``, every label, subset seed 0, linear head):
a frozen encoder with its fitted head, or the network trained end to end, exactly as saved by the probe job
(``model.npz``). A disc sample is two vertebral-body volumes (the bodies above and below the disc,
stages/nets/disc_net.py); the target is the logit of the class the model predicts.

- Standard Grad-CAM (Selvaraju et al. 2017) on a convolutional layer ``A`` (``(C, *spatial)``, per input volume):
  channel weights ``w_c = mean over positions of dy/dA_c``; map ``ReLU(sum_c w_c A_c)``; both volumes of a sample
  share one colour scale (the map is normalised by its maximum over both).
- Hou et al. 2023, equations 16-20, for a sample read as K feature maps (their 3 axial slices; here the sample's
  input volumes, and the slices too when the layer keeps the slice axis): ``w_kc = mean |dy/dA_kc|`` (16), divided
  by the standard deviation of all the sample's weights (17), a softmax across the K maps for each channel (18),
  ``L_k = ReLU(sum_c a_kc A_kc)`` (19), and each ``L_k`` min-max normalised to [0, 1] on its own (20).
- Layers: ``conv5`` (the deepest convolutional layer, default; Conv4 has already spanned the slices, so its map is
  2D and the same on every slice) or ``conv3`` (the deepest layer that still has a slice axis: one map per slice).
- Attention inside the disc: the share of a map's mass (after upsampling to the input volumes) that falls inside the
  disc's label map cut with the bodies' crop geometry (stages/disc_masks.py), averaged over the test samples; the
  share the disc takes of the volumes is the score of uniform attention. A share above it means the model looks at
  the disc more than at random.

Run (``probe``: a probe job explained; ``pairs``: a pretrained encoder's similarity of a few pretext test pairs):
    python -m stages.gradcam probe --model siamese --metrics results/probes/runs/siamese/grade/f1/seed0/metrics.json \\
        --predictions .../seed0/predictions.parquet --model-file .../seed0/model.npz \\
        --encoder results/pretrain/siamese/encoder.pt --masks results/report/gradcam/disc_masks.npz \\
        --vertebrae results/extract/vertebrae.npy --scores results/report/gradcam/siamese/scores.csv \\
        --maps results/report/gradcam/siamese/maps.npz --summary results/report/gradcam/siamese/summary.json
    python -m stages.gradcam pairs --encoder results/pretrain/siamese/encoder.pt \\
        --distances results/pretrain/siamese/pretext/distances.parquet --vertebrae results/extract/vertebrae.npy \\
        --out results/report/gradcam/siamese/pairs.npz

``probe`` writes ``--scores`` (CSV, one row per test sample: scan, level, grade, prediction, both scores and the
uniform share), ``--maps`` (the maps at the layer's resolution and upsampled, for the figures) and ``--summary``
(JSON); ``pairs`` writes the similarity maps of a few positive and negative pretext test pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import cli, seeds
from stages.nets.heads import Head
from stages.nets.siamese import VggM3dEncoder, load_encoder, random_encoder

log = logging.getLogger("gradcam")
LAYERS = ("conv5", "conv3")
SCORE_COLUMNS = ["scan_id", "level", "label", "predicted", "inside_disc", "inside_disc_hou", "disc_share_of_volume"]


# --- Grad-CAM, pure functions on tensors -------------------------------------------------------------------------

def grad_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Standard Grad-CAM. ``acts``, ``grads``: ``(N, C, *spatial)`` -> maps ``(N, *spatial)``, ReLU'd, not scaled."""
    if acts.shape != grads.shape or acts.dim() < 3:
        raise ValueError(f"activations and gradients must both be (N, C, *spatial), got {tuple(acts.shape)} and "
                         f"{tuple(grads.shape)}")
    weights = grads.flatten(2).mean(2)                                      # (N, C)
    return F.relu((weights.view(*weights.shape, *[1] * (acts.dim() - 2)) * acts).sum(1))


def hou_cam(acts: torch.Tensor, grads: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Hou et al. 2023, eqs 16-20, for one sample read as K feature maps. ``acts``, ``grads``: ``(K, C, *spatial)``
    -> ``(K, *spatial)``, each map min-max normalised to [0, 1] on its own (a constant map becomes 0)."""
    if acts.shape != grads.shape or acts.dim() < 3:
        raise ValueError(f"activations and gradients must both be (K, C, *spatial), got {tuple(acts.shape)} and "
                         f"{tuple(grads.shape)}")
    w = grads.abs().flatten(2).mean(2)                                      # (16) (K, C)
    w = w / (w.std() + eps)                                                 # (17)
    a = torch.softmax(w, dim=0)                                             # (18) across the K maps, per channel
    maps = F.relu((a.view(*a.shape, *[1] * (acts.dim() - 2)) * acts).sum(1))   # (19)
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp_min(eps)
    out = (flat - low[:, None]) / span[:, None]                             # (20)
    out[(high - low) <= eps] = 0.0
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Maps ``(N, h, w)`` (2D layer: the same on every slice) or ``(N, s, h, w)`` -> ``(N, S, H, W)``, linear."""
    slices, height, width = size
    if maps.dim() == 3:
        up = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return up[:, None].expand(-1, slices, -1, -1).contiguous()
    if maps.dim() == 4:
        return F.interpolate(maps[:, None], size=size, mode="trilinear", align_corners=False)[:, 0]
    raise ValueError(f"expected maps (N, h, w) or (N, s, h, w), got {tuple(maps.shape)}")


def inside_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside its mask. ``maps``, ``masks``: ``(N, ...)`` -> ``(N,)`` (NaN for an empty
    map: no attention to measure)."""
    mass = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(mass > 0, inside / mass.clamp_min(1e-30), torch.full_like(mass, float("nan")))


@contextlib.contextmanager
def capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Records the outputs of ``module`` (a layer) during the forward passes inside the block."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def layer_module(encoder: VggM3dEncoder, layer: str) -> nn.Module:
    """The ReLU after ``conv5`` (``(C, h, w)`` per volume) or after ``conv3`` (``(C, S, h, w)``)."""
    if layer == "conv5":
        return encoder.conv5[-2]
    if layer == "conv3":
        return encoder.conv[10]
    raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


# --- The models explained -----------------------------------------------------------------------------------------

class FrozenProbe(nn.Module):
    """A frozen encoder and a fitted head (stages/nets/heads.py) as one differentiable network: logits over every class
    (an absent class gets -inf, probability 0, as the head's ``predict_proba``)."""

    def __init__(self, encoder: VggM3dEncoder, head: Head, inputs: int):
        super().__init__()
        self.encoder = encoder
        self.inputs = inputs
        std = head.standardiser   # the head runs in float64, as it was fitted (stages/nets/heads.py)
        self.register_buffer("mean", torch.as_tensor(std.mean, dtype=torch.float64))
        self.register_buffer("scale", torch.as_tensor(std.scale, dtype=torch.float64))
        self.register_buffer("basis", torch.as_tensor(std.basis, dtype=torch.float64))
        self.layers = [torch.as_tensor(p, dtype=torch.float64) for p in head.layers()]
        self.present = torch.as_tensor(head.present, dtype=torch.long)
        self.n_classes = head.n_classes

    def forward(self, upper: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
        x = upper if self.inputs == 1 else torch.cat([upper, lower])
        emb = self.encoder(x)                       # one pass for both volumes: one capture of the layer
        features = emb if self.inputs == 1 else torch.cat(emb.chunk(2), dim=1)
        z = ((features.double() - self.mean) / self.scale) @ self.basis
        h = z @ self.layers[0] + self.layers[1]
        if len(self.layers) == 4:
            h = F.relu(h) @ self.layers[2] + self.layers[3]
        logits = torch.full((len(h), self.n_classes), float("-inf"), dtype=h.dtype)
        logits[:, self.present] = h
        return logits


def load_model(model_file: Path, encoder: nn.Module | None, head: str = "linear") -> nn.Module | None:
    """The probe job's model (its ``model.npz``): ``encoder`` + its saved head (frozen), or the saved network (end to
    end); None when the job fitted nothing (its training labels had one class: it predicts that class, there is
    nothing to explain)."""
    saved = np.load(model_file)
    if "net/spec" in saved:
        from stages.nets.disc_net import load_net
        return load_net(saved)
    if f"{head}/theta" not in saved:
        if not any(k.endswith("/theta") for k in saved.files):
            return None
        raise ValueError(f"{model_file} has no fitted {head!r} head (heads there: "
                         f"{sorted(k.split('/')[0] for k in saved.files if k.endswith('/theta'))})")
    if encoder is None:
        raise ValueError(f"{model_file} holds a frozen head: give its encoder (--encoder or --random)")
    return FrozenProbe(encoder.eval(), Head.from_arrays(saved, head), inputs=2).eval()


def explain(model: nn.Module, encoder: VggM3dEncoder, upper: torch.Tensor, lower: torch.Tensor,
            layer: str) -> dict[str, torch.Tensor]:
    """Grad-CAM of a batch of disc samples for the predicted class. Returns ``logits`` ``(n, classes)``,
    ``target`` ``(n,)``, ``acts`` ``(n, 2, C, *spatial)``, ``cam`` and ``hou`` ``(n, 2, *spatial)`` (input 0 the
    upper body, 1 the lower; ``cam`` divided by its maximum over the sample's two volumes)."""
    n = len(upper)
    with capture(layer_module(encoder, layer)) as seen:
        logits = model(upper, lower)
    if len(seen) != 1:
        raise RuntimeError(f"expected one pass through {layer}, saw {len(seen)}")
    acts = seen[0]
    target = logits.detach().argmax(1)
    score = logits.gather(1, target[:, None]).sum()
    grads, = torch.autograd.grad(score, acts)
    # (2n, C, ...) -> (n, 2, C, ...): the encoder saw the upper volumes, then the lower ones
    pair = lambda t: torch.stack(t.detach().chunk(2), dim=1)  # noqa: E731
    acts, grads = pair(acts), pair(grads)
    cam = grad_cam(acts.flatten(0, 1), grads.flatten(0, 1)).view(n, 2, *acts.shape[3:])
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(n, *[1] * (cam.dim() - 1))
    hou = torch.stack([_hou_sample(a, g) for a, g in zip(acts, grads)])
    return {"logits": logits.detach(), "target": target, "cam": cam, "hou": hou}


def _hou_sample(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One sample's Hou maps: ``(2, C, *spatial)`` -> ``(2, *spatial)``; with a slice axis every slice of both
    volumes is one of the K maps."""
    if acts.dim() == 4:                                       # (2, C, h, w): K = 2 volumes
        return hou_cam(acts, grads)
    k = acts.shape[0] * acts.shape[2]                         # (2, C, s, h, w): K = 2 x s slices
    a = acts.permute(0, 2, 1, 3, 4).reshape(k, acts.shape[1], *acts.shape[3:])
    g = grads.permute(0, 2, 1, 3, 4).reshape(k, acts.shape[1], *acts.shape[3:])
    return hou_cam(a, g).view(acts.shape[0], acts.shape[2], *acts.shape[3:])


def siamese_pair_cam(encoder: VggM3dEncoder, a: torch.Tensor, b: torch.Tensor,
                     layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of the similarity of pairs (the negative L2 distance of the embeddings, Jamaludin et al. eq. 1):
    where in each volume the features make the two look alike. ``a``, ``b``: ``(n, S, H, W)`` -> the distances
    ``(n,)`` and maps ``(n, 2, *spatial)`` (each sample's two maps share one scale)."""
    n = len(a)
    with capture(layer_module(encoder, layer)) as seen:
        emb = encoder(torch.cat([a, b]))
    ea, eb = emb.chunk(2)
    distance = (ea - eb).norm(dim=1)
    grads, = torch.autograd.grad(-distance.sum(), seen[0])
    acts = seen[0].detach()
    cam = grad_cam(acts, grads)
    cam = torch.stack(cam.chunk(2), dim=1)
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(n, *[1] * (cam.dim() - 1))
    return distance.detach(), cam


# --- The stage ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeJob:
    """The files of the probe job explained (stages/probe.py)."""

    metrics: Path        # metrics.json: its task
    predictions: Path    # predictions.parquet: the test samples it scored
    model: Path          # model.npz: the fitted heads, or the network trained end to end


@dataclass(frozen=True)
class Outputs:
    """The files ``run`` writes: ``scores`` (CSV), ``maps`` (NPZ) and ``summary`` (JSON)."""

    scores: Path
    maps: Path
    summary: Path


def save_npz(path: Path, **arrays: Any) -> None:
    """A compressed NPZ at exactly ``path`` (``np.savez`` would add ``.npz`` to a name without it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)


def explained_samples(predictions_file: Path, masks: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The probe job's test samples, in the masks' order (column ``has_mask``), and their masks
    ``(n, 2, S, H, W)``."""
    predictions = pd.read_parquet(predictions_file)
    store = np.load(masks)
    table = pd.DataFrame({k.removeprefix("sample_"): store[k] for k in store.files if k.startswith("sample_")})
    table["has_mask"] = store["has_mask"]
    tested = set(zip(predictions.scan_id, predictions.level))
    keep = np.array([(s, lv) in tested for s, lv in zip(table.scan_id, table.level)], dtype=bool)
    return table[keep].reset_index(drop=True), store["masks"][keep]


def run(model_name: str, job: ProbeJob, masks: Path, vertebrae: Path, out: Outputs, layer: str,
        encoder: VggM3dEncoder | None, batch_size: int = 16, examples: int = 6) -> dict[str, Any]:
    seeds.seed_torch(seeds.GRADCAM)
    model = load_model(job.model, encoder)
    samples, disc_masks = explained_samples(job.predictions, masks)
    task = json.loads(job.metrics.read_text())["task"]
    for path in (out.scores, out.maps, out.summary):
        path.parent.mkdir(parents=True, exist_ok=True)
    if model is None:
        note = "the job's training labels had one class: it predicts that class, no model to explain"
        log.warning("%s: %s", model_name, note)
        pd.DataFrame(columns=SCORE_COLUMNS).to_csv(out.scores, index=False)
        save_npz(out.maps, cam=np.zeros(0), hou=np.zeros(0), cam_up=np.zeros((0, 2, 1, 1, 1)),
                 hou_up=np.zeros((0, 2, 1, 1, 1)), task=task)
        summary = {"model": model_name, "layer": layer, "task": task, "samples": 0, "note": note,
                   **{k: None for k in ("inside_disc", "inside_disc_hou", "disc_share_of_volume")}}
        out.summary.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    enc = model.encoder
    if samples.empty:
        raise ValueError(f"none of the test samples of {job.predictions} is in {masks}: were they made for another "
                         "task?")
    if not samples.has_mask.any():
        log.warning("no test sample has a label map: the maps are drawn, the attention score is undefined")
    # the examples drawn: samples with a mask first (the disc's outline is drawn over them)
    samples = pd.concat([samples[samples.has_mask], samples[~samples.has_mask]])
    disc_masks = disc_masks[samples.index.to_numpy()]
    samples = samples.reset_index(drop=True)
    bodies = np.load(vertebrae, mmap_mode="r")
    size = tuple(bodies.shape[1:])
    rows, kept = [], {"cam": [], "hou": [], "cam_up": [], "hou_up": []}
    for start in range(0, len(samples), batch_size):
        part = samples.iloc[start:start + batch_size]
        upper = torch.from_numpy(np.asarray(bodies[part.upper.to_numpy()], dtype=np.float32))
        lower = torch.from_numpy(np.asarray(bodies[part.lower.to_numpy()], dtype=np.float32))
        result = explain(model, enc, upper, lower, layer)
        mask = torch.from_numpy(disc_masks[start:start + batch_size].astype(np.float32))
        n = len(part)
        cam_up = upsample(result["cam"].flatten(0, 1), size).view(n, 2, *size)
        hou_up = upsample(result["hou"].flatten(0, 1), size).view(n, 2, *size)
        known = torch.from_numpy(part.has_mask.to_numpy(dtype=bool).copy())
        nan = torch.tensor(float("nan"))
        share_cam = torch.where(known, inside_share(cam_up, mask), nan)
        share_hou = torch.where(known, inside_share(hou_up, mask), nan)
        uniform = torch.where(known, mask.flatten(1).mean(1), nan)
        for i, sample in enumerate(part.itertuples()):
            rows.append({"scan_id": sample.scan_id, "level": sample.level, "label": int(sample.label),
                         "predicted_index": int(result["target"][i]), "inside_disc": float(share_cam[i]),
                         "inside_disc_hou": float(share_hou[i]), "disc_share_of_volume": float(uniform[i])})
        kept["cam"].append(result["cam"].numpy())
        kept["hou"].append(result["hou"].numpy())
        if sum(len(x) for x in kept["cam_up"]) < examples:
            kept["cam_up"].append(cam_up[:examples].numpy().astype(np.float16))
            kept["hou_up"].append(hou_up[:examples].numpy().astype(np.float16))
    scores = pd.DataFrame(rows)
    classes = np.load(job.model)["classes"]
    scores["predicted"] = classes[scores.pop("predicted_index").to_numpy()]
    if int(np.prod(kept["cam"][0].shape[2:])) == 1:
        log.warning("%s's map is 1 x 1 at this crop size: it holds no spatial information (try the layer conv3, or "
                    "larger crops)", layer)
    with_mask = scores[samples.has_mask.to_numpy()]
    # an all-zero map (every weighted channel below 0) has no attention to measure: every average is over the same
    # samples, those with a label map and both maps non-empty
    scored = with_mask.dropna(subset=["inside_disc", "inside_disc_hou"])
    summary = {"model": model_name, "layer": layer, "task": task, "map_size": list(kept["cam"][0].shape[2:]),
               "samples": int(len(scored)), "without_label_map": int((~samples.has_mask).sum()),
               "empty_maps": int(len(with_mask) - len(scored)),
               **{k: float(scored[k].mean()) if len(scored) else None
                  for k in ("inside_disc", "inside_disc_hou", "disc_share_of_volume")}}
    scores = scores[SCORE_COLUMNS]
    scores.to_csv(out.scores, index=False)
    shown = samples.iloc[:examples]
    save_npz(out.maps, cam=np.concatenate(kept["cam"]), hou=np.concatenate(kept["hou"]),
             cam_up=np.concatenate(kept["cam_up"])[:examples], hou_up=np.concatenate(kept["hou_up"])[:examples],
             upper=shown.upper.to_numpy(), lower=shown.lower.to_numpy(), masks=disc_masks[:examples],
             has_mask=shown.has_mask.to_numpy(), scan_id=shown.scan_id.to_numpy().astype(str),
             level=shown.level.to_numpy().astype(str), label=shown.label.to_numpy(),
             predicted=scores.predicted.to_numpy()[:examples], task=task)
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if len(scored):
        log.info("%s: %d test samples; attention inside the disc %.3f (Grad-CAM), %.3f (Hou et al.); uniform %.3f",
                 model_name, len(scored), summary["inside_disc"], summary["inside_disc_hou"],
                 summary["disc_share_of_volume"])
    return summary


def pick_pairs(distances: pd.DataFrame, per_kind: int = 3) -> pd.DataFrame:
    """``per_kind`` positive and negative test pairs, at evenly spaced quantiles of each kind's distance (typical
    pairs, not the extremes)."""
    picked = []
    for positive in (True, False):
        kind = distances[distances.positive.astype(bool) == positive].sort_values("distance", kind="stable")
        if kind.empty:
            continue
        at = np.unique(np.round(np.linspace(0.2, 0.8, per_kind) * (len(kind) - 1)).astype(int))
        picked.append(kind.iloc[at])
    return pd.concat(picked, ignore_index=True) if picked else distances.iloc[:0]


def explain_pairs(encoder: VggM3dEncoder, bodies: np.ndarray, distances: pd.DataFrame, layer: str,
                  out: Path, per_kind: int = 3) -> pd.DataFrame:
    """Similarity maps of a few test pairs of the pretext evaluation, written to ``out`` (NPZ)."""
    pairs = pick_pairs(distances, per_kind)
    if pairs.empty:   # a cohort too small for a self-supervision test part with pairs: said in the figure
        log.warning("the pretext evaluation has no test pairs: nothing to explain")
        save_npz(out, a=np.zeros(0, np.int64), b=np.zeros(0, np.int64), level=np.zeros(0, str),
                 positive=np.zeros(0, bool), distance=np.zeros(0), cam=np.zeros(0),
                 cam_up=np.zeros((0, 2, *bodies.shape[1:]), np.float16))
        return pairs.assign(recomputed_distance=np.zeros(0))
    a = torch.from_numpy(np.asarray(bodies[pairs.a.to_numpy()], dtype=np.float32))
    b = torch.from_numpy(np.asarray(bodies[pairs.b.to_numpy()], dtype=np.float32))
    distance, cam = siamese_pair_cam(encoder.eval(), a, b, layer)
    n, size = len(pairs), tuple(bodies.shape[1:])
    cam_up = upsample(cam.flatten(0, 1), size).view(n, 2, *size)
    save_npz(out, a=pairs.a.to_numpy(), b=pairs.b.to_numpy(), level=pairs.level.to_numpy().astype(str),
             positive=pairs.positive.to_numpy(dtype=bool), distance=distance.numpy(), cam=cam.numpy(),
             cam_up=cam_up.numpy().astype(np.float16))
    return pairs.assign(recomputed_distance=distance.numpy())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.gradcam", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vertebrae", type=cli.existing_file, required=True,
                       help="extract/vertebrae.npy (the body volumes the models read).")
        p.add_argument("--gradcam-layer", dest="layer", choices=LAYERS, default="conv5",
                       help="reports.gradcam_layer: the layer explained (default conv5).")
        p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads (default 2).")
        cli.add_log_option(p)

    p = sub.add_parser("probe", help="Explain a probe job's model on its test samples.")
    p.add_argument("--model", required=True, help="Name of the model (a label in the figures).")
    p.add_argument("--metrics", type=cli.existing_file, required=True, help="The job's metrics.json (its task).")
    p.add_argument("--predictions", type=cli.existing_file, required=True,
                   help="The job's predictions.parquet (the test samples explained).")
    p.add_argument("--model-file", type=cli.existing_file, required=True,
                   help="The job's model.npz (the fitted heads, or the network trained end to end).")
    p.add_argument("--masks", type=cli.existing_file, required=True,
                   help="disc_masks.npz of stages.disc_masks (the test samples' disc masks).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--encoder", type=cli.existing_file, help="Frozen probe: the encoder.pt its features came "
                                                                  "from.")
    which.add_argument("--random", action="store_true", help="Frozen probe of the random encoder (the floor).")
    p.add_argument("--seed", type=int, default=0, help="--random: the initial weights' seed (pretrain.seed).")
    cli.add_encoder_size_options(p, "--random: ")
    p.add_argument("--scores", type=Path, required=True, help="Output: scores.csv (one row per test sample).")
    p.add_argument("--maps", type=Path, required=True, help="Output: maps.npz (the maps, for the figures).")
    p.add_argument("--summary", type=Path, required=True, help="Output: summary.json (the attention scores).")
    common(p)

    p = sub.add_parser("pairs", help="Explain a pretrained encoder's similarity of a few pretext test pairs.")
    p.add_argument("--encoder", type=cli.existing_file, required=True, help="The method's encoder.pt.")
    p.add_argument("--distances", type=cli.existing_file, required=True,
                   help="The method's pretext/distances.parquet (the test pairs and their distances).")
    p.add_argument("--pair-examples", type=cli.positive_int, default=3,
                   help="reports.pair_examples: positive (and as many negative) pairs explained (default 3).")
    p.add_argument("--out", type=Path, required=True, help="Output: pairs.npz.")
    common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log, "gradcam")
    torch.set_num_threads(args.threads)
    bodies = np.load(args.vertebrae, mmap_mode="r")
    if args.what == "pairs":
        encoder, _ = load_encoder(args.encoder)
        explain_pairs(encoder, bodies, pd.read_parquet(args.distances), args.layer, args.out, args.pair_examples)
        return 0
    encoder = None
    if args.encoder is not None:
        encoder, _ = load_encoder(args.encoder)
    elif args.random:
        encoder = random_encoder(tuple(bodies.shape[1:]), args.seed, args.width, args.embedding_dim)
    run(args.model, ProbeJob(args.metrics, args.predictions, args.model_file), args.masks, args.vertebrae,
        Outputs(args.scores, args.maps, args.summary), args.layer, encoder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
