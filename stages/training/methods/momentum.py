"""Pretraining methods ``moco`` (MoCo v2: Chen et al. 2020, on He et al. 2020) and ``byol`` (Grill et al. 2020), the
momentum-encoder baselines Cao et al. 2022 compare MLSSCL against, and ``longitudinal_nce`` (ours): on the 3D volumes
of ``pretrain.structure`` (vertebral bodies or discs), with the backbone of the section's ``backbone``: the Siamese
network's trunk (the default), or MONAI's 3D ResNet-18 (stages/nets/encoders.py).

A sample is one volume of the self-supervision part (no pairs; only longitudinal_nce uses the longitudinal labels).
Two views of it are drawn on the device with the pretraining augmentation of the ``pretrain`` section (rotation in the
sagittal plane, scaling, shifts, intensity gain, the mid-sagittal flip; stages/training/augment.py), each volume its
own transform; the draw is made for the global batch and each process keeps its share.

- ``moco``: the online network (backbone, MLP projector) embeds view 1 as the query, the target network (its
  momentum average, m = ``moco.momentum``) embeds view 2 as the key; InfoNCE with h = cosine / tau against the queue
  of the last ``queue_size`` keys (stages/training/infonce.py). The target is updated before each training step's
  forward pass; the step's keys, gathered from every process, enter the queue after its loss. A queue entry holding
  an earlier key of a query's own volume is left out of its negatives.
- ``byol``: the online network adds an MLP predictor; the loss is 2 - 2 cos(prediction, target projection), summed
  over both orders of the views (their symmetrised loss, as a mean over the 2n predictions); no negatives, no queue.
  BYOL's projector and predictor use batch normalisation: several CPU processes then differ slightly from one
  process (per-process batch statistics), as for simclr's batch norm.
- ``longitudinal_nce``: MoCo's networks and queue with a supervised-contrastive InfoNCE (Khosla et al. 2020) whose
  classes are the subjects' levels: a query's positives are its own key and the keys of the same level of the same
  subject (its other studies, years apart), among the keys of the global batch and of the queue; the keys of the
  subject's other levels are neither; every other subject's keys are negatives. Plus ``pretrain.level_loss_weight`` x
  the Siamese network's class-balanced level loss on the online FC7 embedding (FC8). It asks whether InfoNCE with many
  negatives uses the free longitudinal labels better than the Siamese margin loss. In evaluation a query's candidates
  are its own key and the queue (not the rest of its batch), so validation figures do not depend on the batching.

Settings: the config's ``moco``, ``byol`` and ``longitudinal_nce`` sections (:class:`MocoConfig` for moco and
longitudinal_nce, :class:`ByolConfig`): the momentum coefficient, the MLP sizes, the batch, SGD's learning rate and
weight decay, the epochs; the queue size and the temperature for the two with a queue. Of the ``pretrain`` section
they use the trunk's size (``width``, ``embedding_dim``), the augmentation, SGD's momentum, the plateau rule, the seed
and the runtime keys. Deviations from the published
recipes, stated: a constant momentum coefficient (BYOL raises it to 1 along a cosine over a known number of steps,
which a plateau-stopped run does not have), SGD with the plateau schedule instead of MoCo v2's cosine schedule and
BYOL's LARS, and the 3D augmentation of the volumes instead of their 2D colour, crop and blur.

Pretext evaluation on the self-supervision test part, for the handed-on weights and for the same seed's untrained
network: same-subject detection on the test pairs from the backbone's FC7 embeddings (the Siamese method's figure,
stages/training/pair_scores.py), and instance retrieval: under fixed views, whether each test volume's query finds
its own key first among the keys of every test volume (top-1; chance is one over the number of test volumes); and
longitudinal_nce's level accuracy (FC8), as the Siamese method's.
"""

from __future__ import annotations

