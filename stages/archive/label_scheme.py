"""How a cohort's label maps number their structures (``cohort.label_scheme``), and their translation into the
workflow's numbering (VerSe, stages.core.levels) when ingest copies them: one place, so nothing downstream changes.

Schemes:
  verse    VerSe (https://osf.io/b2wxj/wiki): vertebrae 1-28 (C1 ... L5 = 24, L6 = 25, sacrum 26, coccyx 27,
           T13 = 28) and, as this workflow numbers discs, 100 + the label of the vertebra above (101-128).
           Kept as they are: a sixth lumbar vertebra stays 25, which localise reports as transitional.
  spider   SPIDER (van der Graaf et al., Sci. Data 11, 264, 2024; https://doi.org/10.1038/s41597-024-03090-w): vertebrae
           counted upwards from the lowest, L5 = 1 (1-25); discs 200 + the number of the vertebra above, L5-S1 = 201
           (201-225); spinal canal 100; vertebrae cut by the field of view 100 + their number (101-125). The sacrum has
           no label (left out of the segmentations, https://unicorn.grand-challenge.org/task-11, adapted from
           SPIDER). Source of the numbering: the label description of the SPIDER baseline algorithm
           (https://grand-challenge.org/algorithms/spider-baseline-iis/), repeated in the dataset card of its
           Hugging Face copy (https://huggingface.co/datasets/cdoswald/SPIDER) and in the baseline's code (disc = 200 +
           vertebra, DIAGNijmegen/SPIDER-Baseline-IIS ``devel/datasets.py``). It is the workflow's sacrum numbering
           (``cohort.level_numbering.count_from: sacrum``, 1 = L5 and L5-S1) plus offsets. Counting from the bottom,
           the number of a level does not depend on how far up the field of view reaches; it does assume a normal
           count of lumbar vertebrae (the lowest labelled vertebra is taken for L5). The canal, cut vertebrae, and
           levels above T12 and T12-L1 are known and set to background (a cut body is not taken for a whole one).
  mapping  your own (``cohort.label_scheme: {vertebra: {1: L5, ...}, disc: {201: L5-S1, ...}, other: [100]}``):
           the values named are known, ``other`` ones are set to background.

A value a scheme does not know is set to background and named in the scan's ``label_problem``; a label map in which
no level of the workflow is found (e.g. a SPIDER mask read as VerSe: its 1-9 are C1-T2 there) is not used, and says
so. ``--label-scheme`` carries the scheme to both ingest stages (stages.ingest, stages.ingest_volumes), and to
localise, which expects in a label map only the levels the scheme can name (:func:`named_levels`: a SPIDER mask is not
flagged for lacking S1).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from stages.core import levels

NAMES = ("verse", "spider")
KINDS = ("vertebra", "disc", "other")
SPIDER_CANAL = 100  # SPIDER's spinal canal
SPIDER_CUT = 100  # + a vertebra's number: that vertebra, cut by the field of view
SPIDER_DISC = 200  # + the number of the vertebra above: the disc below it (201 = L5-S1)
SPIDER_COUNT = 25  # vertebrae 1-25, cut vertebrae 101-125, discs 201-225
SPIDER_FIRST = "L5"  # the anchor: SPIDER's vertebra 1 (disc 201 = the disc below it)
# The prefixes of the two problems a label map can have here (ingest's summary counts them in label_problem).
NO_LEVEL = "no level of the workflow"
UNKNOWN = "label values unknown to"


class LabelSchemeError(ValueError):
    """A label scheme that is not one of the workflow's, or a mapping that names something it does not know."""


@dataclass(frozen=True)
class LabelScheme:
    """A label map's numbering: each value it knows -> the workflow's (VerSe) label; 0 = background (known, no
    level). Values not in ``table`` (but 0) are unknown."""

    name: str
    table: dict[int, int] = field(repr=False)


@dataclass(frozen=True)
class LabelCheck:
    """What a label map held under a scheme: its values (background left out), those the scheme does not know, and
    the workflow's levels found (top to bottom, bodies first)."""

    scheme: str
    values: tuple[float, ...]
    unknown: tuple[float, ...]
    levels: tuple[str, ...]

    @property
    def usable(self) -> bool:
        """At least one level of the workflow: the map is worth using."""
        return bool(self.levels)

    @property
    def problem(self) -> str:
        """The scan's ``label_problem``: empty when every value is known and a level was found."""
        if not self.values:
            return f"{NO_LEVEL}: the label map is empty; not used"
        if not self.usable:
            return (f"{NO_LEVEL} (T12 ... S1, T12-L1 ... L5-S1) under label scheme {self.scheme!r} in values "
                    f"{value_ranges(self.values)}: label map not used; is cohort.label_scheme right?")
        if self.unknown:
            return f"{UNKNOWN} label scheme {self.scheme!r}, set to background: {value_ranges(self.unknown)}"
        return ""


