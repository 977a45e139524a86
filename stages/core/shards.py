"""How the per-scan stages (localise, extract) split a cohort into shards that run as parallel jobs, and put the
shards' outputs back together.

Scans are sorted by ``scan_id`` and cut into ``n`` contiguous blocks of (nearly) equal size, ``n = ceil(scans /
scans_per_shard)``; shard ``i`` holds block ``i``. Merging the shards in order therefore gives exactly the tables and
arrays one job over the whole cohort would write. Arrays are merged through memory maps, a chunk of rows at a time, so
no job holds the cohort in memory.

The sharded stages (ingest, localise, extract) share their command-line options (:func:`add_shard_options`): a shard
job writes its part into a folder of its own (``--shard I --out SHARD_DIR``), and ``--merge SHARD_DIR ...`` puts the
parts together into the stage's outputs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import cli

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


def resolve_shard(text: str, n_shards: Callable[[], int]) -> tuple[int, int]:
    """``I/N``, or ``I`` with N = ``n_shards()`` (what the workflow passes: from the scans per shard, or the plan, so
    that a job needs no other job's output to know N) -> (I, N); raises ValueError otherwise."""
    if "/" in text:
        return parse_shard(text)
    return parse_shard(f"{text}/{n_shards()}")


def add_shard_options(parser: argparse.ArgumentParser, items: str) -> None:
    """--shard, --scans-per-shard, --out SHARD_DIR and --merge: one job per shard of ``items``, then the merge."""
    group = parser.add_argument_group("shards (parallel jobs, as the workflow runs them: one per shard, then --merge)")
    group.add_argument("--shard", default=None, metavar="I[/N]",
                       help=f"Only shard I of N (from 0) of {items}, written into the folder --out.")
    group.add_argument("--scans-per-shard", type=cli.positive_int, default=None, metavar="P",
                       help="About P scans per shard: N = ceil(scans / P).")
    group.add_argument("--out", type=Path, default=None, metavar="SHARD_DIR",
                       help="With --shard: the shard's folder (read back by --merge).")
    group.add_argument("--merge", type=cli.existing_folder, nargs="+", default=None, metavar="SHARD_DIR",
                       help="Instead: merge these shards' folders, in this order, into the outputs.")


def shard_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    n_shards: Callable[[], int]) -> tuple[int, int] | None:
    """(I, N) of --shard (N from ``I/N`` or from ``n_shards()``), None without --shard; a bad combination of the shard
    options exits with code 2."""
    if args.shard is not None and args.merge:
        parser.error("--shard and --merge go one at a time")
    if (args.shard is None) != (args.out is None):
        parser.error("--shard and --out SHARD_DIR go together")
    if args.shard is None:
        return None
    try:
        return resolve_shard(args.shard, n_shards)
    except (ValueError, OSError) as err:
        parser.error(f"--shard: {err}")


def count_from_manifest(manifest: Path, scans_per_shard: int | None) -> Callable[[], int]:
    """N of a per-scan stage's ``--shard I``: ceil(scans in ``manifest`` / ``scans_per_shard``), read when asked."""
    def count() -> int:
        if scans_per_shard is None:
            raise ValueError("a shard without /N needs --scans-per-shard")
        return shard_count(len(pd.read_parquet(manifest, columns=["scan_id"])), scans_per_shard)
    return count


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
