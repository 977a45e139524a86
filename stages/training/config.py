"""The ``pretrain`` section of the config, typed: what every pretraining method and the harness read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stages.training.augment import AugmentRanges


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of the config (see its schema)."""

    methods: tuple[str, ...] = ("siamese",)
    structure: str = "vertebra"      # the volumes pretraining reads: vertebra (bodies, the paper) or disc
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    threads: int = 2
    gpus: int = 0
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    grad_clip: float = 0.0
    lr_factor: float = 0.1
    plateau_patience: int = 3
    lr_drops: int = 2
    max_epochs: int = 100
    checkpoint_every: int = 200
    width: float = 1.0
    embedding_dim: int = 1024
    dropout: float = 0.5
    contrastive_margin: float = 1.0
    level_loss_weight: float = 1.0
    rotation_deg: float = 15.0
    shift_fraction: tuple[float, float] = (0.214, 0.107)
    shift_slices: int = 2
    scale_range: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.2
    flip: bool = True
    prefetch: int = 4
    eval_batch_size: int = 64
    # set by a method with a config section of its own (Method.configure; not keys of the `pretrain` section): the
    # optimiser (sgd: SGD with momentum and weight decay, the paper's; adam: Adam with L2 weight decay) and the
    # method's own section, recorded so that a checkpoint resumes only under the same settings
    optimiser: str = "sgd"
    method_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> PretrainConfig:
        # imported here: the GPU benchmark imports this module on machines without jsonschema
        from stages.core.config import section_config
        return section_config(cls, "pretrain", section)

    def augment_ranges(self) -> AugmentRanges:
        return AugmentRanges(rotation_deg=self.rotation_deg, shift_fraction=self.shift_fraction,
                             shift_slices=self.shift_slices, scale=self.scale_range, intensity=self.intensity,
                             flip=self.flip)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(value: Any) -> Any:
    """Tuples as lists, inside mappings too (YAML and checkpoint comparisons)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value
