"""The SimCLR encoder of Hou et al. 2023 (section 2.2, Fig. 4): a 2D ResNet on one axial slice followed by four fully
connected blocks of 256 units (FC, dropout, ReLU; no ReLU after the fourth). Pretraining trains all of it with the
NT-Xent loss (stages/training/ntxent.py); afterwards the feature of a slice is the first block's output, and their
herniation head reads the features of a disc's three central slices concatenated (3 x 256).

The ResNet is MONAI's (``monai.networks.nets.ResNet``, 2D, one input channel, its global average pool as the output:
``feed_forward=False``), so no ResNet is written here: depth 50 is the paper's ResNet-50 (bottleneck blocks 3-4-6-3),
18 and 34 are basic-block ResNets, and 10 (basic blocks 1-1-1-1) is the demo's. ``widen_factor`` scales the channels
(64-128-256-512 at 1.0). The stem is ImageNet's (7x7 convolution at stride 2, then max pooling).

Shapes: a slice batch is ``(N, H, W)`` or ``(N, 1, H, W)``; :meth:`SimclrEncoder.forward` gives the first block's
features ``(N, fc_units)``, :meth:`SimclrNet.forward` the fourth block's output ``(N, fc_units)``, the vector the loss
compares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core import seeds
from stages.nets.norms import with_norm

# MONAI's ResNet layouts by depth: (block, layers); the channels per stage are 64-128-256-512 x widen_factor
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
}
CHANNELS = (64, 128, 256, 512)
NORMS = ("batch", "group", "instance")


@dataclass(frozen=True)
class SimclrSpec:
    """What rebuilds the encoder (saved beside its weights in ``encoder.pt``): the ResNet's depth, width and
    normalisation, the FC blocks' units, count and dropout, and the slice size it was trained on."""

    height: int
    width_px: int
    depth: int = 50
    widen_factor: float = 1.0
    norm: str = "batch"
    fc_units: int = 256
    fc_blocks: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        if self.widen_factor <= 0:
            raise ValueError(f"widen_factor must be > 0, got {self.widen_factor}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.fc_units < 1 or self.fc_blocks < 1:
            raise ValueError(f"fc_units and fc_blocks must be >= 1, got {self.fc_units} and {self.fc_blocks}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if min(self.height, self.width_px) < 16:
            raise ValueError(f"slices must be at least 16 x 16 pixels, got {self.height} x {self.width_px}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _norm(spec: SimclrSpec) -> str | tuple[str, dict[str, Any]]:
    """MONAI's norm argument: batch normalisation (the paper's ResNet), or a per-sample one (group: 8 groups, or
    instance), which keeps a multi-process CPU step equal to a single-process step on the same global batch."""
    if spec.norm == "group":
        return ("group", {"num_groups": 8})
    if spec.norm == "instance":   # with a scale and shift, as batch normalisation has (MONAI's init sets them)
        return ("instance", {"affine": True})
    return spec.norm


def resnet(spec: SimclrSpec) -> nn.Module:
    """MONAI's 2D ResNet of ``spec`` without its classifier: ``(N, 1, H, W)`` -> ``(N, C)`` pooled features."""
    from monai.networks.nets import ResNet  # imported here: monai's import is slow and only networks need it
    block, layers = DEPTHS[spec.depth]
    net = ResNet(block, list(layers), stage_channels(spec), spatial_dims=2, n_input_channels=1, conv1_t_size=7,
                 conv1_t_stride=2, feed_forward=False, norm=_norm(spec))
    return with_norm(net, _norm(spec), spatial_dims=2)   # MONAI normalises only the stem as ``norm`` says


def stage_channels(spec: SimclrSpec) -> list[int]:
    """The ResNet's channels per stage, 64-128-256-512 x ``widen_factor`` (multiples of 8 for group normalisation's
    8 groups)."""
    if spec.norm == "group":
        return [max(8, round(c * spec.widen_factor / 8) * 8) for c in CHANNELS]
    return [max(1, round(c * spec.widen_factor)) for c in CHANNELS]


def resnet_features(spec: SimclrSpec) -> int:
    """The length of the ResNet's pooled output: the last stage's channels (x 4 for bottleneck blocks)."""
    return stage_channels(spec)[-1] * (4 if DEPTHS[spec.depth][0] == "bottleneck" else 1)


def fc_block(n_in: int, n_out: int, dropout: float, relu: bool) -> nn.Sequential:
    """FC, dropout, ReLU (their block; the last block has no ReLU)."""
    layers: list[nn.Module] = [nn.Linear(n_in, n_out), nn.Dropout(dropout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected slices (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    return x


class SimclrEncoder(nn.Module):
    """The ResNet and the first FC block: what pretraining hands on. ``forward`` gives the feature of each slice."""

    def __init__(self, spec: SimclrSpec):
        super().__init__()
        self.spec = spec
        self.resnet = resnet(spec)
        self.fc1 = fc_block(resnet_features(spec), spec.fc_units, spec.dropout, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.resnet(_as_images(x)))


class SimclrNet(nn.Module):
    """The pretraining network: the encoder and FC blocks 2 .. ``fc_blocks`` (the projection the loss reads)."""

    def __init__(self, spec: SimclrSpec):
        super().__init__()
        self.encoder = SimclrEncoder(spec)
        n = spec.fc_blocks
        self.projection = nn.Sequential(*(fc_block(spec.fc_units, spec.fc_units, spec.dropout, relu=i < n - 1)
                                          for i in range(1, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def disc_features(encoder: SimclrEncoder, slices: torch.Tensor) -> torch.Tensor:
    """Their head's input: each disc's slices ``(N, K, H, W)`` through the encoder, concatenated ``(N, K x fc_units)``
    in slice order."""
    n, k = slices.shape[:2]
    return encoder(slices.reshape(n * k, *slices.shape[2:])).reshape(n, k * encoder.spec.fc_units)


def initial_encoder(spec: SimclrSpec, seed: int) -> SimclrEncoder:
    """The encoder at the initial weights pretraining starts from with ``seed`` (``pretrain.seed``): the untrained
    network of the pretext evaluation and the random-frozen and from-scratch baselines of the probes."""
    seeds.seed_torch(seeds.random_encoder(seed))
    return SimclrNet(spec).encoder


def load_simclr_encoder(path: Path) -> tuple[SimclrEncoder, dict[str, Any]]:
    """The encoder saved as ``encoder.pt`` by a ``simclr`` pretraining run, and what was saved with it."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("method") != "simclr":
        raise ValueError(f"{path} holds a {saved.get('method')!r} encoder, not a simclr one")
    encoder = SimclrEncoder(SimclrSpec(**saved["spec"]))
    encoder.load_state_dict(saved["state_dict"])
    return encoder.eval(), saved
