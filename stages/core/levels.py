"""The spinal levels the workflow works with and their labels (VerSe numbering), in one place.

Vertebral bodies T12 = 19, L1..L5 = 20..24, S1 = 26; discs are 100 + the label of the vertebra above
(T12-L1 = 119 ... L5-S1 = 124). Lists run from top (T12) to bottom (S1).
"""

from __future__ import annotations

import re
from typing import Any

VERTEBRAE: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISCS: tuple[str, ...] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
VERTEBRA_LABELS: dict[str, int] = {"T12": 19, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24, "S1": 26}
DISC_LABELS: dict[str, int] = {d: 100 + VERTEBRA_LABELS[d.split("-")[0]] for d in DISCS}
LABEL_NAMES: dict[int, str] = {**{v: k for k, v in VERTEBRA_LABELS.items()}, **{v: k for k, v in DISC_LABELS.items()}}
TRANSITIONAL_L6 = 25  # VerSe's label of a sixth lumbar vertebra
REGION_LEVEL = "T12-S1"  # the one level of a lumbar region (stages/anatomy/regions.py), T12 to S1


def disc_between(upper: str) -> str:
    """The disc below vertebra ``upper`` (T12 -> T12-L1)."""
    i = VERTEBRAE.index(upper)
    return f"{upper}-{VERTEBRAE[i + 1]}"


NUMBERINGS = ("top", "sacrum")
_NAME = re.compile(r"^\s*([TLS])\s*(\d{1,2})\s*$", re.IGNORECASE)
_DISC = re.compile(r"^\s*([TLS])\s*(\d{1,2})\s*(?:[-/_ ]|TO)?\s*([TLS])?\s*(\d{1,2})\s*$", re.IGNORECASE)
_KINDS = {"vertebra": "vertebra", "vertebral body": "vertebra", "vertebral_body": "vertebra", "body": "vertebra",
          "vb": "vertebra", "v": "vertebra", "disc": "disc", "disk": "disc", "intervertebral disc": "disc",
          "ivd": "disc", "d": "disc"}


class LevelError(ValueError):
    """A level or structure name that is not one of the workflow's (T12 ... S1, T12-L1 ... L5-S1)."""


def structure_kind(text: Any) -> str:
    """``vertebra`` or ``disc`` from the usual ways of naming them (body, VB, vertebral body, disc, disk, IVD)."""
    kind = _KINDS.get(str(text).strip().lower())
    if kind is None:
        raise LevelError(f"unknown structure {str(text)!r} (expected vertebra/body/VB or disc/disk/IVD)")
    return kind


def _vertebra(letter: str, number: str, original: Any) -> str:
    name = f"{letter.upper()}{int(number)}"
    if name not in VERTEBRAE:
        raise LevelError(f"level {str(original)!r} is outside T12 ... S1")
    return name


def normalise_level(text: Any, kind: str | None = None, count_from: str = "top", first: str | None = None) -> str:
    """The workflow's name of a level written as ``L4``, ``L4-L5``, ``L4/L5``, ``L4L5``, ``L4-5`` or a number.

    A number needs ``kind`` and counts structures from ``first``: from the top (``count_from="top"``, 1 = ``first``,
    default T12) or from the sacrum (``"sacrum"``, 1 = ``first``, default L5, counting upwards). Disc ``n`` is the disc
    below vertebra ``n`` in both schemes (from the top, 1 = T12-L1; from the sacrum, 1 = L5-S1). When ``kind`` is
    given, a name of the other kind is an error. Raises :class:`LevelError` for anything else.
    """
    raw = str(text).strip()
    if raw.replace(".0", "", 1).isdigit():
        if kind is None:
            raise LevelError(f"numeric level {raw!r} needs the structure (vertebra or disc)")
        if count_from not in NUMBERINGS:
            raise LevelError(f"unknown level numbering {count_from!r} (expected one of {NUMBERINGS})")
        start = VERTEBRAE.index(first or ("T12" if count_from == "top" else "L5"))
        n = int(float(raw))
        i = start + (n - 1) if count_from == "top" else start - (n - 1)
        if not 0 <= i < len(VERTEBRAE) - (kind == "disc"):
            raise LevelError(f"{kind} number {raw} counted from the {count_from} is outside T12 ... S1")
        return disc_between(VERTEBRAE[i]) if kind == "disc" else VERTEBRAE[i]
    single = _NAME.match(raw)
    if single:
        name = _vertebra(single.group(1), single.group(2), text)
        if kind == "disc":
            raise LevelError(f"level {raw!r} names a vertebra, but the structure is a disc")
        return name
    pair = _DISC.match(raw)
    if not pair:
        raise LevelError(f"unknown level {raw!r}")
    upper = _vertebra(pair.group(1), pair.group(2), text)
    lower = _vertebra(pair.group(3) or pair.group(1), pair.group(4), text)
    if VERTEBRAE.index(lower) != VERTEBRAE.index(upper) + 1:
        raise LevelError(f"level {raw!r} does not name a disc between adjacent vertebrae")
    if kind == "vertebra":
        raise LevelError(f"level {raw!r} names a disc, but the structure is a vertebra")
    return f"{upper}-{lower}"
