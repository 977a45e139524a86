"""Pretraining method ``mlsscl``: multi-level self-supervised contrastive learning (Cao et al. 2022), on the lumbar
regions of the scans (stages/lumbar_regions.py), and its ablations ``mlsscl_multiview`` (beta = 0) and
``mlsscl_long_short`` (alpha = 0), their Table 3.

A sample is one lumbar region of the self-supervision part. Each step draws one centre per region (for the global
batch, each process keeping its share; in evaluation, a centre seeded by the sample) and cuts four clips through it
(stages/training/clips.py): axial (v_a), coronal (v_c) and sagittal (v_s) clips of C slices ``long_stride`` voxels
apart, and a short axial clip (v_S) of C slices ``short_stride`` apart; the long axial clip is v_L.

Networks (stages/nets/momentum.py): the online encoder (a 3D backbone, ``mlsscl.backbone``: the Siamese network's
trunk or, the paper's, MONAI's 3D ResNet-18 (stages/nets/encoders.py); a 2-layer MLP projector and a 2-layer MLP
predictor) and one target encoder (trunk and projector) for all views, a momentum average of the online
one (m = ``mlsscl.momentum``), updated before each training step's forward pass; a queue of past target keys.

Loss, from the paper: L_N(v1, v2) = -E[log e^{h(v1^i, v2^i)} / sum_{j=1}^{K+1} e^{h(v1^i, v2^j)}], v1 through the
online network (the query), v2 through the target (the key), the K other keys the queue's, h = cos / tau;
L_multiview = L_N(v_a, v_c) + L_N(v_a, v_s) + L_N(v_c, v_s); L_long-short = L_N(v_S, v_L);
L = alpha L_multiview + beta L_long-short. Each step's target keys of v_c, v_s and v_L (gathered from every process,
view by view) enter the queue after its loss, so the queue holds keys of all three orientations; a queue entry of a
query's own region is left out of its negatives.

Pretext evaluation on the self-supervision test regions, trained and untrained (same seed), under fixed centres:
cross-view retrieval (each region's axial query finds its own sagittal key first among the sagittal keys of all test
regions: top-1) and long-short retrieval (its short axial query finds its own long axial key first).

The handed-on encoder is the backbone, which reads clips of (C, H, W): ``clip_slices`` and ``clip_size`` must be the
shape of the volumes the downstream stages feed it (extract.vertebra_size, or disc_size with pretrain.structure disc;
the workflow checks this at start-up).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import seeds
from stages.training.clips import ClipSpec, draw_centres, mlsscl_clips
from stages.training.config import PretrainConfig
from stages.training.infonce import gather_keys, info_nce, own_keys
from stages.training.methods.momentum import MocoConfig, MomentumMethod, unwrap
from stages.training.protocol import AugmentDraw
from stages.training.store import VolumeStore

log = logging.getLogger("pretrain.mlsscl")

MULTIVIEW = (("axial", "coronal"), ("axial", "sagittal"), ("coronal", "sagittal"))   # (query view, key view)
LONG_SHORT = ("short", "axial")                                                       # v_S, v_L


@dataclass(frozen=True)
class MlssclConfig(MocoConfig):
    """The ``mlsscl`` section: MoCo v2's defaults for what the paper does not give (m, tau, K, the MLP sizes, the
    optimiser), a predictor as BYOL's, and the clips and loss weights (see the schema for each key's reason)."""

    alpha: float = 1.0
    beta: float = 1.0
    clip_slices: int = 9
    clip_size: tuple[int, int] = (64, 64)
    long_stride: int = 2
    short_stride: int = 1
    plateau_patience: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ValueError(f"alpha and beta must be >= 0 and not both 0, got {self.alpha} and {self.beta}")
        if self.short_stride >= self.long_stride:
            raise ValueError(f"the short stride must be smaller than the long one (delta_S < delta_L), got "
                             f"{self.short_stride} and {self.long_stride}")
        self.clips()

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> MlssclConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def clips(self) -> ClipSpec:
        return ClipSpec(self.clip_slices, self.long_stride, self.short_stride, tuple(self.clip_size))


def loss_terms(model: nn.Module,
               clips: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The online queries of v_a, v_c and v_S and the target keys of v_c, v_s and v_L (= v_a): one online and one
    target pass over the clips concatenated."""
    queries, keys = ("axial", "coronal", "short"), ("coronal", "sagittal", "axial")
    q, k = model(torch.cat([clips[v] for v in queries]), torch.cat([clips[v] for v in keys]))
    n = len(clips["axial"])
    return dict(zip(queries, q.split(n))), dict(zip(keys, k.split(n)))


