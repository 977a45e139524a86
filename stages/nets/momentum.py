"""The networks of the momentum-encoder family (MoCo v2, BYOL, and MLSSCL of Cao et al. 2022, which combines them): an
online encoder (a 3D backbone, a 2-layer MLP projector and, for BYOL and MLSSCL, a 2-layer MLP predictor) trained by
back-propagation; a target encoder (backbone and projector) that follows it as a momentum average; and a first-in,
first-out queue of past target keys (MoCo, MLSSCL).

Pieces shared by every method of the family:

- :class:`ProjectionMLP`: Linear, [batch norm], ReLU, Linear (MoCo v2's head has no batch norm; BYOL's projector and
  predictor have it).
- :class:`MomentumNet`: the online and target networks over one backbone architecture; :meth:`MomentumNet.update_target`
  is the momentum update theta_t <- m theta_t + (1 - m) theta_o (He et al. 2020, eq. 2; Grill et al. 2020, section 3.1).
- :class:`KeyQueue`: the queue of past keys with the identity of the sample each key came from, so that a loss can
  leave a sample's own stale keys (and, for a longitudinal loss, its subject's) out of its negatives.

The backbone is the encoder ``spec.backbone`` names (stages/nets/encoders.py): the Siamese network's 3D trunk
(stages/nets/siamese.py, Conv1 to FC7) or MONAI's 3D ResNet-18; its embedding is what downstream stages read, as they
read the Siamese encoder's. Everything here is part of the model's ``state_dict``
(the target's weights are parameters without gradients, the queue's keys and pointer are buffers), so a checkpoint
resumes a run exactly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from stages.nets.encoders import build_encoder
from stages.nets.siamese import EncoderSpec, level_logits


class ProjectionMLP(nn.Module):
    """``in_dim`` -> Linear -> [BatchNorm1d] -> ReLU -> Linear -> ``out_dim``: MoCo v2's projection head
    (``batch_norm`` False), BYOL's projector and predictor (``batch_norm`` True)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool):
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"MLP sizes must be >= 1, got {in_dim} -> {hidden_dim} -> {out_dim}")
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if batch_norm
                                    else nn.Identity(), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MomentumNet(nn.Module):
    """The online network (``encoder``, ``projector``, and ``predictor`` when ``predictor`` is set) and the target
    network (``target_encoder``, ``target_projector``), which starts as a copy of the online one and is changed only
    by :meth:`update_target`. ``encoder`` is the backbone handed on to downstream stages.

    ``forward(online, target)``: the online network's outputs for the volumes ``online`` (through the predictor if
    there is one) and the target network's for ``target`` (no gradient), both ``(n, out_dim)``, unnormalised."""

    def __init__(self, spec: EncoderSpec, hidden_dim: int, out_dim: int, predictor: bool, batch_norm: bool):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.projector = ProjectionMLP(spec.embedding_dim, hidden_dim, out_dim, batch_norm)
        self.predictor = ProjectionMLP(out_dim, hidden_dim, out_dim, batch_norm) if predictor else None
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    @torch.no_grad()
    def update_target(self, m: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_o for the target's backbone and projector (their batch-norm
        statistics are the target's own, as in MoCo and BYOL)."""
        if not 0 <= m <= 1:
            raise ValueError(f"the momentum coefficient must be in [0, 1], got {m}")
        for t, o in zip(self.target_parameters(), self.online_parameters()):
            t.mul_(m).add_(o.detach(), alpha=1 - m)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.encoder(x))
        return self.predictor(z) if self.predictor is not None else z

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_encoder(x))

    def forward(self, online: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.online(online), self.target(target)


class KeyQueue(nn.Module):
    """A first-in, first-out queue of ``size`` keys ``(size, dim)`` and the identity of the sample each came from
    (``ids``; -1 for a slot not filled yet). It starts as random unit vectors (MoCo's initial queue), which serve
    as negatives until real keys replace them. :meth:`enqueue` writes a batch of keys over the oldest ones."""

    keys: torch.Tensor
    ids: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"the queue needs size and dim >= 1, got {size} and {dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``keys`` ``(n, dim)`` and their sample ``ids`` ``(n,)`` over the ``n`` oldest entries (the last
        ``size`` of them when ``n`` > ``size``)."""
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1] or ids.shape != keys.shape[:1]:
            raise ValueError(f"expected keys (n, {self.keys.shape[1]}) and ids (n,), got {tuple(keys.shape)} and "
                             f"{tuple(ids.shape)}")
        keys, ids = keys[-self.size:], ids[-self.size:]
        slots = (self.pointer + torch.arange(len(keys), device=keys.device)) % self.size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.pointer.copy_((self.pointer + len(keys)) % self.size)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and ids from the oldest to the newest."""
        order = (self.pointer + torch.arange(self.size, device=self.keys.device)) % self.size
        return self.keys[order], self.ids[order]


class LevelMomentumNet(MomentumNet):
    """A :class:`MomentumNet` without predictor whose online FC7 embedding also feeds FC8 over ``spec.n_levels``
    levels (the Siamese network's level head, :meth:`stages.nets.siamese.SiameseNet.levels`): the longitudinal
    InfoNCE's auxiliary level loss. ``forward`` returns the online projection, the target projection and the level
    logits of the online volumes."""

    def __init__(self, spec: EncoderSpec, hidden_dim: int, out_dim: int, batch_norm: bool):
        super().__init__(spec, hidden_dim, out_dim, predictor=False, batch_norm=batch_norm)
        self.fc8 = nn.Linear(spec.embedding_dim, spec.n_levels)

    def levels(self, emb: torch.Tensor) -> torch.Tensor:
        """FC8's logits from FC7 embeddings standardised per sample (as the Siamese network's)."""
        return level_logits(self.fc8, emb)

    def forward(self, online: torch.Tensor,  # type: ignore[override]
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = self.encoder(online)
        return self.projector(emb), self.target(target), self.levels(emb)
