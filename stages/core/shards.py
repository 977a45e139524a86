"""How the per-scan stages (localise, extract) split a cohort into shards that run as parallel jobs, and put the
shards' outputs back together.

Scans are sorted by ``scan_id`` and cut into ``n`` contiguous blocks of (nearly) equal size, ``n = ceil(scans /
scans_per_shard)``; shard ``i`` holds block ``i``. Merging the shards in order therefore gives exactly the tables and
arrays one job over the whole cohort would write. Arrays are merged through memory maps, a chunk of rows at a time, so
no job holds the cohort in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK_ROWS = 256  # rows copied at a time when merging arrays


def shard_count(n_scans: int, scans_per_shard: int) -> int:
    """Number of shards for ``n_scans`` scans (at least 1, so an empty cohort still has its one, empty, shard)."""
    if scans_per_shard < 1:
        raise ValueError(f"scans_per_shard must be at least 1, not {scans_per_shard}")
    return max(1, math.ceil(n_scans / scans_per_shard))


def shard_block(n_items: int, shard: int, n_shards: int) -> slice:
    """The positions of shard ``shard`` of ``n_shards`` among ``n_items`` sorted items: contiguous, sizes differing by
    at most one, every item in exactly one shard."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not one of 0 ... {n_shards - 1}")
    return slice(shard * n_items // n_shards, (shard + 1) * n_items // n_shards)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (shard I of N, counted from 0) -> (I, N); raises ValueError otherwise."""
    index, sep, total = text.partition("/")
    try:
        shard, n = int(index), int(total)
    except ValueError:
        raise ValueError(f"expected I/N (shard I of N, from 0), not {text!r}") from None
    if not sep or not 0 <= shard < n:
        raise ValueError(f"expected I/N with 0 <= I < N, not {text!r}")
    return shard, n


def resolve_shard(text: str, scans_per_shard: int | None, n_scans: int) -> tuple[int, int]:
    """``I/N``, or ``I`` with ``scans_per_shard`` (N = shard_count(n_scans, scans_per_shard), what the workflow passes:
    a job then needs no other job's output to know N) -> (I, N); raises ValueError otherwise."""
    if "/" in text:
        return parse_shard(text)
    if scans_per_shard is None:
        raise ValueError(f"shard {text!r} without /N needs the scans per shard")
    n = shard_count(n_scans, scans_per_shard)
    return parse_shard(f"{text}/{n}")


def concat_tables(paths: list[Path]) -> pd.DataFrame:
    """The tables (Parquet or CSV by suffix) one after another; an empty shard adds nothing but its columns."""
    frames = [pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p) for p in paths]
    non_empty = [f for f in frames if len(f)]
    if not non_empty:
        return frames[0].iloc[:0] if frames else pd.DataFrame()
    return pd.concat(non_empty, ignore_index=True)


def concat_arrays(paths: list[Path], out: Path, chunk_rows: int = CHUNK_ROWS) -> list[int]:
    """Stack the ``.npy`` arrays along their first axis into ``out`` through memory maps; return each shard's row
    offset in the result."""
    parts = [np.load(p, mmap_mode="r") for p in paths]
    shapes = {part.shape[1:] for part in parts}
    dtypes = {part.dtype for part in parts}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ValueError(f"shards disagree on the row shape or type: {sorted(map(str, shapes))}, "
                         f"{sorted(map(str, dtypes))}")
    total = sum(len(part) for part in parts)
    merged = np.lib.format.open_memmap(out, "w+", dtypes.pop(), (total, *shapes.pop()))
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        for start in range(0, len(part), chunk_rows):
            block = part[start:start + chunk_rows]
            merged[at + start:at + start + len(block)] = block
        at += len(part)
    merged.flush()
    del merged
    return offsets
