"""Pretraining methods ``rotation``, ``relative_location`` and ``swav``: the single pretext tasks of the curricular
multi-task study, each a method on its own and a step of a curriculum (``pretrain.curricula``; the fourth task of the
study, MoCo v2, is ``moco``: stages/training/methods/momentum.py). A sample is one volume of ``pretrain.structure``
from the self-supervision part; the network is the backbone of the task's section (the Siamese trunk, or MONAI's 3D
ResNet-18: stages/nets/encoders.py) and a small head; the backbone is what the task hands on.

- ``rotation`` (Gidaris et al. 2018): every volume in its four in-plane rotations (0, 90, 180, 270 degrees in the
  sagittal slice plane; the label is the rotation's index), a 4-way classification of each. A rotation by 90 degrees
  of a volume that is not square would change its outline, which gives the answer away: the central square of the
  slices is rotated and put back on a blank canvas of the volume's size, the same for all four.
- ``relative_location`` (Doersch et al. 2015): a 3 x 3 grid of cells over the slice plane; in each cell a patch
  ``gap_fraction`` of a cell smaller than it (the gap between neighbours) and shifted by up to ``jitter_fraction`` of a
  cell each way (the jitter), so that continuing edges and lines across patch borders do not give the position away.
  Each patch (all slices) is resized to the backbone's input size; the head reads the centre patch's and a
  neighbour's embeddings and classifies the neighbour's position (8 ways), for all 8 neighbours of every volume.
- ``swav`` (Caron et al. 2020), the clustering task (SwAV rather than ODC: its cluster assignments are computed within
  each batch by the Sinkhorn-Knopp algorithm, with no memory bank of features and labels to keep in step with the
  weights, so a run resumes exactly; and its equal-partition constraint is testable in closed form): two views of each
  volume (the ``pretrain`` section's augmentation, as moco's), their projections z (unit length; SwAV's projection
  head Linear-BatchNorm-ReLU-Linear: the batch normalisation spreads the random backbone's nearly identical
  embeddings, without which the demo's SwAV collapsed onto one prototype) scored against K prototypes c_k (unit
  length), codes Q = Sinkhorn(Z^T C / epsilon) under the constraint that the K prototypes share the batch equally, and
  the swapped prediction L = -1/2 sum_n [q_n^(2) . log softmax(z_n^(1) C / tau) + q_n^(1) . log softmax(z_n^(2) C /
  tau)] / n. The codes are computed over the global batch (gathered from every process) and, with ``queue_size`` > 0
  (SwAV's queue for small batches), the queue's past projections scored against the current prototypes (the queue's
  codes are dropped: they only widen the equal partition); each step's projections then enter the queue. In evaluation
  they are each sample's softmax(z C / epsilon), the codes without the batch's equal-partition constraint, so that
  validation figures (and the plateau rule, the epoch handed on, a learning-rate search) do not depend on how the
  samples are batched.

Settings: each task's config section (the backbone, SGD's learning rate and weight decay, the batch, the epochs, the
head's hidden units, and the task's own keys); of the ``pretrain`` section the backbone's size, SGD's momentum, the
plateau rule, the seed and the runtime keys.

Pretext evaluation on the self-supervision test part, trained and untrained (same seed): the task itself on each test
volume, as two columns the pretext figure draws with chance: rotation, the accuracy on 0/180 and on 90/270 degrees;
relative location, on the 4 edge and on the 4 corner neighbours; swav, whether the two views take the same prototype
and whether view 1 finds its own view 2 first among every test volume's (top-1).
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
from stages.nets.encoders import build_encoder
from stages.nets.momentum import KeyQueue, ProjectionMLP
from stages.nets.siamese import BACKBONES, EncoderSpec
from stages.training.config import PretrainConfig
from stages.training.infonce import gather_keys
from stages.training.methods.momentum import two_views, volume_samples
from stages.training.protocol import AugmentDraw, handed_on
from stages.training.store import VolumeStore

log = logging.getLogger("pretrain.pretext")

ROTATIONS = 4                       # quarter turns in the slice plane
NEIGHBOURS = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]   # label i: NEIGHBOURS[i], row-major
EDGE = [i for i, (r, c) in enumerate(NEIGHBOURS) if r == 1 or c == 1]           # above, left, right, below


@dataclass(frozen=True)
class TaskConfig:
    """What every pretext task's section sets (see the schema)."""

    backbone: str = "trunk"
    hidden_dim: int = 512
    dropout: float = 0.0
    batch_size: int = 32
    learning_rate: float = 0.01
    weight_decay: float = 0.0001
    max_epochs: int = 100

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if min(self.hidden_dim, self.batch_size, self.max_epochs) < 1 or not self.learning_rate > 0:
            raise ValueError(f"sizes, the batch and the epochs must be >= 1 and the learning rate > 0, got {self}")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> TaskConfig:
        return cls(**values)