def _verse() -> LabelScheme:
    vertebrae = range(1, 29)
    return LabelScheme("verse", {**{v: v for v in vertebrae}, **{100 + v: 100 + v for v in vertebrae}})


def _spider() -> LabelScheme:
    table = {SPIDER_CANAL: 0}
    for n in range(1, SPIDER_COUNT + 1):
        table[SPIDER_CUT + n] = 0
        for kind, offset, labels in (("vertebra", 0, levels.VERTEBRA_LABELS),
                                     ("disc", SPIDER_DISC, levels.DISC_LABELS)):
            try:
                table[offset + n] = labels[levels.normalise_level(n, kind, "sacrum", SPIDER_FIRST)]
            except levels.LevelError:  # above T12 (T12-L1): SPIDER labels it, the workflow has no such level
                table[offset + n] = 0
    return LabelScheme("spider", table)


VERSE = _verse()
SPIDER = _spider()
SCHEMES = {"verse": VERSE, "spider": SPIDER}


def mapping_scheme(entries: Mapping[int, tuple[str, str]], where: str = "cohort.label_scheme") -> LabelScheme:
    """A scheme from ``{value: (kind, level)}`` (kind vertebra/disc with a level of the workflow, or other with
    ``""``: set to background). Raises :class:`LabelSchemeError` naming ``where`` and the value."""
    if not entries:
        raise LabelSchemeError(f"{where}: an empty mapping (name the values of your label maps, or use verse/spider)")
    table = {}
    for value, (kind, level) in sorted(entries.items()):
        if kind not in KINDS:
            raise LabelSchemeError(f"{where}: value {value} has kind {kind!r}; allowed: {', '.join(KINDS)}")
        if kind == "other":
            table[value] = 0
            continue
        names = levels.VERTEBRAE if kind == "vertebra" else levels.DISCS
        if level not in names:
            raise LabelSchemeError(f"{where}: value {value} names {kind} {level!r}; allowed: {', '.join(names)}")
        table[value] = (levels.VERTEBRA_LABELS if kind == "vertebra" else levels.DISC_LABELS)[level]
    return LabelScheme("mapping", table)


def _value(key: Any, where: str) -> int:
    text = str(key).strip()
    if not text.isdigit() or int(text) == 0:
        raise LabelSchemeError(f"{where}: {key!r} is not a label value (a whole number >= 1; 0 is background)")
    return int(text)


def scheme_from_config(value: str | Mapping[str, Any], where: str = "cohort.label_scheme") -> LabelScheme:
    """The scheme ``cohort.label_scheme`` names: ``verse``, ``spider``, or ``{vertebra: {value: level}, disc: {value:
    level}, other: [values]}``. Raises :class:`LabelSchemeError` naming the key and what is allowed."""
    if isinstance(value, str):
        if value not in SCHEMES:
            raise LabelSchemeError(f"{where}: unknown label scheme {value!r}; allowed: {', '.join(NAMES)} or a mapping")
        return SCHEMES[value]
    if not isinstance(value, Mapping):
        raise LabelSchemeError(f"{where}: expected verse, spider or a mapping, got {value!r}")
    extra = sorted(set(value) - set(KINDS))
    if extra:
        raise LabelSchemeError(f"{where}.{extra[0]}: not a kind; allowed: {', '.join(KINDS)}")
    entries: dict[int, tuple[str, str]] = {}
    named = [(kind, key, level) for kind in ("vertebra", "disc") for key, level in (value.get(kind) or {}).items()]
    named += [("other", key, "") for key in value.get("other") or []]
    for kind, key, level in named:
        number = _value(key, f"{where}.{kind}")
        if number in entries:
            raise LabelSchemeError(f"{where}.{kind}: value {number} is also under {entries[number][0]}")
        entries[number] = (kind, str(level))
    return mapping_scheme(entries, where)


def scheme_options(value: str | Mapping[str, Any]) -> list[str]:
    """``cohort.label_scheme`` as the ingest stages' ``--label-scheme`` arguments (checked first: a bad value raises
    :class:`LabelSchemeError` naming the key). Mapping entries in value order, so the same mapping gives the same
    arguments (a rule's params)."""
    scheme = scheme_from_config(value)
    if scheme.name in SCHEMES:
        return ["--label-scheme", scheme.name]
    kinds = {v: (k, str(level)) for k in ("vertebra", "disc") for v, level in (value.get(k) or {}).items()}
    kinds.update({v: ("other", "") for v in value.get("other") or []})
    return ["--label-scheme", *(f"{int(v)}={kind}:{level}" if level else f"{int(v)}={kind}"
                                for v, (kind, level) in sorted(kinds.items(), key=lambda item: int(item[0])))]


INGEST_USE = ("Each label map is translated to the workflow's numbering; values the scheme does not know are set to "
              "background and named in the manifest's label_problem.")


