"""The spinal levels the workflow works with and their labels (VerSe numbering), in one place.

Vertebral bodies T12 = 19, L1..L5 = 20..24, S1 = 26; discs are 100 + the label of the vertebra above
(T12-L1 = 119 ... L5-S1 = 124). Lists run from top (T12) to bottom (S1).
"""

from __future__ import annotations

VERTEBRAE: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISCS: tuple[str, ...] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
VERTEBRA_LABELS: dict[str, int] = {"T12": 19, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24, "S1": 26}
DISC_LABELS: dict[str, int] = {d: 100 + VERTEBRA_LABELS[d.split("-")[0]] for d in DISCS}
LABEL_NAMES: dict[int, str] = {**{v: k for k, v in VERTEBRA_LABELS.items()}, **{v: k for k, v in DISC_LABELS.items()}}
TRANSITIONAL_L6 = 25  # VerSe's label of a sixth lumbar vertebra


def disc_between(upper: str) -> str:
    """The disc below vertebra ``upper`` (T12 -> T12-L1)."""
    i = VERTEBRAE.index(upper)
    return f"{upper}-{VERTEBRAE[i + 1]}"
