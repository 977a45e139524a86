"""The downstream tasks' samples, the nested label subsets, and the guard that keeps test subjects out of training.

Tasks (Jamaludin et al. 2017, section 4.2; Hou et al. 2023):

- ``grade``: the Pfirrmann grade of a disc (multi-class, 1-5); headline metric: average class accuracy.
- ``herniation``: disc herniation (binary); accuracy, sensitivity, specificity, ROC AUC.
- ``level``: the vertebral level of a body (T12 ... S1), a sanity check of the features.

A disc is seen in its own volume (``probes.disc_input: disc``, the default: the disc classifier of Jamaludin et
al. 2017, section 4.2, Fig. 7), or, with ``disc_input: bodies``, through the two vertebral bodies around it (the body
above and the body below, of the same scan; each body volume holds the adjacent halves of both its discs), whose
feature vector is the concatenation of their two embeddings; a disc whose either body was not extracted is then left
out (and counted).

Label subsets: for seed ``s``, every downstream training subject gets a random key from (``probes.seed``, ``s``,
subject); the subset of fraction ``f`` is the ``ceil(f n)`` subjects with the smallest keys. Subsets of one seed are
therefore nested, each is a function of its own (fraction, seed) alone, and adding a fraction or a seed to the config
leaves every existing subset (and every finished probe job) as it was.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.config import section_config
from stages.core.errors import LeakageError
from stages.core.levels import VERTEBRAE, disc_between

TRAINING_PART = "train"


@dataclass(frozen=True)
class ProbeConfig:
    """The ``probe_training`` section of the config (see its schema)."""

    seed: int
    heads: tuple[str, ...]
    linear_c: tuple[float, ...]
    cv_folds: int
    mlp_hidden: int
    mlp_alpha: float
    max_iter: int
    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    grad_clip: float
    dropout: float
    augment_views: int
    rotation_deg: float
    shift_fraction: tuple[float, float]
    shift_slices: int
    scale_range: tuple[float, float]
    intensity: float
    flip: bool
    level_loss_weight: float
    threads: int
    device: str

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> ProbeConfig:
        return section_config(cls, "probe_training", section)

    def fit_config(self, seed: int, level_loss_weight: float = 0.0) -> Any:
        """The end-to-end trainer's settings (stages.nets.disc_net.FitConfig; PyTorch is imported only for it)."""
        from stages.nets.disc_net import FitConfig
        return FitConfig(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size,
                         learning_rate=self.learning_rate, weight_decay=self.weight_decay, seed=seed,
                         threads=self.threads, level_loss_weight=level_loss_weight)


@dataclass(frozen=True)
class SliceHeadConfig:
    """The ``slice_head`` section of the config (see its schema). Every (dropout, weight decay) pair of the two lists
    is one frozen head (their Table 3 grid); the end-to-end baseline uses the first pair."""

    epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    dropout: tuple[float, ...]
    weight_decay: tuple[float, ...]
    crop_margin: float

    def __post_init__(self) -> None:
        if not 0 <= self.crop_margin < 0.5:
            raise ValueError(f"slice_head.crop_margin must be in [0, 0.5), got {self.crop_margin}")
        if not self.dropout or not self.weight_decay:
            raise ValueError("slice_head.dropout and slice_head.weight_decay need at least one value each")

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> SliceHeadConfig:
        return section_config(cls, "slice_head", section)

    def settings(self) -> list[tuple[str, float, float]]:
        """(head name, dropout, weight decay) of every frozen head: ``slices`` alone, or ``slices dr D wd W`` each."""
        grid = [(d, w) for d in self.dropout for w in self.weight_decay]
        if len(grid) == 1:
            return [("slices", *grid[0])]
        return [(f"slices dr{d:g} wd{w:g}", d, w) for d, w in grid]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str           # "disc" (two body volumes per sample) or "vertebra" (one)
    label: str          # column of splits/volumes.parquet
    binary: bool
    headline: str       # the metric the label-efficiency figure of merit uses


TASKS: dict[str, Task] = {
    "grade": Task("grade", "disc", "pfirrmann", False, "average_class_accuracy"),
    "herniation": Task("herniation", "disc", "herniation", True, "auc"),
    "level": Task("level", "vertebra", "level", False, "accuracy"),
}