class MlssclMethod(MomentumMethod):
    """MLSSCL (see the module's docstring)."""

    name = "mlsscl"
    section = "mlsscl"
    settings = MlssclConfig
    predictor = True
    uses_pairs = False
    columns = ("loss", "top1", "multiview", "long_short", "long_short_top1")
    volumes_per_sample = 4      # four clips a region: an evaluation batch holds eval_batch_size clips
    unit = "regions"
    weights: ClassVar[dict[str, float]] = {}   # an ablation's fixed alpha or beta

    @classmethod
    def configure(cls, cfg: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
        cfg = super().configure(cfg, {**values, **cls.weights})
        return dataclasses.replace(cfg, structure="region", plateau_patience=cfg.method_config["plateau_patience"])

    def input_shape(self, store: VolumeStore) -> tuple[int, int, int]:
        assert isinstance(self.mc, MlssclConfig)
        self.clip_spec = self.mc.clips()
        self.clip_spec.check_fits(store.shape)
        return (self.mc.clip_slices, *self.mc.clip_size)

    def centres(self, idx: torch.Tensor, draw: AugmentDraw | None) -> torch.Tensor:
        """Training: centres drawn for the global batch, this process's share; evaluation: each sample's seeded."""
        if draw is not None:
            return draw_centres(draw.n_global, self.store.shape, self.clip_spec, draw.generator)[draw.mine]
        return torch.cat([draw_centres(1, self.store.shape, self.clip_spec, seeds.generator(
            seeds.evaluation_views(int(i)))) for i in idx]) if len(idx) else torch.zeros((0, 3), dtype=torch.long)

    def inputs(self, batch: dict[str, torch.Tensor],  # type: ignore[override]
               draw: AugmentDraw | None) -> tuple[dict[str, torch.Tensor]]:
        """The four clips of each region, through its centre."""
        return (mlsscl_clips(batch["x"], self.centres(batch["idx"], draw), self.clip_spec),)

    def step(self, model: nn.Module, clips: dict[str, torch.Tensor], rows: torch.Tensor,  # type: ignore[override]
             train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert isinstance(self.mc, MlssclConfig)
        queries, keys = loss_terms(model, clips)
        queue = unwrap(model).queue
        negatives, exclude = queue.keys.clone(), own_keys(rows, queue.ids.clone())   # before this step's keys
        tau = self.mc.temperature
        multiview = [info_nce(queries[a], keys[b], negatives, tau, exclude) for a, b in MULTIVIEW]
        short, long = LONG_SHORT
        long_short, long_short_top1 = info_nce(queries[short], keys[long], negatives, tau, exclude)
        multiview_loss = sum(term for term, _ in multiview)
        loss = self.mc.alpha * multiview_loss + self.mc.beta * long_short
        if train:
            for view in ("coronal", "sagittal", "axial"):
                queue.enqueue(gather_keys(F.normalize(keys[view].detach().float(), dim=1)), gather_keys(rows))
        return loss, {"top1": torch.stack([top1 for _, top1 in multiview]).mean(),
                      "multiview": multiview_loss.detach(), "long_short": long_short.detach(),
                      "long_short_top1": long_short_top1}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        n = max(stats["volumes"], 1)
        return {"loss": f"{stats['loss'] / n:.4f}", "top1": f"{stats['top1'] / n:.3f}",
                "ls": f"{stats['long_short_top1'] / n:.3f}"}

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """One row per test region: whether its axial query found its own sagittal key first (view 1) and its short
        axial query its own long axial key (view 2) among all test regions', trained and untrained; the figures."""
        mc, trained, untrained = cls.networks(checkpoint)
        assert isinstance(mc, MlssclConfig)
        rows = np.flatnonzero(store.allowed)
        table = store.table.loc[rows, ["scan_id", "subject_id", "level"]].reset_index()
        figures: dict[str, Any] = {}
        for name, net in (("trained", trained), ("untrained", untrained)):
            hits = region_retrieval(net, store, rows, mc.clips(), batch_size)
            for column, hit in zip(("view1_top1", "view2_top1"), hits):
                table[f"{name}_{column}"] = hit
            figures[name] = {"multiview_top1": float(hits[0].mean()) if len(rows) else None,
                             "long_short_top1": float(hits[1].mean()) if len(rows) else None}
        figures["chance_top1"] = 1 / len(rows) if len(rows) else None
        figures["views"] = {"view1": "axial query, sagittal keys", "view2": "short axial query, long axial keys"}
        figures["paper"] = None   # Cao et al. report no pretext figure
        log.info("%d test regions: axial-sagittal top-1 %s (untrained %s), short-long top-1 %s (untrained %s)",
                 len(rows), figures["trained"]["multiview_top1"], figures["untrained"]["multiview_top1"],
                 figures["trained"]["long_short_top1"], figures["untrained"]["long_short_top1"])
        return table.drop(columns="row"), figures


@torch.no_grad()
def region_retrieval(net: nn.Module, store: VolumeStore, rows: np.ndarray, spec: ClipSpec,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each region at ``rows``, under its fixed centre (seeded by its position): whether its axial query finds
    its own sagittal key first among every region's sagittal key, and its short axial query its own long axial key
    (1.0 or 0.0 each; a tie counts as found)."""
    net.eval()
    found: dict[str, list[torch.Tensor]] = {"axial": [], "sagittal": [], "short": []}
    for start in range(0, len(rows), batch_size):
        x = torch.from_numpy(store.load(rows[start:start + batch_size]))
        centres = torch.cat([draw_centres(1, store.shape, spec, seeds.generator(seeds.evaluation_views(i)))
                             for i in range(start, start + len(x))])
        clips = mlsscl_clips(x, centres, spec)
        found["axial"].append(net.online(clips["axial"]))
        found["short"].append(net.online(clips["short"]))
        found["sagittal"].append(net.target(clips["sagittal"]))
        found.setdefault("long", []).append(net.target(clips["axial"]))
    if not len(rows):
        return np.zeros(0), np.zeros(0)
    out = []
    for query, key in (("axial", "sagittal"), ("short", "long")):
        q, k = (F.normalize(torch.cat(found[v]).float(), dim=1) for v in (query, key))
        sim = q @ k.T
        out.append((sim.diagonal() >= sim.max(1).values).float().numpy())
    return out[0], out[1]


class MlssclMultiviewMethod(MlssclMethod):
    """Table 3's ablation: the multiview loss alone (beta = 0)."""

    name = "mlsscl_multiview"
    weights = {"beta": 0.0}


class MlssclLongShortMethod(MlssclMethod):
    """Table 3's ablation: the long-short loss alone (alpha = 0)."""

    name = "mlsscl_long_short"
    weights = {"alpha": 0.0}
