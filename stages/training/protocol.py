"""What the pretraining harness (stages/training/harness.py) asks of a method, and what it hands one.

A method is a class built as ``Method(cfg, store)`` (after the harness has seeded the initial weights) and registered
by name in :data:`stages.training.registry.METHODS`. It owns everything the harness does not know: its model, how a
batch of its samples is read and augmented, its loss, the statistics it logs, what the progress bar and the epoch log
line show, and its own pretext evaluation on the held-out self-supervision test part (stages/pretext_eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from stages.training.config import PretrainConfig
from stages.training.store import VolumeStore


@dataclass(frozen=True)
class AugmentDraw:
    """The random draw of one training step: its generator (seeded by the step, stages/core/seeds.py), the size of
    the global batch, and the share of it this process holds. A method draws its augmentation for the global batch
    and keeps ``mine``, so several processes see exactly what one would."""

    generator: torch.Generator
    n_global: int
    mine: slice


class Method(Protocol):
    """A pretraining method, as the harness uses it.

    Statistics: :meth:`loss` returns, besides the loss, a dict of sums over its batch (summed again over steps and
    processes by the harness); :meth:`summarise` turns such sums into one metrics row.

    Optional members (the defaults in brackets): ``watch``, the column the plateau rule and the choice of the
    handed-on epoch watch and whether lower or higher is better [("loss", "min")]; ``section``, the name of the
    method's own config section [None], with the classmethod ``configure(cfg, section_values)`` returning the
    harness's settings under it (see :func:`configured`); ``uses_pairs``, whether it reads the splits' pairs [True].
    """

    name: str                     # its name in the registry, the workflow's {method}
    model: nn.Module              # has an ``encoder`` attribute: what downstream stages use (encoder.pt)
    columns: tuple[str, ...]      # its metrics columns, in order; "loss" is what the plateau rule watches
    volumes_per_sample: int       # volumes one sample holds: an evaluation batch holds eval_batch_size volumes
    unit: str                     # what a sample is called in the log ("pairs")

    def __init__(self, cfg: PretrainConfig, store: VolumeStore) -> None: ...

    def n_samples(self, part: str) -> int:
        """Samples of self-supervision part ``part`` ("train", "val")."""

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``idx`` of ``part`` as CPU tensors (run ahead of the loop by a background thread)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``batch`` (on the device) through ``model`` (the method's model, or its DDP wrapper), and
        the batch's summed statistics. ``draw`` is None in evaluation: no augmentation."""

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """One value per name in ``columns``, and ``samples`` (how many samples the sums hold), from summed
        statistics (possibly empty)."""

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures for one step's statistics."""

    def describe(self, row: dict[str, Any]) -> str:
        """A metrics row (from :meth:`summarise`) in the epoch log line."""

    def encoder_spec(self) -> dict[str, Any]:
        """What rebuilds ``model.encoder`` (saved in encoder.pt and the checkpoints)."""

    @classmethod
    def pretext(cls, checkpoint: dict[str, Any], store: VolumeStore,
                batch_size: int) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The method's own pretext task on the self-supervision test part (``store`` allows that part only), for
        the weights a pretraining ``checkpoint`` handed on (:func:`handed_on`) and for the same network at its
        initial weights: one row per test item, and the figures (evaluation.json)."""


def handed_on(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of the whole model a pretraining checkpoint hands on: the best epoch's (the last ones if the
    run never finished an epoch)."""
    return checkpoint.get("best_model") or checkpoint["model"]


def configured(build: type[Method], cfg: PretrainConfig, sections: dict[str, dict[str, Any]]) -> PretrainConfig:
    """``cfg`` as method ``build`` runs it: unchanged for a method without a section of its own, else what its
    ``configure`` makes of it with its section's values from ``sections`` (by section name)."""
    section = getattr(build, "section", None)
    if section is None:
        return cfg
    return build.configure(cfg, sections.get(section, {}))  # type: ignore[attr-defined]
