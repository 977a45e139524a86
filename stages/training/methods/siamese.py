"""Pretraining method ``siamese``: Jamaludin, Kadir and Zisserman 2017, longitudinal pairs of vertebral bodies (or of
discs, ``pretrain.structure: disc``: a cohort of disc crops only, or the ablation section 4.2 asks for).

A sample is a pair of volumes of the same structure and level (positive: one subject, studies years apart; negative:
two subjects). Loss: the contrastive loss on the FC7 embeddings of the pair plus ``level_loss_weight`` x the
class-balanced level loss on FC8 for both volumes (stages/nets/siamese.py); FC8 has one class per level of the
structure (7 vertebral levels T12 ... S1, or 6 disc levels T12-L1 ... L5-S1). The augmentation is drawn for the whole
global batch on the device and each process takes its share, so DDP sees exactly the single-process batch.

Pretext evaluation (section 4.1 and Fig. 6): every volume of the self-supervision test subjects is embedded (FC7);
for every test pair the L2 distance between the two embeddings is the score for "different subject", summarised as
the ROC AUC of same-subject detection (the paper, on vertebral bodies: 94.6% on TwinsUK); FC8's level prediction is
scored as accuracy over the test volumes (the paper, on vertebral bodies: 97.8%; it reports no disc figures, so a
disc run's evaluation names no paper figures). The same figures for the untrained network (the same seed's initial
weights) are the floor they must clear.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages.core import seeds
from stages.nets.siamese import (
    BalancedCrossEntropy,
    ContrastiveLoss,
    EncoderSpec,
    SiameseNet,
    class_balanced_weights,
)
from stages.training.augment import augment_pairs, sample_pair_params
from stages.training.config import PretrainConfig
from stages.training.pair_scores import pair_distances
from stages.training.protocol import AugmentDraw, handed_on
from stages.training.store import VolumeStore

log = logging.getLogger("pretrain.siamese")
# the paper's pretext figures, on vertebral bodies: a run on another structure has none to compare with
PAPER = {"cohort": "TwinsUK (Jamaludin et al. 2017, section 4.1)", "auc": 0.946, "level_accuracy": 0.978}
PAPER_STRUCTURE = "vertebra"


class SiameseMethod:
    """Contrastive + class-balanced level loss on pairs of vertebral bodies or discs (see the module's docstring)."""

    name = "siamese"
    columns = ("loss", "contrastive", "level_loss", "level_accuracy", "positive_distance", "negative_distance")
    volumes_per_sample = 2
    unit = "pairs"

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.cfg = cfg
        self.store = store
        slices, height, width_px = store.shape
        self.spec = EncoderSpec(slices=slices, height=height, width_px=width_px, width=cfg.width,
                                embedding_dim=cfg.embedding_dim, dropout=cfg.dropout, n_levels=len(store.levels))
        self.model = SiameseNet(self.spec)
        train = store.pairs["train"]
        train_rows = np.unique(np.concatenate([train.a.to_numpy(), train.b.to_numpy()]))
        if len(train_rows) == 0:
            raise ValueError(f"nothing to pretrain on: the self-supervision training part has no pairs among "
                             f"{len(store.table)} extracted {store.noun}. Pairs need subjects with two or more "
                             f"studies (see results/splits/summary.json) and extracted {store.noun} (see "
                             "results/localise/flags.csv for scans that were skipped)")
        alpha = class_balanced_weights(torch.from_numpy(store.level[train_rows]), len(store.levels))
        self.contrastive = ContrastiveLoss(cfg.contrastive_margin)
        self.level_loss = BalancedCrossEntropy(alpha)
        self.ranges = cfg.augment_ranges()

    def n_samples(self, part: str) -> int:
        return len(self.store.pairs[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = self.store.pairs[part].iloc[idx]
        a, b = pairs.a.to_numpy(), pairs.b.to_numpy()
        return {"a": torch.from_numpy(self.store.load(a)), "b": torch.from_numpy(self.store.load(b)),
                "y": torch.from_numpy(pairs.positive.to_numpy(dtype=np.float32)),
                "level": torch.from_numpy(np.concatenate([self.store.level[a], self.store.level[b]]))}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        a, b = batch["a"], batch["b"]
        if draw is not None:   # training: draw for the global batch, keep this process's share
            params = sample_pair_params(draw.n_global, self.ranges, draw.generator)
            params = dataclasses.replace(
                params, **{f.name: _slice_params(getattr(params, f.name), draw.mine, f.name != "flip")
                           for f in dataclasses.fields(params)})
            a, b = augment_pairs(a, b, params)
        ea, eb, logits = model(a, b)
        level = batch["level"]
        contrastive = self.contrastive(ea, eb, batch["y"])
        level_loss = self.level_loss.to(logits.device)(logits, level)
        loss = contrastive + self.cfg.level_loss_weight * level_loss
        with torch.no_grad():
            d = (ea.float() - eb.float()).pow(2).sum(1).sqrt()
            y = batch["y"] > 0.5
            n = len(y)
            stats = {"pairs": n, "loss": float(loss) * n, "contrastive": float(contrastive) * n,
                     "level_loss": float(level_loss) * n, "volumes": 2 * n,
                     "level_correct": float((logits.argmax(1) == level).sum()),
                     "positives": float(y.sum()), "positive_distance": float(d[y].sum()),
                     "negatives": float((~y).sum()), "negative_distance": float(d[~y].sum())}
        return loss, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Losses per pair, level accuracy per volume, mean distances of the positive and the negative pairs."""
        pairs = max(sums.get("pairs", 0.0), 1.0)

        def ratio(num: str, den: str) -> float:
            return sums.get(num, 0.0) / sums[den] if sums.get(den) else float("nan")

        return {"loss": sums.get("loss", 0.0) / pairs, "contrastive": sums.get("contrastive", 0.0) / pairs,
                "level_loss": sums.get("level_loss", 0.0) / pairs,
                "level_accuracy": ratio("level_correct", "volumes"),
                "positive_distance": ratio("positive_distance", "positives"),
                "negative_distance": ratio("negative_distance", "negatives"), "samples": sums.get("pairs", 0.0)}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss'] / max(stats['pairs'], 1):.4f}"}

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f}, level accuracy {row['level_accuracy']:.3f}"

    def encoder_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The distance of every test pair (a, b, level, positive, hard, years, distance, untrained_distance) and
        the figures: test pair counts, AUC and level accuracy of the trained and the untrained network, and the
        paper's (on vertebral bodies: None for a disc run)."""
        spec = EncoderSpec(**checkpoint["encoder_spec"])
        if spec.n_levels != len(store.levels):
            raise ValueError(f"the checkpoint's FC8 has {spec.n_levels} levels, but the store's {store.noun} have "
                             f"{len(store.levels)}: it was pretrained on another structure")
        trained = SiameseNet(spec)
        trained.load_state_dict(handed_on(checkpoint))
        seeds.seed_torch(seeds.initial_weights(checkpoint["identity"]["config"]["seed"]))   # as pretraining built it
        untrained = SiameseNet(spec)
        distances, figures = pretext_scores(trained, store, batch_size)
        base_distances, base = pretext_scores(untrained, store, batch_size)
        distances["untrained_distance"] = base_distances.distance.to_numpy()
        pairs = store.pairs["test"]
        log.info("%d test pairs of %s: AUC %s (untrained %s), level accuracy %s (untrained %s)", len(pairs),
                 store.noun, *(_fmt(v) for v in (figures["auc"], base["auc"], figures["level_accuracy"],
                                                  base["level_accuracy"])))
        if not len(pairs):
            log.warning("the self-supervision test part has no pairs: no AUC (see results/splits/summary.json)")
        counts = {"positive": int(pairs.positive.sum()), "negative": int((~pairs.positive).sum())}
        paper = PAPER if store.structure == PAPER_STRUCTURE else None
        return distances, {"test_pairs": counts, "trained": figures, "untrained": base, "paper": paper}


def _slice_params(values: torch.Tensor, sl: slice, per_volume: bool) -> torch.Tensor:
    """This process's share of a global batch's augmentation parameters (per-volume tensors hold a's, then b's)."""
    if not per_volume:
        return values[sl]
    n = len(values) // 2
    return torch.cat([values[:n][sl], values[n:][sl]])


@torch.no_grad()
def embed(model: SiameseNet, store: VolumeStore, rows: np.ndarray,
          batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """FC7 embeddings ``(n, D)`` and FC8 level predictions ``(n,)`` of the volumes at ``rows``."""
    model.eval()
    embeddings, predictions = [], []
    for start in range(0, len(rows), batch_size):
        x = torch.from_numpy(store.load(rows[start:start + batch_size]))
        e = model.encoder(x)
        embeddings.append(e.numpy())
        predictions.append(model.levels(e).argmax(1).numpy())
    dim = model.encoder.spec.embedding_dim
    return (np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
            np.concatenate(predictions) if predictions else np.zeros(0, np.int64))


def pretext_scores(model: SiameseNet, store: VolumeStore,
                   batch_size: int = 64) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Distances of the test pairs and the two headline figures, for one network."""
    rows = np.flatnonzero(store.allowed)
    emb, pred = embed(model, store, rows, batch_size)
    distances, pair_figures = pair_distances(emb, rows, store.pairs["test"])
    truth = store.level[rows]
    figures = {
        "auc": pair_figures["auc"],
        "level_accuracy": float((pred == truth).mean()) if len(rows) else None,
        "level_accuracy_per_level": {lv: float((pred[truth == k] == k).mean())
                                     for k, lv in enumerate(store.levels) if (truth == k).any()},
        "mean_distance_positive": pair_figures["mean_distance_positive"],
        "mean_distance_negative": pair_figures["mean_distance_negative"],
    }
    return distances, figures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
