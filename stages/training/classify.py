"""Training of the downstream disc classifier (stages/nets/disc_cnn.py): one loop for every model of the comparison.

The models differ only in what is trained and what a batch holds (stages/probe.py builds them):

- end to end (``scratch``, ``METHOD-finetune``, the supervised encoder): the whole :class:`DiscClassifier` on disc
  volumes, each training batch augmented on the fly (rotation, scaling, shifts, intensity, mid-sagittal flip: the
  ``probe_training`` ranges, one transform per volume);
- frozen (``transfer`` head of a pretrained, random or supervised encoder): FC6-FC8 (:class:`FcHead`) on the cached
  Conv1-Conv5 features; a training sample reads one of its cached views per epoch (view 0 as is, the others the
  encoder's fixed augmented copies), validation and test read view 0.

Both: SGD with momentum 0.9 (or Adam: Hou et al. 2023's three-slice head, stages/training/slice_head.py) on the
class-balanced cross-entropy (Jamaludin et al. 2017, eq. 2), the configured
learning rate, batch size, weight decay and gradient clipping, the weights of the epoch with the lowest loss on the
downstream validation part kept, stopped after ``patience`` epochs without improvement (after ``epochs`` when there is
no validation part). Seeded: the same seed gives the same weights on the CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages.core import seeds
from stages.nets.siamese import BalancedCrossEntropy, class_balanced_weights
from stages.training.augment import (
    AugmentRanges,
    PairParams,
    augment_volumes,
    sample_volume_params,
)

log = logging.getLogger("classify")

# A batch source: (sample positions, training?) -> inputs on the device
Batches = Callable[[np.ndarray, bool], torch.Tensor]


@dataclass(frozen=True)
class ClassifierFit:
    """The schedule of one classifier's training (the ``probe_training`` keys of the same names)."""

    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    grad_clip: float
    seed: int
    threads: int = 2
    optimiser: str = "sgd"      # SGD with momentum 0.9, or Adam (Hou et al. 2023's head: stages/training/slice_head.py)

    def __post_init__(self) -> None:
        if self.optimiser not in ("sgd", "adam"):
            raise ValueError(f"optimiser must be sgd or adam, got {self.optimiser!r}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, patience and batch_size must be >= 1, got {self}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"learning_rate must be > 0, weight_decay and grad_clip >= 0, got {self}")

    @classmethod
    def from_section(cls, cfg: Any, seed: int) -> ClassifierFit:
        """The schedule of a ``probe_training`` config (stages.evaluation.probe_data.ProbeConfig) with ``seed``."""
        return cls(epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                   learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                   seed=seed, threads=cfg.threads)


def classification_ranges(cfg: Any) -> AugmentRanges:
    """The classification augmentation of a ``probe_training`` config (its rotation_deg, shift_fraction,
    shift_slices, scale_range, intensity and flip)."""
    return AugmentRanges(rotation_deg=cfg.rotation_deg, shift_fraction=tuple(cfg.shift_fraction),
                         shift_slices=cfg.shift_slices, scale=tuple(cfg.scale_range), intensity=cfg.intensity,
                         flip=cfg.flip)


def fit_classifier(model: nn.Module, batches: Batches, targets: np.ndarray, n_train: int, n_val: int,
                   n_classes: int, cfg: ClassifierFit, device: torch.device) -> tuple[nn.Module, pd.DataFrame]:
    """Train ``model``'s trainable parameters. Samples ``0 .. n_train-1`` are training, the next ``n_val``
    validation; ``targets`` holds every sample's class index; ``batches(positions, training)`` gives the inputs.
    Returns the model with the best epoch's weights and one history row per epoch (epoch, train_loss, val_loss,
    train_accuracy, kept)."""
    if n_train == 0:
        raise ValueError("no training samples")
    torch.set_num_threads(cfg.threads)
    model.to(device)
    targets_t = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=device)
    criterion = BalancedCrossEntropy(class_balanced_weights(targets_t[:n_train].cpu(), n_classes)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = (torch.optim.SGD(trainable, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
                 if cfg.optimiser == "sgd" else
                 torch.optim.Adam(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))
    generator = seeds.generator(seeds.end_to_end(cfg.seed))
    best, best_loss, best_epoch, history = copy.deepcopy(model.state_dict()), float("inf"), 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n_train, generator=generator).numpy()
        total, correct = 0.0, 0
        for start in range(0, n_train, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            logits = model(batches(idx, True))
            loss = criterion(logits, targets_t[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == targets_t[idx]).sum())
        train_loss = total / n_train
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}): lower "
                                     "probe_training.learning_rate or set probe_training.grad_clip")
        val_loss = None
        if n_val:
            val_logits = predict_logits(model, batches, np.arange(n_train, n_train + n_val), cfg.batch_size)
            val_loss = float(criterion(val_logits.to(device), targets_t[n_train:n_train + n_val]))
        watched = val_loss if val_loss is not None else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "train_accuracy": correct / n_train})
        log.debug("epoch %d: training loss %.4f, validation loss %s", epoch, train_loss,
                  "n/a" if val_loss is None else f"{val_loss:.4f}")
        if watched < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(model.state_dict()), watched, epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    log.info("kept the weights of epoch %d of %d (%s loss %.4f)", best_epoch, len(history),
             "validation" if n_val else "training", best_loss)
    model.load_state_dict(best)
    return model, pd.DataFrame(history).assign(kept=lambda h: h.epoch == best_epoch)


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Batches, positions: np.ndarray, batch_size: int) -> torch.Tensor:
    """Logits ``(n, n_classes)`` of the samples at ``positions`` (no augmentation), on the CPU."""
    model.eval()
    out = [model(batches(positions[s:s + batch_size], False)).float().cpu()
           for s in range(0, len(positions), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def volume_batches(read: Callable[[np.ndarray], np.ndarray], ranges: AugmentRanges, seed: int,
                   device: torch.device) -> Batches:
    """Batches of volumes: ``read(positions)`` gives ``(n, S, H, W)`` volumes; training batches are augmented with
    ``ranges`` (a seeded draw per batch)."""
    generator = seeds.generator(seeds.classifier_augmentation(seed))
    identity = ranges == AugmentRanges.identity()

    def batches(positions: np.ndarray, training: bool) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(read(positions), dtype=np.float32)).to(device)
        if training and not identity:
            x = augment_volumes(x, volume_params(len(x), ranges, generator, device))
        return x
    return batches


def volume_params(n: int, ranges: AugmentRanges, generator: torch.Generator, device: torch.device) -> PairParams:
    """``n`` volumes' transforms drawn from ``generator`` (on its device), moved to ``device``."""
    params = sample_volume_params(n, ranges, generator)
    if params.angle_deg.device == device:
        return params
    return type(params)(**{k: v.to(device) for k, v in vars(params).items()})


def view_batches(features: np.ndarray, rows: np.ndarray, seed: int, device: torch.device) -> Batches:
    """Batches of cached features ``features[row, view]`` (``(n_rows, views, D)``) for the samples whose rows are
    ``rows``: a training batch reads a random view per sample (seeded), otherwise view 0."""
    rng = np.random.default_rng(seeds.view_choice(seed))
    views = features.shape[1]

    def batches(positions: np.ndarray, training: bool) -> torch.Tensor:
        r = rows[positions]
        v = rng.integers(views, size=len(r)) if training and views > 1 else np.zeros(len(r), dtype=np.int64)
        order = np.argsort(r, kind="stable")
        out = np.empty((len(r), features.shape[2]), dtype=np.float32)
        out[order] = features[r[order], v[order]]
        return torch.from_numpy(out).to(device)
    return batches
