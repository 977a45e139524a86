"""Stage gradcam: where each downstream model looks. Grad-CAM for 3D volumes, the variant of Hou et al. 2023, and an
attention-inside-the-disc score per model.

The model explained is the probe of the report (``reports.gradcam_task``, every label, subset seed 0), exactly as
saved by the probe job (``model.npz``), on the input it was trained on:

- the disc volume (``probes.disc_input: disc``, ``--discs``): the disc classifier of Jamaludin et al. 2017
  (stages/nets/disc_cnn.py). A frozen encoder's model is its ``transfer`` head (the paper's classifier: the encoder's
  Conv1-Conv5, from the disc_features stage's ``disc_trunk.npz`` (``--disc-trunk``), and the FC6-FC8 the job
  trained); a job saved without one (``probe_training.heads`` without transfer) is explained through its ``linear``
  head on the pooled Conv5 maps. A model trained end to end is its saved network (``cnn``). K = 1 input volume.
- two vertebral-body volumes (``disc_input: bodies``, ``--vertebrae``; the bodies above and below the disc,
  stages/nets/disc_net.py): a frozen encoder (``--encoder`` or ``--random``) with its fitted ``linear`` head, or the
  network trained end to end. K = 2 input volumes (input 0 the upper body, 1 the lower).
- a disc's three axial slices (a ``simclr`` encoder, Hou et al. 2023; ``--axial``, axial/slices.npy): the encoder
  (``--encoder``, stages/nets/simclr.py: MONAI's 2D ResNet and the first FC block) on each slice, the slices'
  features concatenated in slice order, and the job's fitted ``linear`` head (their one FC layer; as saved, with its
  standardisation), as one differentiable network (:class:`AxialProbe`). K = 3 inputs, the slices (cranial, centre,
  caudal), each explained at the ResNet's last stage (``resnet.layer4``; ``--gradcam-layer conv3``: ``layer3``).

Standard Grad-CAM explains the logit of the class the model predicts; Hou et al.'s variant explains what their
classifier's map explains (:func:`hou_target`).

- Standard Grad-CAM (Selvaraju et al. 2017) on a convolutional layer ``A`` (``(C, *spatial)``, per input volume):
  channel weights ``w_c = mean over positions of dy/dA_c``; map ``ReLU(sum_c w_c A_c)``; the input volumes of a
  sample share one colour scale (the map is normalised by its maximum over all of them).
- Hou et al. 2023, equations 16-20, for a sample read as K feature maps of n channels (their 3 axial slices; here
  the sample's input volumes, and the slices too when the layer keeps the slice axis): ``w_kc = mean |dy/dA_kc|``
  (16), divided by the standard deviation of all the sample's K x n weights (17), ONE softmax over all K x n weights
  jointly (18), ``L_k = ReLU(sum_c a_kc A_kc)`` (19), and each ``L_k`` divided by its own maximum (20; an all-zero
  map stays 0). ``y`` is the pre-sigmoid output of Hou's binary classifier: for a binary task (herniation) the
  equivalent of a 2-class softmax model, ``z_1 - z_0``, and maps only for positive predictions (predicted class 1;
  the others get no map: NaN, and no Hou score); for a multi-class task (the grade) the predicted class's logit, every
  sample a map.
- Layers: ``conv5`` (the deepest convolutional layer, default; Conv4 has already spanned the slices, so its map is
  2D and the same on every slice; the disc volume alone gives K = 1 map per sample) or ``conv3`` (the deepest layer
  that still has a slice axis: one map per slice, K = the slices of every input volume). A simclr encoder's layer
  under the same option: ``conv5`` its ResNet's last stage (``layer4``, 2 x 2 on 48-pixel slices), ``conv3`` the
  stage before (``layer3``); each axial slice passes through the 2D network alone, so standard Grad-CAM weights each
  slice's channels by that slice's mean gradient (the three maps on one colour scale), and Hou et al.'s K = 3 maps are
  the three slices, as in their paper.
- Attention inside the disc: the share of a map's mass (after upsampling to the input volumes) that falls inside the
  disc's label map cut with the input's own crop geometry (the disc's crop, or the bodies' crops;
  stages/disc_masks.py; the axial slices: the label map cut on each slice's own pixels by the axial_slices stage,
  stages/axial_masks.py), averaged over the test samples; the share the disc takes of the input volume(s) is the
  score of uniform attention. A share above it means the model looks at the disc more than at random.

Run (``probe``: a probe job explained; ``pairs``: a pretrained encoder's similarity of a few pretext test pairs):
    python -m stages.gradcam probe --model siamese --metrics results/probes/runs/siamese/grade/f1/seed0/metrics.json \\
        --predictions .../seed0/predictions.parquet --model-file .../seed0/model.npz \\
        --disc-trunk results/probes/features/siamese/disc_trunk.npz --masks results/report/gradcam/disc_masks.npz \\
        --discs results/extract/discs.npy --scores results/report/gradcam/siamese/scores.csv \\
        --maps results/report/gradcam/siamese/maps.npz --summary results/report/gradcam/siamese/summary.json
    (end to end on the disc volume: no --disc-trunk; on the two bodies: ``--vertebrae results/extract/vertebrae.npy``
    instead of --discs, and ``--encoder results/pretrain/siamese/encoder.pt`` (or ``--random``) for a frozen model;
    a simclr model: ``--axial results/axial/slices.npy --encoder results/pretrain/simclr/encoder.pt`` and
    ``--masks results/report/gradcam/axial_masks.npz``)
    python -m stages.gradcam pairs --encoder results/pretrain/siamese/encoder.pt \\
        --distances results/pretrain/siamese/pretext/distances.parquet --vertebrae results/extract/vertebrae.npy \\
        --out results/report/gradcam/siamese/pairs.npz

``probe`` writes ``--scores`` (CSV, one row per test sample: scan, level, label, prediction, ``hou_map`` (whether
the sample has a Hou map), both scores and the uniform share; ``inside_disc_hou`` is NaN for a sample without a Hou
map), ``--maps`` (the maps at the layer's resolution and upsampled, and the examples' input volumes, for the figures;
a sample without a Hou map has NaN there) and ``--summary`` (JSON: the head explained and the input, each variant's
score averaged over its own samples, those with a label map and a non-empty map of that variant, with the uniform
share over the same samples: ``disc_share_of_volume`` beside ``inside_disc``, ``disc_share_of_volume_hou`` beside
``inside_disc_hou``); ``pairs`` writes the similarity maps of a few positive and negative pretext test pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import cli, seeds
from stages.evaluation.probe_data import TASKS
from stages.nets.disc_cnn import (
    DiscClassifier,
    load_classifier,
    load_transfer,
    pooled_features,
)
from stages.nets.encoders import Encoder, load_encoder, random_encoder
from stages.nets.heads import Head
from stages.nets.simclr import SimclrEncoder, load_simclr_encoder

log = logging.getLogger("gradcam")
LAYERS = ("conv5", "conv3")
SCORE_COLUMNS = ["scan_id", "level", "label", "predicted", "hou_map", "inside_disc", "inside_disc_hou",
                 "disc_share_of_volume"]
SCORE_KEYS = ("inside_disc", "disc_share_of_volume", "inside_disc_hou", "disc_share_of_volume_hou")
# What a sample is read as: the columns of the masks' file naming its input volumes' rows, and the K inputs' names.
# The axial slices (a simclr encoder) are one row of axial/slices.npy, whose 3 slices (as axial_stack: the spine axis
# points down, so the first is cranial) are K = 3 inputs of one slice each.
INPUTS = {"disc": (("row",), ("disc volume",)), "bodies": (("upper", "lower"), ("upper body", "lower body")),
          "axial": (("row",), ("axial slice 1 (cranial)", "axial slice 2 (disc centre)", "axial slice 3 (caudal)"))}
INPUT_NAMES = {"disc": "disc volume", "bodies": "two bodies", "axial": "3 axial slices"}
# The simclr encoder's layers (MONAI's 2D ResNet), by the name of the option (reports.gradcam_layer): conv5, the
# deepest convolutional layer, is the ResNet's last stage; conv3 the stage before it (a map twice as fine).
RESNET_LAYERS = {"conv5": "layer4", "conv3": "layer3"}


# --- Grad-CAM, pure functions on tensors -------------------------------------------------------------------------

def grad_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Standard Grad-CAM. ``acts``, ``grads``: ``(N, C, *spatial)`` -> maps ``(N, *spatial)``, ReLU'd, not scaled."""
    if acts.shape != grads.shape or acts.dim() < 3:
        raise ValueError(f"activations and gradients must both be (N, C, *spatial), got {tuple(acts.shape)} and "
                         f"{tuple(grads.shape)}")
    weights = grads.flatten(2).mean(2)                                      # (N, C)
    return F.relu((weights.view(*weights.shape, *[1] * (acts.dim() - 2)) * acts).sum(1))