@dataclass(frozen=True)
class RelativeLocationConfig(TaskConfig):
    gap_fraction: float = 0.2
    jitter_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.jitter_fraction <= self.gap_fraction / 2 < 0.5:
            raise ValueError(f"need 0 <= jitter_fraction <= gap_fraction / 2 < 0.5 (a jittered patch stays inside its "
                             f"cell), got {self.jitter_fraction} and {self.gap_fraction}")


@dataclass(frozen=True)
class SwavConfig(TaskConfig):
    prototypes: int = 32
    projection_dim: int = 64
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if min(self.prototypes, self.projection_dim, self.sinkhorn_iterations) < 1:
            raise ValueError(f"prototypes, projection_dim and sinkhorn_iterations must be >= 1, got {self}")
        if not (self.temperature > 0 and self.epsilon > 0):
            raise ValueError(f"temperature and epsilon must be > 0, got {self.temperature} and {self.epsilon}")


# --- The tasks' inputs and labels -------------------------------------------------------------------------------

def rotate_volumes(x: torch.Tensor, turns: int) -> torch.Tensor:
    """``x`` ``(n, S, H, W)`` with the central square of its slices turned ``turns`` quarter turns (counter-clockwise,
    rows down and columns right as stored) and put back on a blank canvas of ``(H, W)``: the outline is the same for
    every rotation."""
    h, w = x.shape[-2:]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    out = torch.zeros_like(x)
    out[..., top:top + m, left:left + m] = torch.rot90(x[..., top:top + m, left:left + m], turns, dims=(-2, -1))
    return out


def all_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every volume of ``x`` in its four rotations, rotation by rotation (``(4n, S, H, W)``), and their labels."""
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
    return torch.cat([rotate_volumes(x, k) for k in range(ROTATIONS)]), labels


@dataclass(frozen=True)
class Grid:
    """The 3 x 3 patch grid of relative location over ``(H, W)`` slices."""

    height: int
    width: int
    gap_fraction: float
    jitter_fraction: float

    def cell(self) -> tuple[int, int]:
        return self.height // 3, self.width // 3

    def patch(self) -> tuple[int, int]:
        """Rows and columns of a patch: a cell less the gap."""
        ch, cw = self.cell()
        size = (ch - round(self.gap_fraction * ch), cw - round(self.gap_fraction * cw))
        if min(size) < 1:
            raise ValueError(f"slices of {self.height} x {self.width} are too small for a 3 x 3 grid with a gap of "
                             f"{self.gap_fraction} of a cell")
        return size

    def max_jitter(self) -> tuple[int, int]:
        ch, cw = self.cell()
        return int(self.jitter_fraction * ch), int(self.jitter_fraction * cw)

    def corners(self, jitter: torch.Tensor) -> torch.Tensor:
        """Top-left corners ``(n, 9, 2)`` of the 9 patches (row-major cells, the centre at 4) given each patch's
        jitter ``(n, 9, 2)`` in pixels: each patch centred in its cell, then shifted."""
        ch, cw = self.cell()
        ph, pw = self.patch()
        cells = torch.tensor([(r * ch + (ch - ph) // 2, c * cw + (cw - pw) // 2) for r in range(3) for c in range(3)])
        return cells.view(1, 9, 2) + jitter

    def draw_jitter(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform integer shifts in [-max, max] per patch and axis, ``(n, 9, 2)``."""
        jh, jw = self.max_jitter()
        u = torch.rand((n, 9, 2), generator=generator, device=generator.device).cpu()
        return torch.stack([(u[..., 0] * (2 * jh + 1)).floor() - jh, (u[..., 1] * (2 * jw + 1)).floor() - jw],
                           dim=-1).long()


