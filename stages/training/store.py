"""The array store pretraining reads: the extract stage's vertebral-body volumes (a memory map), the rows a run may
read (checked against the splits: a forbidden row raises :class:`stages.core.errors.LeakageError`), and a background
reader that loads batches ahead of the training loop."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core.errors import LeakageError
from stages.core.levels import VERTEBRAE

TRAIN_PARTS = ("train", "val")


class VolumeStore:
    """The vertebral-body array store of the extract stage, opened read-only, with the rows this run may read.

    ``pairs`` and ``volumes``: the splits stage's pairs.parquet and volumes.parquet; ``vertebrae``: the extract
    stage's vertebrae.npy. ``allowed_parts``: the self-supervision parts whose volumes may be read. Rows of
    downstream validation or test subjects are never allowed, whatever their self-supervision part.
    """

    def __init__(self, pairs: Path, volumes: Path, vertebrae: Path, allowed_parts: tuple[str, ...] = TRAIN_PARTS):
        self.volumes = pd.read_parquet(volumes)
        pair_table = pd.read_parquet(pairs)
        self.path = Path(vertebrae)
        self.array = np.load(self.path, mmap_mode="r")
        bodies = self.volumes[self.volumes.kind == "vertebra"].set_index("row").sort_index()
        if not bodies.index.is_unique:
            raise ValueError(f"{volumes} lists a vertebra row twice: re-run the splits stage")
        if len(bodies) and (bodies.index.max() >= len(self.array) or bodies.index.min() < 0):
            raise ValueError(f"{volumes} names rows outside {vertebrae} ({len(self.array)} rows): the splits and the "
                             "extraction are from different runs")
        self.level = np.full(len(self.array), -1, dtype=np.int64)
        rows = bodies.index.to_numpy(dtype=np.int64)
        self.level[rows] = bodies.level.map({lv: i for i, lv in enumerate(VERTEBRAE)}).to_numpy(dtype=np.int64)
        self.allowed = np.zeros(len(self.array), dtype=bool)
        ok = bodies.ssl_part.isin(allowed_parts) & ~bodies.downstream_part.isin(["val", "test"])
        self.allowed[rows[ok.to_numpy(dtype=bool)]] = True
        self.pairs = {part: pair_table[pair_table.part == part].reset_index(drop=True) for part in allowed_parts}
        self.bodies = bodies
        self.check()

    def digest(self) -> str:
        """A fingerprint of what this store serves: the pairs, the volumes' levels and parts, and the array file's
        size and modification time (a re-run extraction changes it), so a checkpoint never resumes on other data."""
        h = hashlib.sha256()
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
        """Every pair of every allowed part joins two allowed rows of the same part: else :class:`LeakageError`."""
        for part, pairs in self.pairs.items():
            rows = np.concatenate([pairs.a.to_numpy(), pairs.b.to_numpy()]).astype(np.int64)
            if len(rows) == 0:
                continue
            if rows.min() < 0 or rows.max() >= len(self.array):
                raise ValueError(f"pairs of part {part} name rows outside the array store ({len(self.array)} rows)")
            bad = rows[~self.allowed[rows]]
            if len(bad):
                info = self.bodies.reindex(bad[:5])[["ssl_part", "downstream_part"]].to_dict("records")
                raise LeakageError(f"pairs of self-supervision part {part!r} reach {len(bad)} volume(s) pretraining "
                                   f"must not read (first: rows {bad[:5].tolist()}, {info}); re-run the splits stage")
            wrong_part = self.bodies.loc[rows, "ssl_part"].to_numpy() != part
            if wrong_part.any():
                raise LeakageError(f"pairs of part {part!r} reach volumes of another part (rows "
                                   f"{rows[wrong_part][:5].tolist()})")

    def load(self, rows: np.ndarray) -> np.ndarray:
        """Volumes of ``rows`` as float32 ``(n, S, H, W)``; refuses any row this store does not allow."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.allowed[rows].all():
            raise LeakageError(f"refusing to read rows {rows[~self.allowed[rows]][:5].tolist()}: not in the parts "
                               "this run may read")
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
        except BaseException as err:  # handed to the consumer, which re-raises it
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
