"""Run every benchmark: ``python -m benchmarks`` (``make bench``), or one: ``python -m benchmarks demo_cohort``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    wanted = set(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    unknown = wanted - {n.removeprefix("bench_") for n in names}
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; available: {[n.removeprefix('bench_') for n in names]}")
        return 2
    for name in names:
        if not wanted or name.removeprefix("bench_") in wanted:
            print(f"== {name}", flush=True)
            importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
