"""Pretraining method ``simclr``: Hou et al. 2023, SimCLR on the axial slices through each disc.

A sample is one axial slice of a disc (every slice of the ``axial`` array, rows aligned with the discs; a disc whose
slices are blank, as a crop-table cohort's are, is left out). Two views of each slice are drawn on the device with
their coupled rotation and crop (stages/training/slice_views.py), pass through the 2D ResNet and the four FC blocks
(stages/nets/simclr.py), and the NT-Xent loss with the inner product (stages/training/ntxent.py) pulls them together
against the other views of the global batch. Optimiser and stopping rule are the paper's (their Table 1): Adam with
L2 weight decay, and training stops when the validation top-1 (the share of views whose positive ranks first among
the batch) has not improved for ``patience`` epochs; the epoch with the best validation top-1 is handed on.

Settings: the config's ``simclr`` section (:class:`SimclrConfig`); of the ``pretrain`` section it uses the seed,
device, bf16, threads, gpus and the runtime keys. Validation and pretext test batches see fixed views
(stages/core/seeds.py ``evaluation_views``), so their top-1 compares across epochs and networks.

Pretext evaluation: top-1 and loss on the self-supervision test part's slices, in batches of ``batch_size`` images,
for the trained network and for the same seed's untrained one (the floor).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from stages.core import seeds
from stages.nets.simclr import SimclrNet, SimclrSpec
from stages.training.config import PretrainConfig
from stages.training.ntxent import NTXentLoss
from stages.training.protocol import AugmentDraw, handed_on
from stages.training.slice_views import ViewRanges, make_views, sample_view_params
from stages.training.store import VolumeStore

log = logging.getLogger("pretrain.simclr")


@dataclass(frozen=True)
class SimclrConfig:
    """The config's ``simclr`` section (see its schema). Defaults: Hou et al. 2023's Table 1 and eqs. 9-15."""

    depth: int = 50
    widen_factor: float = 1.0
    norm: str = "batch"
    fc_units: int = 256
    fc_blocks: int = 4
    dropout: float = 0.0
    temperature: float = 100.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_epochs: int = 100
    patience: int = 3
    centre_sigma: float = 0.1
    rotation_deg: float = 18.0
    crop_min_area: float = 0.1
    crop_aspect: tuple[float, float] = (0.75, 4 / 3)
    crop_tries: int = 100
    flip_p: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.05

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SimclrConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def view_ranges(self) -> ViewRanges:
        names = {f.name for f in dataclasses.fields(ViewRanges)}
        return ViewRanges(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def spec(self, height: int, width_px: int) -> SimclrSpec:
        return SimclrSpec(height=height, width_px=width_px, depth=self.depth, widen_factor=self.widen_factor,
                          norm=self.norm, fc_units=self.fc_units, fc_blocks=self.fc_blocks, dropout=self.dropout)


def slice_samples(store: VolumeStore, part: str) -> np.ndarray:
    """The (row, slice) of every non-blank axial slice of the discs of self-supervision part ``part`` the store
    allows, ``(n, 2)`` int64, in row order."""
    table = store.table
    rows = table.index[(table.ssl_part == part).to_numpy() & store.allowed[table.index]].to_numpy(dtype=np.int64)
    if not len(rows):
        return np.zeros((0, 2), dtype=np.int64)
    slices = store.load(rows)                                   # (n, K, H, W)
    keep = slices.reshape(*slices.shape[:2], -1).std(-1) > 1e-6
    r, k = np.nonzero(keep)
    return np.stack([rows[r], k], 1).astype(np.int64)


class SimclrMethod:
    """SimCLR on axial disc slices (see the module's docstring)."""

    name = "simclr"
    section = "simclr"
    uses_pairs = False
    columns = ("loss", "top1")
    watch = ("top1", "max")
    volumes_per_sample = 2          # two views per slice: an evaluation batch of eval_batch_size views
    unit = "slices"

    @classmethod
    def configure(cls, cfg: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
        """The harness's settings for this method: the section's batch, Adam with its learning rate and L2 weight
        decay, its patience (one plateau ends training: lr_drops 0), no gradient clipping, the axial slices, and
        evaluation batches of the training batch's size (top-1 depends on how many negatives a batch holds)."""
        sc = SimclrConfig.from_values(values)
        return dataclasses.replace(
            cfg, structure="axial", optimiser="adam", batch_size=sc.batch_size, learning_rate=sc.learning_rate,
            weight_decay=sc.weight_decay, max_epochs=sc.max_epochs, plateau_patience=sc.patience, lr_drops=0,
            grad_clip=0.0, dropout=sc.dropout, eval_batch_size=2 * sc.batch_size,
            method_config={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(sc).items()})

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.cfg = cfg
        self.sc = SimclrConfig.from_values(cfg.method_config)
        _, height, width_px = store.shape
        self.spec = self.sc.spec(height, width_px)
        self.model = SimclrNet(self.spec)          # first: the initial weights are the seed's
        self.store = store
        self.samples = {part: slice_samples(store, part) for part in ("train", "val")}
        if not len(self.samples["train"]):
            raise ValueError(f"nothing to pretrain on: the self-supervision training part has no axial disc slices "
                             f"among {len(store.table)} discs (a crop-table cohort has none; see "
                             "results/localise/flags.csv for scans that were skipped)")
        self.loss_fn = NTXentLoss(self.sc.temperature)
        self.ranges = self.sc.view_ranges()

    def n_samples(self, part: str) -> int:
        return len(self.samples[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return load_slices(self.store, self.samples[part], idx)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, top1, n = view_loss(model, self.loss_fn, self.ranges, batch, draw)
        return loss, {"images": n, "loss": float(loss.detach()) * n, "top1": float(top1) * 2 * n, "views": 2 * n}

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss per image, top-1 per view."""
        images = sums.get("images", 0.0)
        return {"loss": sums.get("loss", 0.0) / images if images else float("nan"),
                "top1": sums.get("top1", 0.0) / sums["views"] if sums.get("views") else float("nan"),
                "samples": images}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss'] / max(stats['images'], 1):.4f}",
                "top1": f"{stats['top1'] / max(stats['views'], 1):.3f}"}

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f}, top-1 {row['top1']:.3f}"

    def encoder_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """One row per test slice (row, slice, level, and whether each view's positive ranked first, for the
        trained and the untrained network) and the figures: top-1 and loss of both, the slices and batch size."""
        config = checkpoint["identity"]["config"]
        sc = SimclrConfig.from_values(config["method_config"])
        spec = SimclrSpec(**checkpoint["encoder_spec"])
        trained = SimclrNet(spec)
        trained.load_state_dict(handed_on(checkpoint))
        seeds.seed_torch(seeds.initial_weights(config["seed"]))   # as pretraining built it
        untrained = SimclrNet(spec)
        samples = slice_samples(store, "test")
        ranges, loss_fn = sc.view_ranges(), NTXentLoss(sc.temperature)
        table = pd.DataFrame({"row": samples[:, 0], "slice": samples[:, 1],
                              "level": [store.levels[i] for i in store.level[samples[:, 0]]]})
        figures: dict[str, Any] = {"test_slices": len(samples), "batch_images": sc.batch_size}
        for name, net in (("trained", trained), ("untrained", untrained)):
            correct, losses = evaluate_views(net, loss_fn, ranges, store, samples, sc.batch_size)
            table[f"{name}_view1_top1"], table[f"{name}_view2_top1"] = correct[:, 0], correct[:, 1]
            figures[name] = {"top1": float(correct.mean()) if len(correct) else None,
                             "loss": float(np.mean(losses)) if losses else None}
        log.info("%d test slices: top-1 %s (untrained %s)", len(samples), figures["trained"]["top1"],
                 figures["untrained"]["top1"])
        figures["paper"] = None   # Hou et al. report no pretext figure
        return table, figures


def load_slices(store: VolumeStore, samples: np.ndarray, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Slices ``samples[idx]`` as ``x`` (m, H, W) and their sample indices ``idx`` (evaluation views are seeded by
    the first)."""
    chosen = samples[idx]
    volumes = store.load(chosen[:, 0])
    x = volumes[np.arange(len(chosen)), chosen[:, 1]]
    return {"x": torch.from_numpy(np.ascontiguousarray(x)), "idx": torch.from_numpy(np.asarray(idx, np.int64))}


def view_loss(model: nn.Module, loss_fn: NTXentLoss, ranges: ViewRanges, batch: dict[str, torch.Tensor],
              draw: AugmentDraw | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The loss and top-1 of a batch's two views, and its image count. Training (``draw``): the views are drawn for
    the global batch and this process keeps its share; the negatives come from every process. Evaluation: fixed
    views of this batch alone."""
    x = batch["x"]
    n, h, w = x.shape
    if draw is not None:
        params = sample_view_params(draw.n_global, (w, h), ranges, draw.generator).take(draw.mine)
    else:
        generator = seeds.generator(seeds.evaluation_views(int(batch["idx"][0])) if len(x) else 0, x.device)
        params = sample_view_params(n, (w, h), ranges, generator)
    a, b = make_views(x, params, ranges)
    z = model(torch.cat([a, b]))              # one pass: batch statistics over both views
    distributed = draw is not None and dist.is_available() and dist.is_initialized()
    loss, top1 = loss_fn(z[:n], z[n:], gather_views=distributed)
    return loss, top1, n


@torch.no_grad()
def evaluate_views(model: nn.Module, loss_fn: NTXentLoss, ranges: ViewRanges, store: VolumeStore,
                   samples: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[float]]:
    """Whether each view's positive ranks first among its batch ``(n, 2)``, and each batch's loss, under the fixed
    evaluation views, in batches of ``batch_size`` slices."""
    model.eval()
    correct = np.zeros((len(samples), 2), dtype=bool)
    losses = []
    for start in range(0, len(samples), batch_size):
        idx = np.arange(start, min(start + batch_size, len(samples)))
        if len(idx) < 2:
            continue   # one image has no negatives
        batch = load_slices(store, samples, idx)
        x = batch["x"]
        n, h, w = x.shape
        params = sample_view_params(n, (w, h), ranges, seeds.generator(seeds.evaluation_views(int(idx[0]))))
        a, b = make_views(x, params, ranges)
        z = model(torch.cat([a, b])).float()
        za, zb = z[:n], z[n:]
        loss, _ = loss_fn(za, zb)
        losses.append(float(loss))
        sim = torch.cat([za, zb]) @ torch.cat([za, zb]).T
        sim.fill_diagonal_(float("-inf"))
        positive = (torch.arange(2 * n) + n) % (2 * n)
        hit = (sim.argmax(1) == positive).numpy()
        correct[idx, 0], correct[idx, 1] = hit[:n], hit[n:]
    return correct, losses