import abc
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
from stages.nets.momentum import KeyQueue, LevelMomentumNet, MomentumNet
from stages.nets.siamese import BACKBONES, BalancedCrossEntropy, EncoderSpec, class_balanced_weights
from stages.training.augment import PairParams, augment_volumes, sample_volume_params
from stages.training.config import PretrainConfig
from stages.training.infonce import (
    batch_top1,
    byol_loss,
    gather_keys,
    info_nce,
    own_keys,
    supervised_info_nce,
)
from stages.training.pair_scores import pair_distances
from stages.training.protocol import AugmentDraw, handed_on
from stages.training.store import VolumeStore

log = logging.getLogger("pretrain.momentum")


@dataclass(frozen=True)
class MomentumConfig:
    """What every method of the momentum family sets in its own config section (see the schema)."""

    momentum: float = 0.999
    hidden_dim: int = 2048
    projection_dim: int = 128
    batch_norm: bool = False
    dropout: float = 0.0
    batch_size: int = 256
    learning_rate: float = 0.03
    weight_decay: float = 0.0001
    max_epochs: int = 200
    backbone: str = "trunk"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if min(self.hidden_dim, self.projection_dim, self.batch_size, self.max_epochs) < 1:
            raise ValueError(f"sizes, the batch and the epochs must be >= 1, got {self}")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> MomentumConfig:
        return cls(**values)


@dataclass(frozen=True)
class MocoConfig(MomentumConfig):
    """The ``moco`` section. Defaults: MoCo v2's published ones (m 0.999, tau 0.2, K 65,536, an MLP head of 2,048
    -> 128 without batch norm, batch 256, SGD at 0.03 with weight decay 1e-4, 200 epochs)."""

    queue_size: int = 65536
    temperature: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queue_size < 1 or not self.temperature > 0:
            raise ValueError(f"queue_size must be >= 1 and temperature > 0, got {self.queue_size} and "
                             f"{self.temperature}")


@dataclass(frozen=True)
class ByolConfig(MomentumConfig):
    """The ``byol`` section. Defaults: BYOL's published ones where the harness has them (base m 0.996, projector and
    predictor 4,096 -> 256 with batch norm, weight decay 1.5e-6, batch 4,096; SGD at 0.2, their base learning rate
    for LARS)."""

    momentum: float = 0.996
    hidden_dim: int = 4096
    projection_dim: int = 256
    batch_norm: bool = True
    batch_size: int = 4096
    learning_rate: float = 0.2
    weight_decay: float = 1.5e-6
    max_epochs: int = 300


def volume_samples(store: VolumeStore, part: str) -> np.ndarray:
    """The rows of the volumes of self-supervision part ``part`` the store allows, in row order."""
    table = store.table
    return table.index[(table.ssl_part == part).to_numpy() & store.allowed[table.index]].to_numpy(dtype=np.int64)


def take(params: PairParams, sl: slice) -> PairParams:
    """Transforms ``sl`` of ``params`` (one transform and one flip per volume)."""
    return PairParams(**{f.name: getattr(params, f.name)[sl] for f in dataclasses.fields(params)})