def hou_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Hou et al. 2023, eqs 16-20, for one sample read as K feature maps of C channels. ``acts``: the layer's
    activations ``A_kc``, ``grads``: ``dy/dA_kc`` (``y``: :func:`hou_target`), both ``(K, C, *spatial)`` ->
    ``(K, *spatial)``, each map divided by its own maximum (so in [0, 1], its maximum 1).

    - (16) ``w_kc = mean over positions of |dy/dA_kc|``.
    - (17) ``w_kc / std(w)``, the standard deviation of all the sample's K x C weights (torch's default, with n - 1:
      the paper does not say which). Where it is 0 or undefined (all weights equal, or a single weight) the weights
      are left as they are: the softmax of equal weights is uniform at any scale.
    - (18) ``a_kc = exp(w_kc) / sum_{k', c'} exp(w_k'c')``: one softmax over all K x C weights jointly (they sum to 1
      over the sample, not per channel nor per map).
    - (19) ``L_k = ReLU(sum_c a_kc A_kc)``.
    - (20) ``L_k / max(L_k)``. ``L_k >= 0``, so a maximum of 0 is a map that is 0 everywhere (no position with positive
      evidence): it stays 0 (rather than 0/0), which :func:`inside_share` reads as no attention to measure.
    """
    if acts.shape != grads.shape or acts.dim() < 3:
        raise ValueError(f"activations and gradients must both be (K, C, *spatial), got {tuple(acts.shape)} and "
                         f"{tuple(grads.shape)}")
    w = grads.abs().flatten(2).mean(2)                                      # (16) (K, C)
    std = w.std() if w.numel() > 1 else w.new_zeros(())
    if std > 0:
        w = w / std                                                         # (17)
    a = torch.softmax(w.flatten(), dim=0).view_as(w)                        # (18) one softmax over all K x C
    maps = F.relu((a.view(*a.shape, *[1] * (acts.dim() - 2)) * acts).sum(1))   # (19) (K, *spatial)
    peak = maps.flatten(1).amax(1)                                          # (K,), >= 0
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))              # (20) an all-zero map stays 0
    return maps / scale.view(-1, *[1] * (maps.dim() - 1))


def hou_target(logits: torch.Tensor, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``y`` Hou et al.'s maps explain, and which samples get a map. ``logits``: ``(n, classes)`` (the
    model's, differentiable) -> ``y`` ``(n,)`` (differentiable) and ``made`` ``(n,)`` (bool).

    Hou's classifier is binary, one sigmoid unit, and its maps explain the pre-sigmoid output of positive predictions.
    For a model with a softmax over 2 classes, ``softmax(z)_1 = sigmoid(z_1 - z_0)``: the equivalent pre-sigmoid
    output is ``z_1 - z_0``. ``binary``: ``y = z_1 - z_0``, ``made`` where the model predicts class index 1 (the
    positive class: herniation 1). Otherwise (a multi-class task) ``y`` is the predicted class's logit (the target of
    standard Grad-CAM) and every sample gets a map.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (n, classes), got {tuple(logits.shape)}")
    predicted = logits.detach().argmax(1)
    if binary:
        if logits.shape[1] != 2:
            raise ValueError(f"a binary task's model must give 2 logits per sample, got {logits.shape[1]}")
        y, made = logits[:, 1] - logits[:, 0], predicted == 1
    else:
        y, made = logits.gather(1, predicted[:, None])[:, 0], torch.ones_like(predicted, dtype=torch.bool)
    if not torch.isfinite(y.detach()).all():
        raise ValueError("the explained output is not finite (a class the model gives -inf, never seen in training): "
                         f"{y.detach().tolist()}")
    return y, made


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


def layer_module(encoder: Encoder | DiscClassifier | SimclrEncoder, layer: str) -> nn.Module:
    """The ReLU after ``conv5`` (``(C, h, w)`` per volume) or after ``conv3`` (``(C, S, h, w)``) of a trunk encoder or
    of a disc classifier on one (the same Conv1-Conv5 modules); of a ResNet-18 encoder (or a classifier on one) its
    layer4 or layer3 (``(C, s, h, w)``: their slice axes); of a simclr encoder the output of its ResNet's stage
    :data:`RESNET_LAYERS` names (``(C, h, w)`` per slice: the residual sum after its ReLU)."""
    if isinstance(encoder, SimclrEncoder):
        if layer not in RESNET_LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        return getattr(encoder.resnet, RESNET_LAYERS[layer])
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    return (encoder.encoder if isinstance(encoder, DiscClassifier) else encoder).layer(layer)


# --- The models explained -----------------------------------------------------------------------------------------

class FrozenProbe(nn.Module):
    """A frozen encoder and a fitted head (stages/nets/heads.py) as one differentiable network: logits over every class
    (an absent class gets -inf, probability 0, as the head's ``predict_proba``)."""

    def __init__(self, encoder: nn.Module, head: Head, inputs: int):
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
        return self.head_logits(features)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The fitted head on ``features`` ``(n, d)`` -> logits ``(n, classes)`` (float64)."""
        z = ((features.double() - self.mean) / self.scale) @ self.basis
        h = z @ self.layers[0] + self.layers[1]
        if len(self.layers) == 4:
            h = F.relu(h) @ self.layers[2] + self.layers[3]
        logits = torch.full((len(h), self.n_classes), float("-inf"), dtype=h.dtype)
        logits[:, self.present] = h
        return logits


class PooledDiscProbe(FrozenProbe):
    """A ``linear`` or ``mlp`` head fitted on the pooled Conv5 maps of the disc volume (their mean and maximum over
    positions, stages/nets/disc_cnn.py ``pooled_features``) with the disc classifier's frozen Conv1-Conv5 (``trunk``),
    as one differentiable network on the disc volume."""

    def __init__(self, trunk: DiscClassifier, head: Head):
        super().__init__(trunk, head, inputs=1)

    def forward(self, upper: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
        return self.head_logits(pooled_features(self.encoder.feature_maps(upper)))


class AxialProbe(FrozenProbe):
    """A simclr encoder and the head fitted on its features of a disc's K axial slices, concatenated in slice order
    (stages/nets/simclr.py ``disc_features``, the input of Hou et al.'s one FC layer), as one differentiable network.
    ``forward`` takes the K slices as K inputs ``(n, 1, H, W)`` and passes them as one batch, slice 1 of every disc
    first: the layer's output is then ``(K n, C, h, w)``, one input after the other, as :func:`explain` reads it."""

    def __init__(self, encoder: SimclrEncoder, head: Head):
        super().__init__(encoder, head, inputs=1)

    def forward(self, *slices: torch.Tensor) -> torch.Tensor:    # type: ignore[override]
        emb = self.encoder(torch.cat(slices))                       # (K n, fc_units)
        return self.head_logits(torch.cat(emb.chunk(len(slices)), dim=1))   # (n, K fc_units), slice k at k fc_units


def explained_head(model_file: Path, disc: bool) -> str:
    """The head of the probe job the stage explains: ``network`` for a model trained end to end; for a frozen
    encoder on the disc volume its ``transfer`` head (the paper's classifier) when the job trained one, else
    ``linear``; on the two bodies ``linear``."""
    saved = np.load(model_file)
    if "net/spec" in saved or "cnn/spec" in saved:
        return "network"
    fitted = any(k.endswith("/theta") for k in saved.files)   # a one-class job fitted nothing: its default head
    return "transfer" if disc and ("transfer/spec" in saved or not fitted) else "linear"


def load_model(model_file: Path, encoder: nn.Module | None, head: str = "linear",
               trunk: Path | None = None) -> nn.Module | None:
    """The probe job's model (its ``model.npz``): the saved network (end to end: the disc classifier ``cnn``, or the
    two-body network ``net``); for a frozen encoder, its saved ``head``: ``transfer`` (FC6-FC8) on the Conv1-Conv5 of
    ``trunk`` (disc_trunk.npz), a ``linear`` or ``mlp`` head on the pooled Conv5 maps of ``trunk`` (disc volume), on
    the concatenated slice features of a simclr ``encoder`` (axial slices), or on the embeddings of ``encoder`` (two
    bodies). None when the job fitted nothing (its training labels had one class: it predicts that class, there is
    nothing to explain)."""
    saved = np.load(model_file)
    if "net/spec" in saved:
        from stages.nets.disc_net import load_net
        return load_net(saved)
    if "cnn/spec" in saved:
        return load_classifier(saved, "cnn")
    fitted = sorted({k.split("/")[0] for k in saved.files if k.endswith(("/theta", "/spec"))})
    if not fitted:
        return None
    if f"{head}/spec" in saved:
        if trunk is None:
            raise ValueError(f"{model_file} holds a {head!r} head (FC6-FC8 of the disc classifier): give the "
                             "encoder's disc_trunk.npz (--disc-trunk)")
        return load_transfer(np.load(trunk), saved, head)
    if f"{head}/theta" not in saved:
        raise ValueError(f"{model_file} has no fitted {head!r} head (heads there: {fitted})")
    if trunk is not None:
        return PooledDiscProbe(load_classifier(np.load(trunk), "trunk"), Head.from_arrays(saved, head)).eval()
    if encoder is None:
        raise ValueError(f"{model_file} holds a frozen head: give its encoder (--encoder or --random)")
    if isinstance(encoder, SimclrEncoder):
        return AxialProbe(encoder.eval(), Head.from_arrays(saved, head)).eval()
    return FrozenProbe(encoder.eval(), Head.from_arrays(saved, head), inputs=2).eval()


def reads(model: nn.Module) -> str:
    """What ``model`` reads (a key of :data:`INPUTS`): "disc" for the disc classifier (its own network, or a head on
    its trunk's pooled maps), "axial" for a head on a simclr encoder's slice features, else "bodies"."""
    if isinstance(model, (DiscClassifier, PooledDiscProbe)):
        return "disc"
    return "axial" if isinstance(model, AxialProbe) else "bodies"


def explained_layers(model: nn.Module) -> nn.Module:
    """The module holding the layer a model's maps are taken from (:func:`layer_module`): Conv1-Conv5, or the simclr
    encoder's ResNet."""
    return model if isinstance(model, DiscClassifier) else model.encoder


def explain(model: nn.Module, encoder: Encoder | DiscClassifier | SimclrEncoder, upper: torch.Tensor,
            lower: torch.Tensor | None = None, layer: str = "conv5", binary: bool = False) -> dict[str, torch.Tensor]:
    """Grad-CAM of a batch of disc samples, read as K = 2 volumes (``upper`` and ``lower``, the bodies: ``model(upper,
    lower)``) or K = 1 (``upper`` alone, the disc volume: ``model(upper)``, ``lower`` None): :func:`explain_inputs`."""
    return explain_inputs(model, encoder, [upper] if lower is None else [upper, lower], layer, binary)


def explain_inputs(model: nn.Module, encoder: Encoder | DiscClassifier | SimclrEncoder,
                   volumes: list[torch.Tensor], layer: str = "conv5", binary: bool = False) -> dict[str, torch.Tensor]:
    """Grad-CAM of a batch of disc samples read as the K inputs ``volumes`` (each ``(n, ...)``: the disc volume, K = 1;
    the two bodies, K = 2; a simclr model's axial slices, K = 3): ``model(*volumes)``, which must pass them through
    the layer as one batch, input 1 of every sample first; ``encoder`` holds the layer (:func:`layer_module`).
    Returns ``logits`` ``(n, classes)``, ``target`` ``(n,)`` (the predicted class's index, the output standard
    Grad-CAM explains), ``cam`` and ``hou`` ``(n, K, *spatial)`` (input k as given; ``cam``: each input's map with
    its own channel weights, divided by the maximum over the sample's K inputs; ``hou`` of the output
    :func:`hou_target` gives for a ``binary`` task or not, the K inputs Hou's K maps, NaN for a sample without a
    map) and ``hou_made`` ``(n,)`` (which samples have a Hou map)."""
    n = len(volumes[0])
    with capture(layer_module(encoder, layer)) as seen:
        logits = model(*volumes)
    if len(seen) != 1:
        raise RuntimeError(f"expected one pass through {layer}, saw {len(seen)}")
    acts = seen[0]
    target = logits.detach().argmax(1)
    score = logits.gather(1, target[:, None]).sum()
    y, made = hou_target(logits, binary)
    grads, = torch.autograd.grad(score, acts, retain_graph=binary)
    # multi-class: y is the predicted class's logit, the gradient standard Grad-CAM already took
    hou_grads = torch.autograd.grad(y.sum(), acts)[0] if binary else grads
    # (K n, C, ...) -> (n, K, C, ...): the layer saw the K inputs one after the other (the upper bodies, then the
    # lower ones; slice 1 of every disc, then slice 2, ...)
    split = lambda t: torch.stack(t.detach().chunk(len(volumes)), dim=1)
    acts, grads, hou_grads = split(acts), split(grads), split(hou_grads)
    cam = grad_cam(acts.flatten(0, 1), grads.flatten(0, 1)).view(n, len(volumes), *acts.shape[3:])
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(n, *[1] * (cam.dim() - 1))
    hou = torch.stack([_hou_sample(a, g) for a, g in zip(acts, hou_grads)])
    hou[~made] = float("nan")
    return {"logits": logits.detach(), "target": target, "cam": cam, "hou": hou, "hou_made": made}


def _hou_sample(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One sample's Hou maps: ``(V, C, *spatial)`` (V inputs: 1, the disc, 2, the bodies, or 3, the axial slices) ->
    ``(V, *spatial)``; with a slice axis every slice of every volume is one of the K maps."""
    if acts.dim() == 4:                                       # (V, C, h, w): K = V inputs
        return hou_cam(acts, grads)
    k = acts.shape[0] * acts.shape[2]                         # (V, C, s, h, w): K = V x s slices
    a = acts.permute(0, 2, 1, 3, 4).reshape(k, acts.shape[1], *acts.shape[3:])
    g = grads.permute(0, 2, 1, 3, 4).reshape(k, acts.shape[1], *acts.shape[3:])
    return hou_cam(a, g).view(acts.shape[0], acts.shape[2], *acts.shape[3:])


def siamese_pair_cam(encoder: Encoder, a: torch.Tensor, b: torch.Tensor,
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


def explained_samples(predictions_file: Path, masks: Path) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The probe job's test samples, in the masks' order (column ``has_mask``; ``label`` the job's, in its classes),
    their masks ``(n, K, S, H, W)``, and what the masks were cut for: "disc" (K = 1, the disc volume; column ``row``
    of discs.npy), "bodies" (K = 2; columns ``upper`` and ``lower`` of vertebrae.npy) or "axial" (K = 3 slices of
    S = 1; column ``row`` of axial.npy, stages/axial_masks.py)."""
    predictions = pd.read_parquet(predictions_file)
    store = np.load(masks)
    table = pd.DataFrame({k.removeprefix("sample_"): store[k] for k in store.files if k.startswith("sample_")})
    table["has_mask"] = store["has_mask"]
    disc_input = str(store["disc_input"]) if "disc_input" in store else ("disc" if "row" in table else "bodies")
    if disc_input not in INPUTS:
        raise ValueError(f"{masks}: unknown disc_input {disc_input!r} (known: {sorted(INPUTS)})")
    columns, parts = INPUTS[disc_input]
    missing = [f"sample_{c}" for c in columns if c not in table]
    if missing or store["masks"].ndim != 5 or store["masks"].shape[1] != len(parts):
        raise ValueError(f"{masks}: masks cut for the {disc_input} input need the columns "
                         f"{[f'sample_{c}' for c in columns]} and masks (n, {len(parts)}, S, H, W); missing "
                         f"{missing}, masks {store['masks'].shape}")
    tested = set(zip(predictions.scan_id, predictions.level))
    keep = np.array([(s, lv) in tested for s, lv in zip(table.scan_id, table.level)], dtype=bool)
    table = table[keep].reset_index(drop=True)
    if "label" in predictions:   # the job's label: a grade in its classes (probes.grade_classes), as it predicts
        label_of = dict(zip(zip(predictions.scan_id, predictions.level), predictions.label))
        table["label"] = [label_of[(s, lv)] for s, lv in zip(table.scan_id, table.level)]
    return table, store["masks"][keep], disc_input


def sample_inputs(array: np.ndarray, part: pd.DataFrame, read_as: str) -> list[torch.Tensor]:
    """The K inputs of the samples ``part`` (rows of the masks' table) from ``array``: one ``(n, S, H, W)`` volume per
    row column (the disc volume; the upper and the lower body), or for the axial slices, each of a row's K slices as
    an input ``(n, 1, H, W)``."""
    columns, _ = INPUTS[read_as]
    views = [torch.from_numpy(np.asarray(array[part[c].to_numpy()], dtype=np.float32)) for c in columns]
    if read_as == "axial":
        return [views[0][:, k:k + 1] for k in range(views[0].shape[1])]
    return views


def input_size(array: np.ndarray, read_as: str) -> tuple[int, int, int]:
    """(slices, rows, columns) of each input: a volume of ``array``, or one axial slice (1, Ha, Wa)."""
    return (1, *array.shape[2:]) if read_as == "axial" else tuple(array.shape[1:])


def run(model_name: str, job: ProbeJob, masks: Path, volumes: Path, out: Outputs, layer: str,
        encoder: Encoder | SimclrEncoder | None, batch_size: int = 16, examples: int = 6,
        trunk: Path | None = None, disc_input: str | None = None) -> dict[str, Any]:
    """Explain ``job``'s model on its test samples. ``masks``: disc_masks.npz (or axial_masks.npz), which says what a
    sample is read as (the disc volume, the two bodies, or the axial slices); ``volumes``: the array its rows index
    (extract/discs.npy, vertebrae.npy or axial.npy; ``disc_input``, when given, must agree with the masks). A frozen
    encoder's model needs ``trunk`` (the disc classifier's Conv1-Conv5, disc_trunk.npz) on the disc volume,
    ``encoder`` on the bodies, the simclr encoder on the axial slices."""
    seeds.seed_torch(seeds.GRADCAM)
    task = json.loads(job.metrics.read_text())["task"]
    if task not in TASKS:
        raise ValueError(f"{job.metrics}: unknown task {task!r} (tasks: {sorted(TASKS)})")
    binary = TASKS[task].binary
    hou_for = ("positive predictions, y = z1 - z0 (the pre-sigmoid logit of Hou's binary classifier)" if binary
               else "every sample, y = the predicted class's logit")
    samples, disc_masks, read_as = explained_samples(job.predictions, masks)
    if disc_input is not None and disc_input != read_as:
        raise ValueError(f"{masks} was cut for the {read_as} input but the volumes given are the {disc_input} "
                         f"({volumes}): make the masks with stages.disc_masks --disc-input {disc_input}")
    disc = read_as == "disc"
    columns, parts = INPUTS[read_as]
    if read_as == "axial" and not isinstance(encoder, SimclrEncoder):
        raise ValueError(f"{masks} was cut for the axial slices: give the simclr encoder their features came from")
    head = explained_head(job.model, disc)
    model = load_model(job.model, encoder, "linear" if head == "network" else head, trunk if disc else None)
    shown_layer = f"resnet.{RESNET_LAYERS[layer]}" if read_as == "axial" else layer
    facts = {"model": model_name, "head": head, "input": INPUT_NAMES[read_as], "layer": shown_layer, "task": task}
    for path in (out.scores, out.maps, out.summary):
        path.parent.mkdir(parents=True, exist_ok=True)
    if model is None:
        note = "the job's training labels had one class: it predicts that class, no model to explain"
        log.warning("%s: %s", model_name, note)
        pd.DataFrame(columns=SCORE_COLUMNS).to_csv(out.scores, index=False)
        nothing = np.zeros((0, len(parts), 1, 1, 1))
        save_npz(out.maps, cam=np.zeros(0), hou=np.zeros(0), cam_up=nothing, hou_up=nothing, inputs=nothing,
                 parts=np.array(parts), hou_map=np.zeros(0, bool), task=task)
        summary = {**facts, "samples": 0, "samples_hou": 0, "hou_maps_for": hou_for, "note": note,
                   **{k: None for k in SCORE_KEYS}}
        out.summary.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    if reads(model) != read_as:
        raise ValueError(f"{job.model} holds a model of the {INPUT_NAMES[reads(model)]} but {masks} was cut for the "
                         f"{read_as} input: were they made with another probes.disc_input?")
    enc = explained_layers(model)
    if samples.empty:
        raise ValueError(f"none of the test samples of {job.predictions} is in {masks}: were they made for another "
                         "task?")
    if not samples.has_mask.any():
        log.warning("no test sample has a label map: the maps are drawn, the attention score is undefined")
    array = np.load(volumes, mmap_mode="r")
    size = input_size(array, read_as)
    if size != tuple(disc_masks.shape[2:]):
        raise ValueError(f"{volumes} holds inputs of {size} (slices, rows, columns) but the masks of {masks} are "
                         f"{tuple(disc_masks.shape[2:])}: cut with another crop size (extract.disc_size, "
                         "vertebra_size or axial_size)?")
    # the examples drawn: samples with a mask first (the disc's outline is drawn over them)
    samples = pd.concat([samples[samples.has_mask], samples[~samples.has_mask]])
    disc_masks = disc_masks[samples.index.to_numpy()]
    samples = samples.reset_index(drop=True)
    rows, kept = [], {"cam": [], "hou": [], "cam_up": [], "hou_up": [], "inputs": []}
    for start in range(0, len(samples), batch_size):
        part = samples.iloc[start:start + batch_size]
        views = sample_inputs(array, part, read_as)
        result = explain_inputs(model, enc, views, layer=layer, binary=binary)
        mask = torch.from_numpy(disc_masks[start:start + batch_size].astype(np.float32))
        n, k = len(part), len(views)
        cam_up = upsample(result["cam"].flatten(0, 1), size).view(n, k, *size)
        hou_up = upsample(result["hou"].flatten(0, 1), size).view(n, k, *size)
        known = torch.from_numpy(part.has_mask.to_numpy(dtype=bool).copy())
        made = result["hou_made"]
        nan = torch.tensor(float("nan"))
        share_cam = torch.where(known, inside_share(cam_up, mask), nan)
        share_hou = torch.where(known & made, inside_share(hou_up, mask), nan)   # no Hou map: no Hou score
        uniform = torch.where(known, mask.flatten(1).mean(1), nan)               # the disc's share of the input
        for i, sample in enumerate(part.itertuples()):
            rows.append({"scan_id": sample.scan_id, "level": sample.level, "label": int(sample.label),
                         "predicted_index": int(result["target"][i]), "hou_map": bool(made[i]),
                         "inside_disc": float(share_cam[i]), "inside_disc_hou": float(share_hou[i]),
                         "disc_share_of_volume": float(uniform[i])})
        kept["cam"].append(result["cam"].numpy())
        kept["hou"].append(result["hou"].numpy())
        if sum(len(x) for x in kept["cam_up"]) < examples:
            kept["cam_up"].append(cam_up[:examples].numpy().astype(np.float16))
            kept["hou_up"].append(hou_up[:examples].numpy().astype(np.float16))
            kept["inputs"].append(torch.stack(views, 1)[:examples].numpy().astype(np.float16))
    scores = pd.DataFrame(rows)
    classes = np.load(job.model)["classes"]
    scores["predicted"] = classes[scores.pop("predicted_index").to_numpy()]
    if int(np.prod(kept["cam"][0].shape[2:])) == 1:
        log.warning("%s's map is 1 x 1 at this crop size: it holds no spatial information (try the layer conv3, or "
                    "larger crops)", layer)
    with_mask = scores[samples.has_mask.to_numpy()]
    # an all-zero map (every weighted channel below 0) has no attention to measure. Each variant's averages are over
    # its own samples, those with a label map and a non-empty map of that variant, the uniform share over the same
    # ones; Hou et al.'s, in a binary task, only the positive predictions (the samples with a Hou map)
    scored = with_mask.dropna(subset=["inside_disc"])
    with_hou = with_mask[with_mask.hou_map]
    scored_hou = with_hou.dropna(subset=["inside_disc_hou"])

    def mean(frame: pd.DataFrame, column: str) -> float | None:
        return float(frame[column].mean()) if len(frame) else None

    summary = {**facts, "map_size": list(kept["cam"][0].shape[2:]),
               "samples": len(scored), "without_label_map": int((~samples.has_mask).sum()),
               "empty_maps": int(len(with_mask) - len(scored)), "inside_disc": mean(scored, "inside_disc"),
               "disc_share_of_volume": mean(scored, "disc_share_of_volume"), "hou_maps_for": hou_for,
               "samples_hou": len(scored_hou), "without_hou_map": int((~scores.hou_map).sum()),
               "empty_maps_hou": int(len(with_hou) - len(scored_hou)),
               "inside_disc_hou": mean(scored_hou, "inside_disc_hou"),
               "disc_share_of_volume_hou": mean(scored_hou, "disc_share_of_volume")}
    scores = scores[SCORE_COLUMNS]
    scores.to_csv(out.scores, index=False)
    shown = samples.iloc[:examples]
    save_npz(out.maps, cam=np.concatenate(kept["cam"]), hou=np.concatenate(kept["hou"]),
             cam_up=np.concatenate(kept["cam_up"])[:examples], hou_up=np.concatenate(kept["hou_up"])[:examples],
             inputs=np.concatenate(kept["inputs"])[:examples], parts=np.array(parts),
             **{c: shown[c].to_numpy() for c in columns}, masks=disc_masks[:examples],
             has_mask=shown.has_mask.to_numpy(), hou_map=scores.hou_map.to_numpy(dtype=bool)[:examples],
             scan_id=shown.scan_id.to_numpy().astype(str), level=shown.level.to_numpy().astype(str),
             label=shown.label.to_numpy(), predicted=scores.predicted.to_numpy()[:examples], task=task,
             head=np.array(head))
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    if len(scored):
        log.info("%s (%s head, %s): %d test samples; attention inside the disc %.3f (Grad-CAM), uniform %.3f",
                 model_name, head, facts["input"], len(scored), summary["inside_disc"],
                 summary["disc_share_of_volume"])
    if len(scored_hou):
        log.info("%s: Hou et al. on %d test samples (%s): inside the disc %.3f, uniform %.3f", model_name,
                 len(scored_hou), hou_for, summary["inside_disc_hou"], summary["disc_share_of_volume_hou"])
    elif binary:
        log.warning("%s: no test sample with a label map has a non-empty Hou et al. map (in this binary task only the "
                    "positive predictions get one): no Hou et al. score", model_name)
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


def explain_pairs(encoder: Encoder, bodies: np.ndarray, distances: pd.DataFrame, layer: str,
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
                   help="disc_masks.npz of stages.disc_masks, or axial_masks.npz of stages.axial_masks (the test "
                        "samples' disc masks, cut for the input the model reads).")
    array = p.add_mutually_exclusive_group(required=True)
    array.add_argument("--discs", type=cli.existing_file,
                       help="extract/discs.npy: the model reads the disc volume (probes.disc_input: disc).")
    array.add_argument("--vertebrae", type=cli.existing_file,
                       help="extract/vertebrae.npy: the model reads the two bodies around the disc "
                            "(probes.disc_input: bodies).")
    array.add_argument("--axial", type=cli.existing_file,
                       help="axial/slices.npy (or extract/axial.npy): the model reads a disc's 3 axial slices (a simclr encoder, --encoder, "
                            "and its linear head).")
    p.add_argument("--disc-trunk", type=cli.existing_file,
                   help="--discs, frozen encoder: the disc_features stage's disc_trunk.npz (the disc classifier's "
                        "Conv1-Conv5; its transfer head, FC6-FC8, is in --model-file).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--encoder", type=cli.existing_file, help="--vertebrae or --axial, frozen probe: the "
                                                                  "encoder.pt its features came from.")
    which.add_argument("--random", action="store_true", help="--vertebrae: frozen probe of the random encoder (the "
                                                              "floor).")
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
    p.add_argument("--vertebrae", type=cli.existing_file, required=True,
                   help="extract/vertebrae.npy (the body volumes the encoder reads).")
    p.add_argument("--pair-examples", type=cli.positive_int, default=3,
                   help="reports.pair_examples: positive (and as many negative) pairs explained (default 3).")
    p.add_argument("--out", type=Path, required=True, help="Output: pairs.npz.")
    common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "probe" and args.discs is not None and (args.encoder is not None or args.random):
        parser.error("--encoder and --random are for --vertebrae: on the disc volume a frozen encoder's "
                     "convolutions are in --disc-trunk")
    if args.what == "probe" and args.discs is None and args.disc_trunk is not None:
        parser.error("--disc-trunk is for --discs (the disc classifier); on the bodies give --encoder or --random, "
                     "on the axial slices --encoder")
    if args.what == "probe" and args.axial is not None and args.encoder is None:
        parser.error("--axial needs --encoder: the simclr encoder.pt whose slice features the probe read")
    cli.setup_logging(args.log, "gradcam")
    torch.set_num_threads(args.threads)
    if args.what == "pairs":
        encoder, _ = load_encoder(args.encoder)
        explain_pairs(encoder, np.load(args.vertebrae, mmap_mode="r"), pd.read_parquet(args.distances), args.layer,
                      args.out, args.pair_examples)
        return 0
    encoder: Encoder | SimclrEncoder | None = None
    if args.axial is not None:
        encoder, _ = load_simclr_encoder(args.encoder)
    elif args.encoder is not None:
        encoder, _ = load_encoder(args.encoder)
    elif args.random:
        shape = tuple(np.load(args.vertebrae, mmap_mode="r").shape[1:])
        encoder = random_encoder(shape, args.seed, args.width, args.embedding_dim)
    disc_input, volumes = next((name, path) for name, path in (("disc", args.discs), ("bodies", args.vertebrae),
                                                                 ("axial", args.axial)) if path is not None)
    run(args.model, ProbeJob(args.metrics, args.predictions, args.model_file), args.masks, volumes,
        Outputs(args.scores, args.maps, args.summary), args.layer, encoder, trunk=args.disc_trunk,
        disc_input=disc_input)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
