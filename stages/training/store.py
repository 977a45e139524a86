"""The array store pretraining reads: one of the extract stage's volume arrays (the vertebral bodies or the discs,
``pretrain.structure``; a memory map), the rows a run may read (checked against the splits: a forbidden row raises
:class:`stages.core.errors.LeakageError`), and a background reader that loads batches ahead of the training loop."""

from __future__ import annotations

import argparse
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.errors import LeakageError
from stages.core.levels import DISCS, REGION_LEVEL, VERTEBRAE

log = logging.getLogger("pretrain.store")
TRAIN_PARTS = ("train", "val")


@dataclass(frozen=True)
class Structure:
    """A kind of volume pretraining can read (``pretrain.structure``): its ``kind`` in volumes.parquet, its levels
    top to bottom (the classes of a level classifier), the extract stage's array file, and its name in messages."""

    kind: str
    levels: tuple[str, ...]
    array: str
    plural: str


STRUCTURES: dict[str, Structure] = {
    "vertebra": Structure("vertebra", VERTEBRAE, "vertebrae.npy", "vertebral bodies"),
    "disc": Structure("disc", DISCS, "discs.npy", "discs"),
    # the axial slices through each disc (n_discs, 3, Ha, Wa), rows aligned with the discs': simclr's images (the
    # axial_slices stage's slices.npy; the extract stage's resliced axial.npy is read too)
    "axial": Structure("disc", DISCS, "slices.npy", "axial disc slices"),
    # each scan's lumbar region on an isotropic grid (n_scans, SI, AP, LR): mlsscl's clips (the lumbar_regions
    # stage's regions.npy, listed in its regions.parquet)
    "region": Structure("region", (REGION_LEVEL,), "regions.npy", "lumbar regions"),
}


def lookup_structure(name: str) -> Structure:
    """The :class:`Structure` called ``name`` (``vertebra`` or ``disc``)."""
    if name not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {name!r}")
    return STRUCTURES[name]


def add_array_options(parser: argparse.ArgumentParser) -> None:
    """--array, the extract stage's array of the structure (--structure), and --vertebrae, its older name for the
    vertebral bodies' array; one of them is required (the stages that open a :class:`VolumeStore`)."""
    # imported here: the GPU benchmark imports this module on machines without jsonschema (behind stages.core.cli)
    from stages.core.cli import existing_file
    arrays = parser.add_mutually_exclusive_group(required=True)
    arrays.add_argument("--array", type=existing_file, default=None,
                        help="The extract stage's array of --structure: vertebrae.npy (vertebra) or discs.npy (disc).")
    arrays.add_argument("--vertebrae", type=existing_file, default=None,
                        help="vertebrae.npy of the extract stage: the older name of --array, with --structure "
                             "vertebra only.")


def array_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, structure: str) -> Path:
    """The array a stage reads for ``structure``: --array, or --vertebrae when the structure is ``vertebra``."""
    if args.vertebrae is not None and structure != "vertebra":
        parser.error(f"--vertebrae names the vertebral bodies' array, but the structure is {structure}: pass the "
                     f"{structure} array ({lookup_structure(structure).array}) as --array")
    return args.array if args.array is not None else args.vertebrae


