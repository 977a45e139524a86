"""Demo cohort generation speed at the default demo size, against the issue's budget.

Reference (issue 2): the whole workflow on the default demo cohort finishes in about 15 minutes on 2 CPU cores.
This prints the generator's seconds per study on 2 worker processes, its projected wall time for the default
config, and that time as a share of the 15-minute budget (the rest is left to the later stages).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from stages.demo_cohort import DemoConfig, DemoOutputs, generate, plan_cohort

BUDGET_S = 15 * 60
WORKERS = 2
SAMPLE_SUBJECTS = 8


def main() -> None:
    full = DemoConfig.from_config()
    sample = DemoConfig.from_config({"n_subjects": SAMPLE_SUBJECTS})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        counts = generate(sample, DemoOutputs.in_folder(Path(tmp) / "cohort"), workers=WORKERS)
        elapsed = time.perf_counter() - start
    per_study = elapsed / counts["studies"]
    n_full = sum(len(s.studies) for s in plan_cohort(full))
    projected = per_study * n_full
    print(f"demo_cohort: {counts['studies']} studies ({full.matrix}x{full.matrix}x{full.slices}) in {elapsed:.1f} s "
          f"on {WORKERS} workers = {per_study:.2f} s/study")
    print(f"demo_cohort: default config ({full.n_subjects} subjects, {n_full} studies) projected {projected:.0f} s "
          f"= {projected / BUDGET_S:.2f} x the 15-minute whole-workflow budget")


if __name__ == "__main__":
    main()
