"""A deliberately small second pretraining method, for the tests only (not in the workflow's method list): predict
the level of one vertebral body from an augmented view of it. It shows what a method is: one class following
:class:`stages.training.protocol.Method`, registered by name, trained by the unchanged harness."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import seeds
from stages.core.levels import VERTEBRAE
from stages.training.config import PretrainConfig
from stages.training.protocol import AugmentDraw, handed_on
from stages.training.store import VolumeStore


class Killed(RuntimeError):
    """Raised by :class:`ToyMethod` when told to stop a run part way (a stand-in for a killed job)."""


class ToyEncoder(nn.Module):
    """Slices as channels of one strided 2D convolution, pooled to 4 x 4, to a ``dim``-vector: ``(N, S, H, W)`` to
    ``(N, dim)``."""

    def __init__(self, slices: int, channels: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(slices, channels, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                 nn.Flatten(), nn.Linear(channels * 16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ToyNet(nn.Module):
    def __init__(self, slices: int, channels: int, dim: int):
        super().__init__()
        self.encoder = ToyEncoder(slices, channels, dim)
        self.head = nn.Linear(dim, len(VERTEBRAE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ToyMethod:
    """A sample is one vertebral body; the view is augmented by an intensity gain and a left-right flip (drawn for
    the global batch); the loss is the cross-entropy of its level, mean over the batch: logits ``(N, 7)``, levels
    ``(N,)``."""

    name = "toy"
    columns = ("loss", "accuracy")
    volumes_per_sample = 1
    unit = "bodies"
    stop_after: int | None = None     # training batches before :class:`Killed` is raised (None: never)

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.store = store
        self.spec = {"slices": store.shape[0], "channels": 4, "dim": 8}
        self.model = ToyNet(**self.spec)
        bodies = store.table
        self.rows = {part: bodies.index[(bodies.ssl_part == part).to_numpy() & store.allowed[bodies.index]]
                     .to_numpy(dtype=np.int64) for part in ("train", "val")}
        self.batches = 0

    def n_samples(self, part: str) -> int:
        return len(self.rows[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.rows[part][idx]
        return {"x": torch.from_numpy(self.store.load(rows)), "level": torch.from_numpy(self.store.level[rows])}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        x, level = batch["x"], batch["level"]
        if draw is not None:
            if self.stop_after is not None and self.batches >= self.stop_after:
                raise Killed(f"stopped after {self.batches} training batches")
            self.batches += 1
            g = draw.generator
            gain = 1 + 0.4 * (torch.rand(draw.n_global, generator=g, device=g.device) - 0.5)
            flip = torch.rand(draw.n_global, generator=g, device=g.device) < 0.5
            gain, flip = gain[draw.mine, None, None, None], flip[draw.mine, None, None, None]
            x = torch.where(flip, x.flip(1), x) * gain
        logits = model(x)
        loss = F.cross_entropy(logits, level)
        n = len(level)
        correct = float((logits.argmax(1) == level).sum())
        return loss, {"bodies": n, "loss": float(loss.detach()) * n, "correct": correct}

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        bodies = sums.get("bodies", 0.0)
        return {"loss": sums.get("loss", 0.0) / max(bodies, 1.0),
                "accuracy": sums.get("correct", 0.0) / bodies if bodies else float("nan"), "samples": bodies}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{stats['loss'] / max(stats['bodies'], 1):.4f}"}

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f}, accuracy {row['accuracy']:.3f}"

    def encoder_spec(self) -> dict[str, Any]:
        return dict(self.spec)

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The level of every test body, by the trained and by the untrained network."""
        trained = ToyNet(**checkpoint["encoder_spec"])
        trained.load_state_dict(handed_on(checkpoint))
        seeds.seed_torch(seeds.initial_weights(checkpoint["identity"]["config"]["seed"]))
        untrained = ToyNet(**checkpoint["encoder_spec"])
        rows = np.flatnonzero(store.allowed)
        table = pd.DataFrame({"row": rows, "level": store.level[rows]})
        figures: dict[str, Any] = {}
        for name, net in (("trained", trained), ("untrained", untrained)):
            net.eval()
            with torch.no_grad():
                predicted = np.concatenate([net(torch.from_numpy(store.load(rows[i:i + batch_size]))).argmax(1).numpy()
                                            for i in range(0, len(rows), batch_size)])
            table[f"{name}_level"] = predicted
            figures[name] = {"level_accuracy": float((predicted == table.level).mean())}
        return table, figures