class VolumeStore:
    """One volume array store of the extract stage, opened read-only, with the rows this run may read.

    ``pairs`` and ``volumes``: the splits stage's pairs.parquet and volumes.parquet; ``array``: the extract stage's
    array of ``structure`` (vertebrae.npy for ``vertebra``, discs.npy for ``disc``, the axial slices for ``axial``),
    whose rows are the ``row`` of the volumes of that structure's ``kind`` in volumes.parquet, and the ``a`` and ``b``
    of every pair (``pairs`` None: a method of single volumes, no pairs). ``allowed_parts``: the
    self-supervision parts whose volumes may be read. Only volumes.parquet's rows of this structure are readable, and
    rows of downstream validation or test subjects never, whatever their self-supervision part.
    """

    def __init__(self, pairs: Path | None, volumes: Path, array: Path, structure: str = "vertebra",
                 allowed_parts: tuple[str, ...] = TRAIN_PARTS):
        info = lookup_structure(structure)
        self.structure = structure
        self.levels = info.levels     # level index i of a volume (``level``) is the name levels[i]
        self.noun = info.plural
        self.volumes = pd.read_parquet(volumes)
        pair_table = pd.read_parquet(pairs) if pairs is not None else pd.DataFrame(
            {"a": [], "b": [], "level": [], "positive": [], "part": []}).astype(
            {"a": np.int64, "b": np.int64, "positive": bool})
        self.path = Path(array)
        if self.path.name != info.array and not (structure == "axial" and self.path.name == "axial.npy"):
            log.warning("reading %s as the %s array (the extract stage writes it as %s)", self.path, structure,
                        info.array)
        self.array = np.load(self.path, mmap_mode="r")
        table = self.volumes[self.volumes.kind == info.kind].set_index("row").sort_index()
        if not table.index.is_unique:
            raise ValueError(f"{volumes} lists a {structure} row twice: re-run the splits stage")
        if len(table) and (table.index.max() >= len(self.array) or table.index.min() < 0):
            raise ValueError(f"{volumes} names {structure} rows outside {array} ({len(self.array)} rows): the "
                             f"splits and the extraction are from different runs, or {array} is not the "
                             f"{structure} array ({info.array})")
        unknown = sorted(set(table.level) - set(self.levels))
        if unknown:
            raise ValueError(f"{volumes} gives {structure} volumes levels {unknown[:5]} that are not {structure} "
                             f"levels ({', '.join(self.levels)})")
        self.level = np.full(len(self.array), -1, dtype=np.int64)
        rows = table.index.to_numpy(dtype=np.int64)
        self.level[rows] = table.level.map({lv: i for i, lv in enumerate(self.levels)}).to_numpy(dtype=np.int64)
        self.allowed = np.zeros(len(self.array), dtype=bool)
        ok = table.ssl_part.isin(allowed_parts) & ~table.downstream_part.isin(["val", "test"])
        self.allowed[rows[ok.to_numpy(dtype=bool)]] = True
        self.pairs = {part: pair_table[pair_table.part == part].reset_index(drop=True) for part in allowed_parts}
        self.table = table
        self.check()

    def digest(self) -> str:
        """A fingerprint of what this store serves: the structure, the pairs, the volumes' levels and parts, and the
        array file's size and modification time (a re-run extraction changes it), so a checkpoint never resumes on
        other data."""
        h = hashlib.sha256()
        h.update(self.structure.encode())
        for part, pairs in sorted(self.pairs.items()):
            h.update(part.encode())
            h.update(pairs[["a", "b"]].to_numpy(dtype=np.int64).tobytes())
            h.update(pairs.positive.to_numpy(dtype=bool).tobytes())
        h.update(self.level.tobytes())
        h.update(self.allowed.tobytes())
        stat = self.path.stat()
        h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:20]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) of one volume."""
        return tuple(self.array.shape[1:])

    def check(self) -> None:
        """Every pair of every allowed part joins two volumes of this structure listed in volumes.parquet, both
        allowed and of the pair's part (else :class:`LeakageError`: a row pretraining must not read, or one whose
        subject and part are unknown), and both of the pair's level, a level of this structure (else
        ``ValueError``: pairs drawn for another structure or another run)."""
        for part, pairs in self.pairs.items():
            rows = np.concatenate([pairs.a.to_numpy(), pairs.b.to_numpy()]).astype(np.int64)
            if len(rows) == 0:
                continue
            if rows.min() < 0 or rows.max() >= len(self.array):
                raise ValueError(f"pairs of part {part} name rows outside the {self.structure} array store "
                                 f"({len(self.array)} rows)")
            wrong_level = sorted(set(pairs.level) - set(self.levels))
            if wrong_level:
                raise ValueError(f"pairs of part {part!r} are of levels {wrong_level[:5]}, not {self.structure} "
                                 f"levels ({', '.join(self.levels)}): the pairs were drawn for another structure "
                                 "than pretrain.structure; re-run the splits stage")
            unlisted = rows[self.level[rows] < 0]
            if len(unlisted):
                raise LeakageError(f"pairs of self-supervision part {part!r} reach {len(unlisted)} row(s) that "
                                   f"volumes.parquet does not list as {self.structure} volumes (first: rows "
                                   f"{unlisted[:5].tolist()}): their subjects and parts are unknown. Were the pairs "
                                   "drawn for another structure (pretrain.structure)? Re-run the splits stage")
            bad = rows[~self.allowed[rows]]
            if len(bad):
                info = self.table.reindex(bad[:5])[["ssl_part", "downstream_part"]].to_dict("records")
                raise LeakageError(f"pairs of self-supervision part {part!r} reach {len(bad)} volume(s) pretraining "
                                   f"must not read (first: rows {bad[:5].tolist()}, {info}); re-run the splits stage")
            wrong_part = self.table.loc[rows, "ssl_part"].to_numpy() != part
            if wrong_part.any():
                raise LeakageError(f"pairs of part {part!r} reach volumes of another part (rows "
                                   f"{rows[wrong_part][:5].tolist()})")
            named = pairs.level.map({lv: i for i, lv in enumerate(self.levels)}).to_numpy(dtype=np.int64)
            mismatch = (self.level[pairs.a.to_numpy(dtype=np.int64)] != named) | (
                self.level[pairs.b.to_numpy(dtype=np.int64)] != named)
            if mismatch.any():
                raise ValueError(f"{int(mismatch.sum())} pair(s) of part {part!r} join volumes of another level than "
                                 f"the pair's (first: {pairs[mismatch][['a', 'b', 'level']].head(3).to_dict('records')}"
                                 "): the pairs and volumes.parquet are from different runs")

    def load(self, rows: np.ndarray) -> np.ndarray:
        """Volumes of ``rows`` as float32 ``(n, S, H, W)``; refuses any row this store does not allow (a row of
        another structure, of a part this run may not read, or outside the array)."""
        rows = np.asarray(rows, dtype=np.int64)
        outside = (rows < 0) | (rows >= len(self.array))
        if outside.any():
            raise LeakageError(f"refusing to read rows {rows[outside][:5].tolist()}: outside the {self.structure} "
                               f"array ({len(self.array)} rows)")
        if not self.allowed[rows].all():
            raise LeakageError(f"refusing to read rows {rows[~self.allowed[rows]][:5].tolist()}: not {self.structure} "
                               "volumes of the parts this run may read")
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape), dtype=np.float32)
        out[order] = self.array[rows[order]]
        return out


class Prefetcher:
    """Runs ``load`` for each item of ``items`` in a background thread, ``depth`` ahead, and measures how long the
    consumer waits (the data-wait share of the step time). ``close()`` stops the thread when the consumer leaves
    early (``--max-steps``)."""

    def __init__(self, load: Callable[[Any], Any], items: list[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._items = items
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(load,), daemon=True)
        self._thread.start()

    def _put(self, value: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, load: Callable[[Any], Any]) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                self._put(load(item))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(err)

    def __iter__(self) -> Iterator[Any]:
        for _ in self._items:
            start = time.perf_counter()
            batch = self._queue.get()
            self.wait_seconds += time.perf_counter() - start
            if isinstance(batch, BaseException):
                raise batch
            yield batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