def add_label_scheme_option(parser: argparse.ArgumentParser, use: str = INGEST_USE) -> None:
    """``--label-scheme``: verse (default), spider, or VALUE=KIND:LEVEL ... (cohort.label_scheme); ``use``, the end of
    its help, says what the stage does with it (default: ingest's translation)."""
    parser.add_argument(
        "--label-scheme", nargs="+", default=["verse"], metavar="SCHEME",
        help="How the label maps number their structures (cohort.label_scheme; see stages/archive/label_scheme.py): "
             "verse (default), spider, or your mapping as VALUE=vertebra:LEVEL, VALUE=disc:LEVEL and VALUE=other "
             f"(set to background), e.g. 1=vertebra:L5 201=disc:L5-S1 100=other. {use}")


def scheme_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LabelScheme:
    """The scheme of ``--label-scheme`` (a bad one exits with code 2, naming it)."""
    words = args.label_scheme
    try:
        if len(words) == 1 and "=" not in words[0]:
            return scheme_from_config(words[0], "--label-scheme")
        entries: dict[int, tuple[str, str]] = {}
        for word in words:
            value, _, rest = word.partition("=")
            kind, _, level = rest.partition(":")
            number = _value(value, "--label-scheme")
            if number in entries:
                raise LabelSchemeError(f"--label-scheme: value {number} given twice")
            entries[number] = (kind, level)
        return mapping_scheme(entries, "--label-scheme")
    except LabelSchemeError as err:
        parser.error(str(err))


def value_ranges(values: Iterable[float]) -> str:
    """Values as runs: ``1-7, 100, 201-207`` (non-whole values as they are)."""
    numbers = [float(v) for v in values]
    whole = sorted({int(v) for v in numbers if v.is_integer()})
    runs = [[v for _, v in run] for _, run in itertools.groupby(enumerate(whole), lambda iv: iv[1] - iv[0])]
    return ", ".join([str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
                     + [f"{v:g}" for v in sorted({v for v in numbers if not v.is_integer()})])


def check_values(values: Iterable[float], scheme: LabelScheme) -> LabelCheck:
    """What the values of a label map mean under ``scheme``: unknown ones and the workflow's levels found."""
    present = tuple(sorted({float(v) for v in values} - {0.0}))
    unknown = tuple(v for v in present if not v.is_integer() or int(v) not in scheme.table)
    found = {scheme.table[int(v)] for v in present if v not in unknown}
    names = tuple(levels.LABEL_NAMES[label] for label in sorted(levels.LABEL_NAMES, key=_top_down) if label in found)
    return LabelCheck(scheme.name, present, unknown, names)


def named_levels(scheme: LabelScheme) -> tuple[str, ...]:
    """The workflow's levels (top to bottom, bodies first) that a label map under ``scheme`` can hold: all of them for
    verse, all but S1 for spider (SPIDER has no sacrum label), those it maps for a mapping. Localise expects no other
    in a label map (a level the scheme cannot name is not reported missing)."""
    named = set(scheme.table.values())
    return tuple(levels.LABEL_NAMES[label] for label in sorted(levels.LABEL_NAMES, key=_top_down) if label in named)


def _top_down(label: int) -> tuple[int, int]:
    name = levels.LABEL_NAMES[label]
    return (0, levels.VERTEBRAE.index(name)) if name in levels.VERTEBRAE else (1, levels.DISCS.index(name))


def remap(array: np.ndarray, scheme: LabelScheme) -> tuple[np.ndarray, LabelCheck]:
    """``array`` (a label map) in the workflow's numbering (uint8: known values translated, unknown ones and those
    the scheme sets to background 0), and what it held. Integer maps go through a lookup table (37 ms against 180 ms
    for sorting a 512 x 512 x 20 uint8 map, measured); others through their sorted values."""
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() < 1 << 16:
        values = np.flatnonzero(np.bincount(array.ravel()))
        lookup = np.zeros(int(values[-1]) + 1, dtype=np.uint8)
        lookup[values] = [scheme.table.get(int(v), 0) for v in values]
        return lookup[array], check_values(values, scheme)
    values, inverse = np.unique(array, return_inverse=True)
    target = np.array([scheme.table.get(int(v), 0) if float(v).is_integer() else 0 for v in values], dtype=np.uint8)
    return target[inverse].reshape(array.shape), check_values(values, scheme)


def remap_image(image: sitk.Image, scheme: LabelScheme) -> tuple[sitk.Image, LabelCheck]:
    """:func:`remap` of a label map image, with its geometry."""
    array, check = remap(sitk.GetArrayViewFromImage(image), scheme)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out, check


def problem_counts(problems: Iterable[str]) -> dict[str, int]:
    """How many scans' ``label_problem`` say their label map had no level of the workflow (not used), or values
    the scheme does not know (set to background): for ingest's summary."""
    texts = [str(p) for p in problems]
    return {"label_maps_without_level": sum(p.startswith(NO_LEVEL) for p in texts),
            "label_maps_with_unknown_values": sum(p.startswith(UNKNOWN) for p in texts)}
