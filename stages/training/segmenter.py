"""The segmentation downstream's data and training (Cao et al. 2022, Table 2, on spine anatomy): each lumbar region's
mid-sagittal stack (the trunk's slices, ``stride`` voxels apart, through the middle of the region, each slice resized
to ``size``) and the label map of its middle slice (nearest voxel) in three classes: background, vertebra, disc;
a :class:`stages.nets.segmenter.TrunkUNet` trained on it end to end with MONAI's Dice + cross-entropy loss and Adam,
for a fixed number of epochs (no validation part: the demo's is a handful of subjects), one network per label subset
and seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stages.core import seeds
from stages.core.config import section_config
from stages.core.levels import DISC_LABELS, TRANSITIONAL_L6, VERTEBRA_LABELS
from stages.nets.segmenter import TrunkUNet
from stages.training.clips import ClipSpec, cut_clips

CLASSES = {"vertebra": 1, "disc": 2}    # (0: background; VerSe maps label whole vertebrae)
VERTEBRA_VALUES = (*VERTEBRA_LABELS.values(), TRANSITIONAL_L6)


@dataclass(frozen=True)
class SegmentationConfig:
    """The ``segmentation`` section of the config (see its schema)."""

    run: bool = True
    label_fractions: tuple[float, ...] = (0.1, 0.3, 0.7, 1.0)
    seeds: int = 1
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    decoder_channels: tuple[int, ...] = (64, 32, 16, 16, 16)
    size: tuple[int, int] = (64, 64)
    stride: int = 1
    bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0
    threads: int = 1

    @classmethod
    def from_config(cls, section: dict | None = None) -> SegmentationConfig:
        return section_config(cls, "segmentation", section)


def classes_of(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """VerSe labels -> 0 background, 1 vertebra (T12 ... S1, and a sixth lumbar vertebra), 2 disc."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.int64)
    out[np.isin(labels, VERTEBRA_VALUES)] = CLASSES["vertebra"]
    out[np.isin(labels, list(DISC_LABELS.values()))] = CLASSES["disc"]
    return out


def mid_sagittal(regions: np.ndarray, labels: np.ndarray | None, slices: int, cfg: SegmentationConfig
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inputs ``(n, slices, H, W)`` (float) and the classes of their middle slice ``(n, H, W)`` (or None) of
    ``regions`` and their ``labels`` ``(n, SI, AP, LR)``: the sagittal stack through each region's middle voxel."""
    spec = ClipSpec(slices=slices, long_stride=cfg.stride, short_stride=cfg.stride, size=tuple(cfg.size))
    spec.check_fits(regions.shape[1:])
    x = torch.from_numpy(np.asarray(regions, dtype=np.float32))
    centres = torch.tensor([[(n - 1) // 2 for n in regions.shape[1:]]] * len(regions), dtype=torch.long)
    stacks = cut_clips(x, centres, "sagittal", cfg.stride, spec)
    if labels is None:
        return stacks, None
    truth = cut_clips(torch.from_numpy(np.asarray(labels, dtype=np.float32)), centres, "sagittal", cfg.stride, spec,
                      mode="nearest")[:, (slices - 1) // 2]
    return stacks, torch.from_numpy(classes_of(truth.round().long().numpy()))


def nested_subsets(subjects: list[str], fractions: tuple[float, ...], seed: int) -> dict[float, list[str]]:
    """For each fraction, the first ceil(fraction x n) (at least two: batch normalisation needs a pair) of the
    ``subjects`` in an order drawn with ``seed``: each subset holds every smaller one."""
    order = list(np.random.default_rng(seed).permutation(sorted(subjects)))
    return {f: sorted(order[:max(2, math.ceil(f * len(order)))]) for f in fractions}


def fit(net: TrunkUNet, x: torch.Tensor, y: torch.Tensor, cfg: SegmentationConfig, seed: int) -> list[float]:
    """Train ``net`` end to end on stacks ``x`` and classes ``y`` (Dice + cross-entropy, Adam); the mean loss of
    each epoch."""
    from monai.losses import DiceCELoss

    if len(x) < 2:
        raise ValueError(f"{len(x)} training stack(s): the network's batch normalisation needs at least 2 (a label "
                         "subset of at least two scans)")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = seeds.generator(seed)
    history = []
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(x), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            if len(batch) < 2:   # batch norm needs two samples: a last lone one sits this epoch out (drawn anew)
                continue
            optimiser.zero_grad()
            loss = loss_fn(net(x[batch]), y[batch].unsqueeze(1))
            loss.backward()
            optimiser.step()
            total, seen = total + float(loss.detach()) * len(batch), seen + len(batch)
        history.append(total / seen if seen else float("nan"))
    return history


@torch.no_grad()
def predict(net: TrunkUNet, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """The class of every pixel of each stack's middle slice ``(n, H, W)``."""
    net.eval()
    return np.concatenate([net(x[i:i + batch_size]).argmax(1).numpy() for i in range(0, len(x), batch_size)]) \
        if len(x) else np.zeros((0, *x.shape[2:]), np.int64)