def task_samples(volumes: pd.DataFrame, task: Task, disc_input: str = "bodies") -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per labelled sample: subject_id, scan_id, level, downstream_part, label, upper (row of the body above
    or the body itself), lower (row of the body below; -1 for a body task); with ``disc_input`` "disc" a disc task's
    samples carry ``row`` (the disc's row of discs.npy) instead, and upper = lower = -1; and counts of what was left
    out."""
    bodies = volumes[volumes.kind == "vertebra"]
    if task.kind == "disc" and disc_input == "disc":
        if task.label not in volumes:
            raise ValueError(f"no {task.label!r} labels in splits/volumes.parquet: the cohort's gradings table has "
                             f"no such column, so task {task.name!r} cannot run (drop it from probes.tasks)")
        discs = volumes[(volumes.kind == "disc") & volumes[task.label].notna()
                        & volumes.downstream_part.isin(["train", "val", "test"])]
        out = discs.assign(label=discs[task.label].astype(int), upper=-1, lower=-1)
        return _columns(out), {"samples": len(out), "missing_body": 0}   # the disc's own volume: no body needed
    if task.kind == "vertebra":
        out = bodies[bodies.downstream_part.isin(["train", "val", "test"])]
        out = out.assign(label=out.level.map({lv: i for i, lv in enumerate(VERTEBRAE)}), upper=out.row, lower=-1)
        return _columns(out), {"samples": len(out)}
    if task.label not in volumes:
        raise ValueError(f"no {task.label!r} labels in splits/volumes.parquet: the cohort's gradings table has no "
                         f"such column, so task {task.name!r} cannot run (drop it from probes.tasks)")
    discs = volumes[(volumes.kind == "disc") & volumes[task.label].notna()
                    & volumes.downstream_part.isin(["train", "val", "test"])]
    row_of = {(s, lv): int(r) for s, lv, r in bodies[["scan_id", "level", "row"]].itertuples(index=False)}
    upper, lower = [], []
    for scan, level in discs[["scan_id", "level"]].itertuples(index=False):
        above = level.split("-")[0]
        below = level.split("-")[1]
        if disc_between(above) != level:
            raise ValueError(f"unexpected disc level {level!r}")
        upper.append(row_of.get((scan, above), -1))
        lower.append(row_of.get((scan, below), -1))
    out = discs.assign(upper=upper, lower=lower, label=discs[task.label].astype(int))
    complete = (out.upper >= 0) & (out.lower >= 0)
    return _columns(out[complete]), {"samples": int(complete.sum()), "missing_body": int((~complete).sum())}


def _columns(frame: pd.DataFrame) -> pd.DataFrame:
    cols = ["subject_id", "scan_id", "level", "downstream_part", "label", "upper", "lower"]
    cols += [c for c in ("row", "ssl_part") if c in frame]
    return frame[cols].sort_values(["scan_id", "level"]).reset_index(drop=True)


def grade_mapping(grade_classes: tuple[int, ...]) -> dict[int, int]:
    """Pfirrmann grade (1-5) -> class, from ``probes.grade_classes`` (one class per grade, classes 1..K, no gaps)."""
    if len(grade_classes) != 5:
        raise ValueError(f"grade_classes needs one class per Pfirrmann grade 1-5, got {list(grade_classes)}")
    used = sorted(set(grade_classes))
    if used != list(range(1, len(used) + 1)):
        raise ValueError(f"grade_classes must use the classes 1..K without gaps, got {list(grade_classes)}")
    return {grade: int(c) for grade, c in zip(range(1, 6), grade_classes)}


# The probe run layout, the one place it is written: the output folder of one probe job relative to the runs folder,
# as a pattern whose fields are the probe rule's wildcards (workflow/rules/probes.smk).
RUN_FOLDER = "{model}/{task}/f{fraction}/seed{seed}"


def run_folder(model: str, task: str, fraction: float, seed: int) -> str:
    """The output folder of one probe job, relative to the runs folder (:data:`RUN_FOLDER`)."""
    return RUN_FOLDER.format(model=model, task=task, fraction=f"{fraction:g}", seed=seed)


def run_of(path: str | Path) -> dict[str, Any]:
    """(model, task, fraction, seed) of a probe job from its folder or a file in it (:data:`RUN_FOLDER`)."""
    parts = Path(path).parts
    parts = parts[:-1] if Path(path).suffix else parts
    if len(parts) < 4 or not parts[-2].startswith("f") or not parts[-1].startswith("seed"):
        raise ValueError(f"{path} is not a probe job folder ({RUN_FOLDER}) or a file in one")
    model, task, fraction, seed = parts[-4:]
    return {"model": model, "task": task, "fraction": float(fraction[1:]), "seed": int(seed.removeprefix("seed"))}


def _key(seed: int, subset_seed: int, subject: str) -> int:
    digest = hashlib.sha256(f"{seed}:{subset_seed}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def label_subset(subjects: pd.DataFrame, fraction: float, subset_seed: int, seed: int) -> list[str]:
    """The downstream training subjects of label subset (``fraction``, ``subset_seed``); see the module's doc."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a label fraction must be in (0, 1], got {fraction}")
    train = subjects.subject_id[subjects.downstream_part == TRAINING_PART].tolist()
    ordered = sorted(train, key=lambda s: (_key(seed, subset_seed, s), s))
    n = max(1, int(np.ceil(fraction * len(ordered) - 1e-9))) if ordered else 0
    return sorted(ordered[:n])


def check_training_subjects(train_subjects: set[str], subjects: pd.DataFrame, allowed_parts: tuple[str, ...],
                            column: str = "downstream_part") -> None:
    """Raise :class:`LeakageError` unless every training subject is in ``allowed_parts`` of ``column``."""
    part = subjects.set_index("subject_id")[column]
    unknown = sorted(set(train_subjects) - set(part.index))
    if unknown:
        raise LeakageError(f"{len(unknown)} training subject(s) are not in splits/subjects.parquet: {unknown[:3]}")
    bad = sorted(s for s in train_subjects if part[s] not in allowed_parts)
    if bad:
        raise LeakageError(f"{len(bad)} training subject(s) are in {column} parts outside {allowed_parts} "
                           f"(first {bad[0]}: {part[bad[0]]}); refusing to train")