def two_views(x: torch.Tensor, idx: torch.Tensor, ranges: Any,
              draw: AugmentDraw | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of each volume of ``x`` ``(n, S, H, W)``. Training: 2 x n_global transforms drawn for
    the global batch (view 1 of every sample, then view 2), of which this process keeps its share. Evaluation:
    fixed views, each sample's seeded by its index in ``idx`` (whatever batch or process it falls in)."""
    if draw is not None:
        params = sample_volume_params(2 * draw.n_global, ranges, draw.generator)
        first, second = take(params, slice(0, draw.n_global)), take(params, slice(draw.n_global, None))
        return augment_volumes(x, take(first, draw.mine)), augment_volumes(x, take(second, draw.mine))
    fixed = [sample_volume_params(2, ranges, seeds.generator(seeds.evaluation_views(int(i)), x.device)) for i in idx]
    first, second = (PairParams(**{f.name: torch.cat([getattr(p, f.name)[view:view + 1] for p in fixed])
                                   for f in dataclasses.fields(PairParams)}) for view in (0, 1))
    return augment_volumes(x, first), augment_volumes(x, second)


def unwrap(model: nn.Module) -> MomentumNet:
    """The method's network inside a DDP wrapper (or itself)."""
    return getattr(model, "module", model)


class MomentumMethod(abc.ABC):
    """What moco, byol and longitudinal_nce share: samples, views, statistics, the target update, the pretext
    evaluation."""

    name: ClassVar[str]
    section: ClassVar[str]
    settings: ClassVar[type[MomentumConfig]]
    predictor: ClassVar[bool]
    uses_pairs = True           # the pretext evaluation's same-subject detection reads the test pairs
    columns = ("loss", "top1")
    volumes_per_sample = 2
    unit = "volumes"

    @classmethod
    def configure(cls, cfg: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
        """The harness's settings for this method: the section's batch, learning rate, weight decay and epochs
        (SGD with the ``pretrain`` section's momentum and plateau rule)."""
        mc = cls.settings.from_values(values)
        return dataclasses.replace(cfg, optimiser="sgd", batch_size=mc.batch_size, learning_rate=mc.learning_rate,
                                   weight_decay=mc.weight_decay, max_epochs=mc.max_epochs, dropout=mc.dropout,
                                   method_config=dataclasses.asdict(mc))

    @classmethod
    def network(cls, spec: EncoderSpec, mc: MomentumConfig) -> MomentumNet:
        net = MomentumNet(spec, mc.hidden_dim, mc.projection_dim, predictor=cls.predictor, batch_norm=mc.batch_norm)
        if isinstance(mc, MocoConfig):   # the queue's initial keys are drawn after the weights
            net.queue = KeyQueue(mc.queue_size, mc.projection_dim)
        return net

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.cfg = cfg
        self.mc = self.settings.from_values(cfg.method_config)
        slices, height, width_px = self.input_shape(store)
        self.spec = EncoderSpec(slices=slices, height=height, width_px=width_px, width=cfg.width,
                                embedding_dim=cfg.embedding_dim, dropout=self.mc.dropout, n_levels=len(store.levels),
                                backbone=self.mc.backbone)
        self.model = self.network(self.spec, self.mc)     # first: the initial weights are the seed's
        self.store = store
        self.samples = {part: volume_samples(store, part) for part in ("train", "val")}
        if not len(self.samples["train"]):
            raise ValueError(f"nothing to pretrain on: the self-supervision training part has no {store.noun} among "
                             f"{len(store.table)} listed (see results/splits/summary.json and "
                             "results/localise/flags.csv)")
        self.ranges = cfg.augment_ranges()

    def input_shape(self, store: VolumeStore) -> tuple[int, int, int]:
        """(slices, rows, columns) of what the backbone reads: the store's volumes."""
        return store.shape

    def n_samples(self, part: str) -> int:
        return len(self.samples[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.samples[part][idx]
        return {"x": torch.from_numpy(self.store.load(rows)), "idx": torch.from_numpy(np.asarray(idx, np.int64)),
                "row": torch.from_numpy(rows)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        if draw is not None:      # the momentum update, from the weights the last step left
            unwrap(model).update_target(self.mc.momentum)
        loss, figures = self.step(model, *self.inputs(batch, draw), batch["row"], train=draw is not None)
        n = len(batch["x"])
        return loss, {"volumes": n, "loss": float(loss.detach()) * n, **{k: float(v) * n for k, v in figures.items()}}

    def inputs(self, batch: dict[str, torch.Tensor], draw: AugmentDraw | None) -> tuple[torch.Tensor, ...]:
        """What :meth:`step` takes before the rows: the two views of each volume (a method of other views says)."""
        return two_views(batch["x"], batch["idx"], self.ranges, draw)

    @abc.abstractmethod
    def step(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
             train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of views ``a`` and ``b`` of the volumes at ``rows``, and the batch means of the method's other
        columns (``train``: a training step, which may change the method's state, such as its queue)."""

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Every column as a mean per volume."""
        volumes = sums.get("volumes", 0.0)
        return {**{c: sums.get(c, 0.0) / volumes if volumes else float("nan") for c in self.columns},
                "samples": volumes}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        n = max(stats["volumes"], 1)
        return {"loss": f"{stats['loss'] / n:.4f}", "top1": f"{stats['top1'] / n:.3f}"}

    def describe(self, row: dict[str, Any]) -> str:
        names = {"top1": "top-1"}
        return ", ".join(f"{names.get(c, c.replace('_', ' '))} {row[c]:.{4 if c.endswith('loss') else 3}f}"
                         for c in self.columns)

    def encoder_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()

    @classmethod
    def networks(cls, checkpoint: dict[str, Any]) -> tuple[MomentumConfig, MomentumNet, MomentumNet]:
        """A checkpoint's settings, its network with the handed-on weights, and the same seed's untrained network."""
        config = checkpoint["identity"]["config"]
        mc = cls.settings.from_values(config["method_config"])
        spec = EncoderSpec(**checkpoint["encoder_spec"])
        trained = cls.network(spec, mc)
        trained.load_state_dict(handed_on(checkpoint))
        seeds.seed_torch(seeds.initial_weights(config["seed"]))   # as pretraining built it
        return mc, trained, cls.network(spec, mc)

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The test pairs with the distance of their FC7 embeddings (trained and untrained), and the figures:
        same-subject AUC and instance-retrieval top-1 of both networks."""
        config = checkpoint["identity"]["config"]
        mc, trained, untrained = cls.networks(checkpoint)
        ranges = PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in config.items()}).augment_ranges()
        rows = np.flatnonzero(store.allowed)
        pairs = store.pairs["test"]
        figures: dict[str, Any] = {"test_pairs": {"positive": int(pairs.positive.sum()),
                                                  "negative": int((~pairs.positive).sum())}}
        tables = {}
        for name, net in (("trained", trained), ("untrained", untrained)):
            emb, top1, level = retrieval(net, store, rows, ranges, batch_size)
            tables[name], pair_figures = pair_distances(emb, rows, pairs)
            figures[name] = {**pair_figures, "top1": top1, **({"level_accuracy": level} if level is not None else {})}
        figures["chance_top1"] = 1 / len(rows) if len(rows) else None
        figures["paper"] = None   # Cao et al. report no pretext figure
        log.info("%d test %s: AUC %s (untrained %s), top-1 %s (untrained %s)", len(rows), store.noun,
                 figures["trained"]["auc"], figures["untrained"]["auc"], figures["trained"]["top1"],
                 figures["untrained"]["top1"])
        table = tables["trained"].assign(untrained_distance=tables["untrained"].distance.to_numpy())
        return table, figures


@torch.no_grad()
def retrieval(net: MomentumNet, store: VolumeStore, rows: np.ndarray, ranges: Any,
              batch_size: int) -> tuple[np.ndarray, float | None, float | None]:
    """The FC7 embeddings of the volumes at ``rows`` (unaugmented), the instance-retrieval top-1 (each volume's query,
    view 1 through the online network, against the keys, view 2 through the target, of every volume at ``rows``) and,
    for a network with a level head, its level accuracy (None without)."""
    net.eval()
    embeddings, queries, keys, correct = [], [], [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        x = torch.from_numpy(store.load(chunk))
        emb = net.encoder(x)
        embeddings.append(emb.numpy())
        if isinstance(net, LevelMomentumNet):
            correct += int((net.levels(emb).argmax(1).numpy() == store.level[chunk]).sum())
        a, b = two_views(x, torch.arange(start, start + len(x)), ranges, None)
        queries.append(net.online(a))
        keys.append(net.target(b))
    if not rows.size:
        return np.zeros((0, net.encoder.spec.embedding_dim), np.float32), None, None
    level = correct / len(rows) if isinstance(net, LevelMomentumNet) else None
    return np.concatenate(embeddings), float(batch_top1(torch.cat(queries), torch.cat(keys))), level


class MocoMethod(MomentumMethod):
    """MoCo v2 (see the module's docstring)."""

    name = "moco"
    section = "moco"
    settings = MocoConfig
    predictor = False

    def step(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
             train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, k = model(a, b)
        queue = unwrap(model).queue
        keys, ids = queue.keys.clone(), queue.ids.clone()   # the queue before this step's keys
        loss, top1 = info_nce(q, k, keys, self.mc.temperature, exclude=own_keys(rows, ids))
        if train:
            queue.enqueue(gather_keys(F.normalize(k.detach().float(), dim=1)), gather_keys(rows))
        return loss, {"top1": top1}


class ByolMethod(MomentumMethod):
    """BYOL (see the module's docstring)."""

    name = "byol"
    section = "byol"
    settings = ByolConfig
    predictor = True

    def step(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
             train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, z = model(torch.cat([a, b]), torch.cat([b, a]))   # both orders: the symmetrised loss
        return byol_loss(p, z), {"top1": batch_top1(p, z)}


def longitudinal_masks(query_rows: torch.Tensor, candidate_rows: torch.Tensor, subject: torch.Tensor,
                       level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, M)`` positives and exclusions of the longitudinal InfoNCE: a candidate key of the query's subject and
    level (its own view, the same level in the subject's other studies) is a positive; one of the query's subject at
    another level is neither positive nor negative (excluded); other subjects' keys, and the queue's initial random
    keys (row -1), are negatives. ``subject`` and ``level`` give each array row's subject code and level index."""
    known = candidate_rows >= 0
    rows = candidate_rows.clamp_min(0)
    same_subject = (subject[query_rows].view(-1, 1) == subject[rows].view(1, -1)) & known.view(1, -1)
    same_level = level[query_rows].view(-1, 1) == level[rows].view(1, -1)
    return same_subject & same_level, same_subject & ~same_level


class LongitudinalNceMethod(MomentumMethod):
    """Longitudinal InfoNCE (see the module's docstring)."""

    name = "longitudinal_nce"
    section = "longitudinal_nce"
    settings = MocoConfig
    predictor = False
    columns = ("loss", "top1", "contrastive", "level_loss", "level_accuracy")

    @classmethod
    def network(cls, spec: EncoderSpec, mc: MomentumConfig) -> MomentumNet:
        assert isinstance(mc, MocoConfig)
        net = LevelMomentumNet(spec, mc.hidden_dim, mc.projection_dim, batch_norm=mc.batch_norm)
        net.queue = KeyQueue(mc.queue_size, mc.projection_dim)
        return net

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        super().__init__(cfg, store)
        codes, _ = pd.factorize(store.table.subject_id)
        subject = np.full(len(store.level), -1, dtype=np.int64)
        subject[store.table.index.to_numpy(dtype=np.int64)] = codes
        self.lookup = {"subject": torch.from_numpy(subject), "level": torch.from_numpy(store.level.copy())}
        train = self.samples["train"]
        self.level_loss = BalancedCrossEntropy(class_balanced_weights(self.lookup["level"][train], len(store.levels)))

    def step(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
             train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, k, logits = model(a, b)
        queue = unwrap(model).queue
        keys = F.normalize(k.detach().float(), dim=1)
        batch_keys, batch_rows = (gather_keys(keys), gather_keys(rows)) if train else (keys, rows)
        candidates = torch.cat([batch_keys, queue.keys.clone()])
        candidate_rows = torch.cat([batch_rows, queue.ids.clone()])
        subject, level = (self.lookup[name].to(rows.device) for name in ("subject", "level"))
        positive, exclude = longitudinal_masks(rows, candidate_rows, subject, level)
        if not train:   # evaluation: the query's own key and the queue, whatever else its batch (or process) holds
            others = ~torch.eye(len(rows), dtype=torch.bool, device=rows.device)
            positive[:, :len(rows)] &= ~others
            exclude[:, :len(rows)] |= others
        contrastive, top1 = supervised_info_nce(q, candidates, positive, self.mc.temperature, exclude)
        target = level[rows]
        level_loss = self.level_loss.to(logits.device)(logits, target)
        if train:
            queue.enqueue(batch_keys, batch_rows)
        return contrastive + self.cfg.level_loss_weight * level_loss, {
            "top1": top1, "contrastive": contrastive.detach(), "level_loss": level_loss.detach(),
            "level_accuracy": (logits.argmax(1) == target).float().mean()}
