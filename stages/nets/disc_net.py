"""The downstream network trained end to end (from scratch, fine-tuned, or pretrained with labels), and its trainer.

:class:`DiscNet` is the pretraining encoder (stages/nets/siamese.py) with a linear layer on top: for a disc task the one
encoder embeds the body above and the body below (shared weights) and the layer reads their concatenated embeddings;
for the level task it reads one body's embedding. The embeddings are standardised per sample first, as FC8 of the
Siamese network reads them (FC7 starts small). With ``level_head`` the network also classifies each body's level
(the supervised "upper bound" encoder: level and grade labels).

Training: SGD with momentum on the class-balanced cross-entropy (Jamaludin et al. 2017, eq. 2), the weights of the
epoch with the lowest validation loss kept, stopped after ``patience`` epochs without improvement (or after
``epochs`` when there is no validation part). Seeded: the same seed gives the same weights on the CPU.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import seeds
from stages.core.runtime import select_device
from stages.nets.encoders import build_encoder, load_encoder
from stages.nets.siamese import (
    N_LEVELS,
    BalancedCrossEntropy,
    EncoderSpec,
    class_balanced_weights,
)

log = logging.getLogger("disc_net")


class DiscNet(nn.Module):
    """Encoder + linear classifier over ``n_classes``; ``inputs`` = 2 (a disc's two bodies) or 1 (a body)."""

    def __init__(self, spec: EncoderSpec, n_classes: int, inputs: int, level_head: bool = False):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.inputs = inputs
        self.head = nn.Linear(inputs * spec.embedding_dim, n_classes)
        self.level_head = nn.Linear(spec.embedding_dim, N_LEVELS) if level_head else None

    @staticmethod
    def _standardise(emb: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(emb, emb.shape[-1:])

    def embed(self, upper: torch.Tensor, lower: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised embeddings of every body ``(n * inputs, D)`` and the concatenated features ``(n, inputs*D)``."""
        x = upper if self.inputs == 1 else torch.cat([upper, lower])
        emb = self._standardise(self.encoder(x))
        return emb, emb if self.inputs == 1 else torch.cat(emb.chunk(2), dim=1)

    def forward(self, upper: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(upper, lower)[1])


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int
    threads: int = 2
    level_loss_weight: float = 0.0   # > 0 only for a network with a level head


class BodyReader:
    """Reads body volumes from ``vertebrae`` (the extract stage's vertebrae.npy, a memory map), only the rows it was
    opened with."""

    def __init__(self, vertebrae: Path, rows: np.ndarray):
        self.array = np.load(vertebrae, mmap_mode="r")
        self.allowed = np.zeros(len(self.array), dtype=bool)
        self.allowed[np.asarray(rows, dtype=np.int64)] = True

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if not self.allowed[rows].all():
            raise RuntimeError(f"refusing to read rows {rows[~self.allowed[rows]][:5].tolist()} not opened for this job")
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.float32)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)


def _batch(samples: pd.DataFrame, read: BodyReader, inputs: int, device: torch.device) -> dict[str, torch.Tensor]:
    upper = read(samples.upper.to_numpy()).to(device)
    lower = read(samples.lower.to_numpy()).to(device) if inputs == 2 else None
    out = {"upper": upper, "label": torch.tensor(samples.target.to_numpy(), device=device)}
    if lower is not None:
        out["lower"] = lower
    if "upper_level" in samples:
        levels = samples.upper_level.to_numpy() if inputs == 1 else np.concatenate(
            [samples.upper_level.to_numpy(), samples.lower_level.to_numpy()])
        out["levels"] = torch.as_tensor(levels, device=device)
    return out


def _loss(model: DiscNet, batch: dict[str, torch.Tensor], criterion: nn.Module, level_criterion: nn.Module | None,
          level_weight: float) -> torch.Tensor:
    emb, features = model.embed(batch["upper"], batch.get("lower"))
    loss = criterion(model.head(features), batch["label"])
    if level_criterion is not None and model.level_head is not None and level_weight > 0:
        loss = loss + level_weight * level_criterion(model.level_head(emb), batch["levels"])
    return loss


def fit(model: DiscNet, train: pd.DataFrame, val: pd.DataFrame, read: BodyReader, n_classes: int, cfg: FitConfig,
        device: torch.device) -> tuple[DiscNet, pd.DataFrame]:
    """Train ``model`` on ``train`` (columns upper, lower, target[, upper_level, lower_level]); returns the weights
    of the best validation epoch and one history row per epoch."""
    torch.set_num_threads(cfg.threads)
    if len(train) == 0:
        raise ValueError("no training samples")
    model.to(device)
    criterion = BalancedCrossEntropy(class_balanced_weights(torch.tensor(train.target.to_numpy()), n_classes))
    criterion.to(device)
    level_criterion = None
    if model.level_head is not None:
        levels = np.concatenate([train.upper_level.to_numpy()]
                                + ([train.lower_level.to_numpy()] if model.inputs == 2 else []))
        level_criterion = BalancedCrossEntropy(class_balanced_weights(torch.as_tensor(levels), N_LEVELS)).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9,
                                weight_decay=cfg.weight_decay)
    generator = seeds.generator(seeds.end_to_end(cfg.seed))
    best, best_loss, best_epoch, history = copy.deepcopy(model.state_dict()), float("inf"), 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            batch = _batch(train.iloc[order[start:start + cfg.batch_size]], read, model.inputs, device)
            loss = _loss(model, batch, criterion, level_criterion, cfg.level_loss_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            total += float(loss.detach()) * len(batch["label"])
        train_loss = total / len(train)
        val_loss = evaluate_loss(model, val, read, criterion, level_criterion, cfg, device) if len(val) else None
        watched = val_loss if val_loss is not None else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        log.info("epoch %d: training loss %.4f, validation loss %s", epoch, train_loss,
                 "n/a" if val_loss is None else f"{val_loss:.4f}")
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}): lower "
                                     "probe_training.learning_rate")
        if watched < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(model.state_dict()), watched, epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    log.info("kept the weights of epoch %d of %d (%s loss %.4f)", best_epoch, len(history),
             "validation" if len(val) else "training", best_loss)
    model.load_state_dict(best)
    return model, pd.DataFrame(history).assign(kept=lambda h: h.epoch == best_epoch)


@torch.no_grad()
def evaluate_loss(model: DiscNet, samples: pd.DataFrame, read: BodyReader, criterion: nn.Module,
                  level_criterion: nn.Module | None, cfg: FitConfig, device: torch.device) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(samples), cfg.batch_size):
        batch = _batch(samples.iloc[start:start + cfg.batch_size], read, model.inputs, device)
        total += float(_loss(model, batch, criterion, level_criterion, cfg.level_loss_weight)) * len(batch["label"])
    return total / len(samples)


@torch.no_grad()
def predict(model: DiscNet, samples: pd.DataFrame, read: BodyReader, batch_size: int,
            device: torch.device) -> np.ndarray:
    """Class probabilities ``(n, n_classes)``."""
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        part = samples.iloc[start:start + batch_size]
        upper = read(part.upper.to_numpy()).to(device)
        lower = read(part.lower.to_numpy()).to(device) if model.inputs == 2 else None
        out.append(torch.softmax(model(upper, lower).float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)


def train_and_predict(kind: str, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: np.ndarray,
                      vertebrae: Path, encoder: Path | None, cfg: FitConfig, device_name: str,
                      size: tuple[float, int]) -> tuple[np.ndarray, dict[str, Any], pd.DataFrame, DiscNet]:
    """Train a :class:`DiscNet` end to end on ``train`` (from ``encoder``'s weights, or random weights of ``size`` =
    (width, embedding_dim)) and return the test samples' class probabilities, facts, the training history and the
    trained network (on the CPU)."""
    device = select_device(device_name, "probe_training.device")

    def rows_of(*frames: pd.DataFrame) -> np.ndarray:
        rows = np.concatenate([f[c].to_numpy() for f in frames for c in ("upper", "lower")])
        return rows[rows >= 0]

    read = BodyReader(vertebrae, rows_of(train, val))          # training never reads a test volume
    read_test = BodyReader(vertebrae, rows_of(test))
    inputs = 2 if kind == "disc" else 1
    seeds.seed_torch(seeds.end_to_end(cfg.seed))
    if encoder is not None:
        pretrained, _ = load_encoder(encoder)
        net = DiscNet(pretrained.spec, len(classes), inputs)
        net.encoder.load_state_dict(pretrained.state_dict())
    else:
        slices, height, width_px = read.array.shape[1:]
        net = DiscNet(EncoderSpec(slices=slices, height=height, width_px=width_px, width=size[0],
                                  embedding_dim=size[1]), len(classes), inputs)

    def target(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(target=np.searchsorted(classes, frame.label.to_numpy()))

    net, history = fit(net, target(train), target(val), read, len(classes), cfg, device)
    proba = predict(net, test, read_test, cfg.batch_size, device)
    return proba, {"epochs_run": len(history), "kept_epoch": int(history.epoch[history.kept].iloc[0]),
                   "init": "pretrained" if encoder is not None else "random", "device": str(device)}, history, net.cpu()


def save_net(net: DiscNet) -> dict[str, np.ndarray]:
    """A :class:`DiscNet` as named arrays (for ``np.savez``; :func:`load_net` rebuilds it)."""
    arrays = {f"net/{k}": v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    arrays["net/spec"] = np.array(json.dumps(net.encoder.spec.to_dict()))
    arrays["net/shape"] = np.array([net.head.out_features, net.inputs, int(net.level_head is not None)])
    return arrays


def load_net(arrays: Any) -> DiscNet:
    """The network written by :func:`save_net` (``arrays``: e.g. an ``np.load`` of the ``.npz``), in eval mode."""
    if "net/spec" not in arrays:
        raise KeyError("the saved model holds no end-to-end network")
    n_classes, inputs, level_head = (int(v) for v in arrays["net/shape"])
    net = DiscNet(EncoderSpec(**json.loads(str(arrays["net/spec"]))), n_classes, inputs, bool(level_head))
    state = {k.removeprefix("net/"): torch.from_numpy(np.asarray(arrays[k])) for k in arrays.keys()
             if k.startswith("net/") and k not in ("net/spec", "net/shape")}
    net.load_state_dict(state)
    return net.eval()