def cut_patches(x: torch.Tensor, grid: Grid, jitter: torch.Tensor) -> torch.Tensor:
    """The 9 patches of each volume of ``x`` ``(n, S, H, W)`` at their jittered places, each resized (bilinear) to
    ``(H, W)``: ``(n, 9, S, H, W)``."""
    n, s, h, w = x.shape
    ph, pw = grid.patch()
    corners = grid.corners(jitter.cpu()).tolist()
    patches = torch.stack([torch.stack([x[i, :, r:r + ph, c:c + pw] for r, c in corners[i]]) for i in range(n)])
    resized = F.interpolate(patches.reshape(n * 9, s, ph, pw), size=(h, w), mode="bilinear", align_corners=False)
    return resized.view(n, 9, s, h, w)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, eq. 3 and its appendix): Q = Diag(u) exp(scores^T / epsilon) Diag(v) scaled so
    that the K prototypes share the B samples equally (rows of Q sum to 1/K) and each sample is one unit (columns
    1/B), by ``iterations`` alternating normalisations; returned as ``(B, K)`` with each sample's codes summing to 1.
    ``scores``: ``(B, K)`` cosine similarities of projections and prototypes."""
    q = torch.exp((scores.float() - scores.float().max()) / epsilon).T     # (K, B); the shift cancels out
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T


@torch.no_grad()
def swav_codes(scores: torch.Tensor, net: nn.Module, tc: SwavConfig) -> torch.Tensor:
    """The batch's codes ``(B, K)``: Sinkhorn over its ``scores`` and, with a queue, the queue's filled entries'
    scores against the current prototypes, placed before them (SwAV's small-batch queue); the batch's rows."""
    queue = getattr(net, "queue", None)
    if queue is None:
        return sinkhorn(scores, tc.epsilon, tc.sinkhorn_iterations)
    past = queue.keys[queue.ids >= 0].to(scores.dtype) @ net.prototypes.weight.detach().to(scores.dtype).T
    return sinkhorn(torch.cat([past, scores]), tc.epsilon, tc.sinkhorn_iterations)[len(past):]


def swapped_prediction(z1: torch.Tensor, z2: torch.Tensor, prototypes: torch.Tensor, q1: torch.Tensor,
                       q2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SwAV's loss: -1/2 mean_n [q2_n . log softmax(z1_n C / tau) + q1_n . log softmax(z2_n C / tau)]."""
    p1 = F.log_softmax(z1.float() @ prototypes.float().T / temperature, dim=1)
    p2 = F.log_softmax(z2.float() @ prototypes.float().T / temperature, dim=1)
    return -0.5 * ((q2 * p1).sum(1) + (q1 * p2).sum(1)).mean()


# --- Networks --------------------------------------------------------------------------------------------------

def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """LayerNorm (no parameters: the trunk's FC7 starts small, as FC8 reads it), Linear, ReLU, Linear."""
    return nn.Sequential(nn.LayerNorm(in_dim, elementwise_affine=False), nn.Linear(in_dim, hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class RotationNet(nn.Module):
    """The backbone (``encoder``, handed on) and a 4-way head on its embedding."""

    def __init__(self, spec: EncoderSpec, hidden: int):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.head = mlp(spec.embedding_dim, hidden, ROTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class RelativeLocationNet(nn.Module):
    """The backbone and an 8-way head on the centre patch's and a neighbour's embeddings, concatenated."""

    def __init__(self, spec: EncoderSpec, hidden: int):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.head = mlp(2 * spec.embedding_dim, hidden, len(NEIGHBOURS))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches`` ``(n, 9, S, H, W)`` (row-major cells) -> logits ``(8 n, 8)``, neighbour by neighbour of each
        volume (its label: the neighbour's index)."""
        n = len(patches)
        emb = self.encoder(patches.flatten(0, 1)).view(n, 9, -1)
        neighbours = emb[:, [i for i in range(9) if i != 4]]
        pairs = torch.cat([emb[:, 4:5].expand_as(neighbours), neighbours], dim=2)
        return self.head(pairs.flatten(0, 1))


class SwavNet(nn.Module):
    """The backbone, a projection MLP to unit-length ``z`` and the prototypes (a bias-free linear layer whose rows are
    kept at unit length)."""

    def __init__(self, spec: EncoderSpec, hidden: int, projection_dim: int, prototypes: int, queue_size: int = 0):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.head = ProjectionMLP(spec.embedding_dim, hidden, projection_dim, batch_norm=True)
        self.prototypes = nn.Linear(projection_dim, prototypes, bias=False)
        # SwAV's queue for small batches: past projections that join each step's Sinkhorn assignment (not its loss)
        self.queue = KeyQueue(queue_size, projection_dim) if queue_size else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-length projections ``(n, d)`` and their scores against the prototypes ``(n, K)``."""
        with torch.no_grad():   # SwAV normalises the prototypes before each step
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = F.normalize(self.head(self.encoder(x)), dim=1)
        return z, self.prototypes(z)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# --- Methods ---------------------------------------------------------------------------------------------------

class PretextMethod(abc.ABC):
    """What the three tasks share: samples, settings, statistics, the pretext evaluation's frame."""

    name: ClassVar[str]
    section: ClassVar[str]
    settings: ClassVar[type[TaskConfig]] = TaskConfig
    uses_pairs = False
    columns: ClassVar[tuple[str, ...]] = ("loss", "accuracy")
    watch = ("loss", "min")
    volumes_per_sample: ClassVar[int]
    unit = "volumes"
    views: ClassVar[dict[str, str]]
    chance: ClassVar[str]

    @classmethod
    def configure(cls, cfg: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
        """The section's batch, learning rate, weight decay, epochs and dropout (SGD with the ``pretrain`` section's
        momentum and plateau rule)."""
        tc = cls.settings.from_values(values)
        return dataclasses.replace(cfg, optimiser="sgd", batch_size=tc.batch_size, learning_rate=tc.learning_rate,
                                   weight_decay=tc.weight_decay, max_epochs=tc.max_epochs, dropout=tc.dropout,
                                   method_config=dataclasses.asdict(tc))

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.cfg = cfg
        self.tc = self.settings.from_values(cfg.method_config)
        slices, height, width_px = store.shape
        self.spec = EncoderSpec(slices=slices, height=height, width_px=width_px, width=cfg.width,
                                embedding_dim=cfg.embedding_dim, dropout=self.tc.dropout, n_levels=len(store.levels),
                                backbone=self.tc.backbone)
        self.model = self.network(self.spec, self.tc)     # first: the initial weights are the seed's
        self.store = store
        self.samples = {part: volume_samples(store, part) for part in ("train", "val")}
        if not len(self.samples["train"]):
            raise ValueError(f"nothing to pretrain on: the self-supervision training part has no {store.noun}")
        self.ranges = cfg.augment_ranges()

    @classmethod
    @abc.abstractmethod
    def network(cls, spec: EncoderSpec, tc: TaskConfig) -> nn.Module:
        """The task's network at the current random state."""

    def n_samples(self, part: str) -> int:
        return len(self.samples[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.samples[part][idx]
        return {"x": torch.from_numpy(self.store.load(rows)), "idx": torch.from_numpy(np.asarray(idx, np.int64)),
                "row": torch.from_numpy(rows)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, correct, count = self.step(model, batch, draw)
        n = len(batch["x"])
        return loss, {"volumes": n, "loss": float(loss.detach()) * n, "correct": float(correct), "count": float(count)}

    @abc.abstractmethod
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, int, int]:
        """The batch's loss, and how many of its ``count`` predictions are right."""

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        volumes, count = sums.get("volumes", 0.0), sums.get("count", 0.0)
        return {"loss": sums.get("loss", 0.0) / volumes if volumes else float("nan"),
                "accuracy": sums.get("correct", 0.0) / count if count else float("nan"), "samples": volumes}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss'] / max(stats['volumes'], 1):.4f}",
                "acc": f"{stats['correct'] / max(stats['count'], 1):.3f}"}

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f}, accuracy {row['accuracy']:.3f}"

    def encoder_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()

    @classmethod
    def networks(cls, checkpoint: dict[str, Any]) -> tuple[TaskConfig, nn.Module, nn.Module]:
        """A checkpoint's settings, its network with the handed-on weights, and the same seed's untrained network."""
        config = checkpoint["identity"]["config"]
        tc = cls.settings.from_values(config["method_config"])
        spec = EncoderSpec(**checkpoint["encoder_spec"])
        trained = cls.network(spec, tc)
        trained.load_state_dict(handed_on(checkpoint))
        seeds.seed_torch(seeds.initial_weights(config["seed"]))
        return tc, trained.eval(), cls.network(spec, tc).eval()

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """One row per test volume: the task's two scores (:meth:`item_scores`), trained and untrained."""
        tc, trained, untrained = cls.networks(checkpoint)
        rows = np.flatnonzero(store.allowed)
        table = store.table.loc[rows, ["scan_id", "subject_id", "level"]].reset_index(drop=True)
        figures: dict[str, Any] = {}
        config = checkpoint["identity"]["config"]
        ranges = PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in config.items()}).augment_ranges()
        for name, net in (("trained", trained), ("untrained", untrained)):
            with torch.no_grad():
                scores = cls.item_scores(net, store, rows, tc, ranges, max(1, batch_size // cls.volumes_per_sample))
            for column, values in zip(("view1_top1", "view2_top1"), scores):
                table[f"{name}_{column}"] = values
            figures[name] = {view: float(values.mean()) if len(rows) else None
                             for view, values in zip(cls.views, scores)}
        figures["chance_top1"] = cls.chance_of(tc, len(rows))
        figures["chance_label"] = cls.chance
        figures["views"] = dict(zip(("view1", "view2"), cls.views.values()))
        figures["paper"] = None
        log.info("%d test %s: %s", len(rows), store.noun, ", ".join(
            f"{text} {figures['trained'][view]} (untrained {figures['untrained'][view]})"
            for view, text in cls.views.items()))
        return table, figures

    @classmethod
    @abc.abstractmethod
    def item_scores(cls, net: nn.Module, store: VolumeStore, rows: np.ndarray, tc: TaskConfig, ranges: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The two scores of every test volume at ``rows`` (each in [0, 1])."""

    @classmethod
    @abc.abstractmethod
    def chance_of(cls, tc: TaskConfig, n: int) -> float | None:
        """The chance level of the task's first score (``n`` test volumes)."""


class RotationMethod(PretextMethod):
    """Rotation prediction (see the module's docstring)."""

    name = "rotation"
    section = "rotation"
    volumes_per_sample = ROTATIONS
    views = {"rotation_0_180": "0 and 180 degrees", "rotation_90_270": "90 and 270 degrees"}
    chance = "chance: 1 of 4 rotations"

    @classmethod
    def network(cls, spec: EncoderSpec, tc: TaskConfig) -> nn.Module:
        return RotationNet(spec, tc.hidden_dim)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, int, int]:
        x, labels = all_rotations(batch["x"])
        logits = model(x)
        return F.cross_entropy(logits.float(), labels), int((logits.argmax(1) == labels).sum()), len(labels)

    @classmethod
    def item_scores(cls, net: nn.Module, store: VolumeStore, rows: np.ndarray, tc: TaskConfig, ranges: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        hits = []
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(store.load(rows[start:start + batch_size]))
            rotated, labels = all_rotations(x)
            hit = (net(rotated).argmax(1) == labels).float().view(ROTATIONS, len(x)).T
            hits.append(hit.numpy())
        hit = np.concatenate(hits) if hits else np.zeros((0, ROTATIONS))
        return hit[:, [0, 2]].mean(1), hit[:, [1, 3]].mean(1)

    @classmethod
    def chance_of(cls, tc: TaskConfig, n: int) -> float | None:
        return 1 / ROTATIONS


class RelativeLocationMethod(PretextMethod):
    """Relative location of patches (see the module's docstring)."""

    name = "relative_location"
    section = "relative_location"
    settings = RelativeLocationConfig
    volumes_per_sample = 9
    views = {"edge_accuracy": "the 4 edge neighbours", "corner_accuracy": "the 4 corner neighbours"}
    chance = "chance: 1 of 8 positions"

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        super().__init__(cfg, store)
        assert isinstance(self.tc, RelativeLocationConfig)
        self.grid = grid_of(store.shape, self.tc)

    @classmethod
    def network(cls, spec: EncoderSpec, tc: TaskConfig) -> nn.Module:
        return RelativeLocationNet(spec, tc.hidden_dim)

    def jitter(self, idx: torch.Tensor, draw: AugmentDraw | None) -> torch.Tensor:
        """Training: drawn for the global batch, this process's share; evaluation: each sample's seeded."""
        if draw is not None:
            return self.grid.draw_jitter(draw.n_global, draw.generator)[draw.mine]
        return evaluation_jitter(self.grid, idx)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, int, int]:
        x = batch["x"]
        patches = cut_patches(x, self.grid, self.jitter(batch["idx"], draw).to(x.device))
        logits = model(patches)
        labels = torch.arange(len(NEIGHBOURS), device=x.device).repeat(len(x))
        return F.cross_entropy(logits.float(), labels), int((logits.argmax(1) == labels).sum()), len(labels)

    @classmethod
    def item_scores(cls, net: nn.Module, store: VolumeStore, rows: np.ndarray, tc: TaskConfig, ranges: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(tc, RelativeLocationConfig)
        grid = grid_of(store.shape, tc)
        hits = []
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(store.load(rows[start:start + batch_size]))
            logits = net(cut_patches(x, grid, evaluation_jitter(grid, torch.arange(start, start + len(x)))))
            hits.append((logits.argmax(1) == torch.arange(len(NEIGHBOURS)).repeat(len(x))).float()
                        .view(len(x), len(NEIGHBOURS)).numpy())
        hit = np.concatenate(hits) if hits else np.zeros((0, len(NEIGHBOURS)))
        corner = [i for i in range(len(NEIGHBOURS)) if i not in EDGE]
        return hit[:, EDGE].mean(1), hit[:, corner].mean(1)

    @classmethod
    def chance_of(cls, tc: TaskConfig, n: int) -> float | None:
        return 1 / len(NEIGHBOURS)


def grid_of(shape: tuple[int, int, int], tc: RelativeLocationConfig) -> Grid:
    grid = Grid(shape[1], shape[2], tc.gap_fraction, tc.jitter_fraction)
    grid.patch()   # fails now if the slices are too small
    return grid


def evaluation_jitter(grid: Grid, idx: torch.Tensor) -> torch.Tensor:
    """Each sample's fixed jitter, seeded by its index (whatever batch or process it falls in)."""
    if not len(idx):
        return torch.zeros((0, 9, 2), dtype=torch.long)
    return torch.cat([grid.draw_jitter(1, seeds.generator(seeds.evaluation_views(int(i)))) for i in idx])


class SwavMethod(PretextMethod):
    """SwAV, the clustering task (see the module's docstring)."""

    name = "swav"
    section = "swav"
    settings = SwavConfig
    volumes_per_sample = 2
    views = {"same_prototype": "both views on one prototype", "swav_top1": "view 1 finds its view 2 (top-1)"}
    chance = "chance (top-1): 1 of the test volumes"

    @classmethod
    def network(cls, spec: EncoderSpec, tc: TaskConfig) -> nn.Module:
        assert isinstance(tc, SwavConfig)
        return SwavNet(spec, tc.hidden_dim, tc.projection_dim, tc.prototypes, tc.queue_size)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, int, int]:
        assert isinstance(self.tc, SwavConfig)
        a, b = two_views(batch["x"], batch["idx"], self.ranges, draw)
        n = len(a)
        z, scores = model(torch.cat([a, b]))
        z1, z2 = z.split(n)
        s1, s2 = scores.split(n)
        net = unwrap(model)
        if draw is not None:    # training: Sinkhorn over the global batch (and the queue), this process's rows
            q1, q2 = (swav_codes(gather_keys(s), net, self.tc)[draw.mine] for s in (s1, s2))
            if net.queue is not None:   # after the codes: this step's projections, view 1 then view 2
                rows = gather_keys(batch["row"])
                net.queue.enqueue(torch.cat([gather_keys(z1), gather_keys(z2)]).float(), torch.cat([rows, rows]))
        else:                   # evaluation: each sample's own codes, whatever batch it falls in
            q1, q2 = (F.softmax(s.detach().float() / self.tc.epsilon, dim=1) for s in (s1, s2))
        weights = net.prototypes.weight
        loss = swapped_prediction(z1, z2, weights, q1, q2, self.tc.temperature)
        same = int((s1.argmax(1) == s2.argmax(1)).sum())
        return loss, same, n

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f}, same prototype {row['accuracy']:.3f}"

    @classmethod
    def item_scores(cls, net: nn.Module, store: VolumeStore, rows: np.ndarray, tc: TaskConfig, ranges: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        same, first, second = [], [], []
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(store.load(rows[start:start + batch_size]))
            a, b = two_views(x, torch.arange(start, start + len(x)), ranges, None)
            (za, sa), (zb, sb) = net(a), net(b)
            same.append((sa.argmax(1) == sb.argmax(1)).float().numpy())
            first.append(za)
            second.append(zb)
        if not len(rows):
            return np.zeros(0), np.zeros(0)
        similarity = torch.cat(first) @ torch.cat(second).T
        own = similarity.diagonal()
        found = (similarity.max(dim=1).values <= own).float().numpy()   # a tie counts as found
        return np.concatenate(same), found

    @classmethod
    def chance_of(cls, tc: TaskConfig, n: int) -> float | None:
        return 1 / n if n else None
