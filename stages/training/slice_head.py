"""Hou et al. 2023's herniation classifier on a disc's three central axial slices (their section 2.3, supervised
fine-tuning): each slice goes through the extractor (stages/nets/simclr.py: the ResNet and the first FC block), the
three features are concatenated (3 x fc_units), then dropout ``dr`` and one fully connected layer.

- frozen (the ``slices`` head of the probes): the extractor, pretrained or at pretraining's initial weights (the
  random-frozen baseline), stays fixed; only the FC layer trains;
- end to end (the ``METHOD-scratch`` baseline, their fully supervised ResNet): the extractor trains too, from
  pretraining's initial weights, on the same three-slice input.

Their schedule: Adam, lr 1e-4, batch 32, weight decay ``w``, 200 epochs. Each training disc, each time it is drawn,
gets one crop shared by its three slices: the up-left corner P_ul uniform in (0, m W) x (0, m H), the down-right
corner P_br uniform in ((1 - m) W, W) x ((1 - m) H, H), m = ``crop_margin`` (their 0.25), resized back to W x H.
Validation and test discs are seen whole.

Where the probes share one rule with every other model (stages/training/classify.py): the loss is the class-balanced
cross-entropy; a binary task has two outputs and a softmax, which is the same model as their one output and a sigmoid
(the difference of two linear functions is one linear function); the epoch with the lowest validation loss is kept
(their 200 epochs are ``epochs``; ``patience`` as large stops nothing early).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import seeds
from stages.nets.simclr import SimclrEncoder, disc_features
from stages.training.classify import Batches, ClassifierFit, fit_classifier, predict_logits


class SliceClassifier(nn.Module):
    """The extractor on each of a disc's slices, the features concatenated, dropout and one FC layer: ``forward``
    takes ``(N, K, H, W)`` and gives ``(N, n_classes)`` logits. ``frozen``: the extractor's weights do not train and
    it stays in evaluation mode (its batch-norm statistics fixed)."""

    def __init__(self, encoder: SimclrEncoder, slices: int, n_classes: int, dropout: float, frozen: bool):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        if frozen:
            encoder.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(slices * encoder.spec.fc_units, n_classes)

    def train(self, mode: bool = True) -> SliceClassifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(disc_features(self.encoder, x)))


def crop_boxes(n: int, size: tuple[int, int], margin: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` crop boxes (x0, y0, x1, y1) in pixels of an image of ``size`` (W, H): P_ul uniform in
    (0, margin W) x (0, margin H), P_br uniform in ((1 - margin) W, W) x ((1 - margin) H, H)."""
    w, h = size
    u = torch.rand((n, 4), generator=generator, device=generator.device)
    return torch.stack([u[:, 0] * margin * w, u[:, 1] * margin * h, w - u[:, 2] * margin * w,
                        h - u[:, 3] * margin * h], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each disc of ``x`` (N, K, H, W) cut to its box (N, 4; pixels, the image spanning [0, W] x [0, H]) and resized
    back to H x W: one sampling grid per disc, shared by its K slices (bilinear)."""
    n, _, h, w = x.shape
    half = torch.stack([(boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2], 1)
    middle = torch.stack([(boxes[:, 2] + boxes[:, 0]) / 2, (boxes[:, 3] + boxes[:, 1]) / 2], 1)
    size = torch.tensor([w, h], dtype=boxes.dtype, device=boxes.device)
    theta = torch.zeros((n, 2, 3), dtype=x.dtype, device=x.device)     # output [-1, 1] -> source [-1, 1]
    theta[:, 0, 0], theta[:, 1, 1] = (2 * half / size).unbind(1)
    theta[:, :, 2] = (2 * middle / size - 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def slice_batches(read: Callable[[np.ndarray], torch.Tensor], margin: float, seed: int,
                  device: torch.device) -> Batches:
    """Batches of discs' slices: ``read(positions)`` gives ``(n, K, H, W)``; a training batch is cropped (one
    shared box per disc, drawn from a private generator seeded with ``seed``), any other batch is seen whole."""
    generator = seeds.generator(seeds.classifier_augmentation(seed))

    def batches(positions: np.ndarray, training: bool) -> torch.Tensor:
        x = read(positions).to(device)
        if training and margin > 0:
            boxes = crop_boxes(len(x), (x.shape[3], x.shape[2]), margin, generator).to(device)
            x = crop_resize(x, boxes)
        return x
    return batches


def slice_fit(cfg: Any, seed: int, weight_decay: float, threads: int) -> ClassifierFit:
    """The schedule of one head of a ``slice_head`` config (stages.evaluation.probe_data.SliceHeadConfig): Adam."""
    return ClassifierFit(epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, weight_decay=weight_decay, grad_clip=0.0, seed=seed,
                         threads=threads, optimiser="adam")


def fit_slices(encoder: SimclrEncoder, frozen: bool, dropout: float, read_fit: Callable[[np.ndarray], torch.Tensor],
               read_test: Callable[[np.ndarray], torch.Tensor], targets: np.ndarray, n_train: int, n_val: int,
               n_test: int, n_classes: int, fit: ClassifierFit, margin: float,
               device: torch.device) -> tuple[np.ndarray, pd.DataFrame, SliceClassifier]:
    """Train a :class:`SliceClassifier` on ``encoder`` (``frozen``: the FC layer only) and give the test discs'
    class probabilities ``(n_test, n_classes)``, the history (stages/training/classify.py) and the network.
    ``read_fit(positions)``: the training discs (positions ``0 .. n_train-1``) then the validation discs;
    ``read_test``: the test discs; ``targets``: class indices of the training and validation discs."""
    seeds.seed_torch(seeds.end_to_end(fit.seed))          # the FC layer's initial weights
    slices = int(read_fit(np.zeros(1, dtype=np.int64)).shape[1])
    net = SliceClassifier(encoder, slices, n_classes, dropout, frozen)
    net, history = fit_classifier(net, slice_batches(read_fit, margin, fit.seed, device), targets, n_train, n_val,
                                  n_classes, fit, device)
    logits = predict_logits(net, slice_batches(read_test, 0.0, fit.seed, device), np.arange(n_test), fit.batch_size)
    return torch.softmax(logits, 1).numpy(), history, net
