from __future__ import annotations

from pathlib import Path

import pytest

from stages.demo_cohort import DemoConfig, generate

ROOT = Path(__file__).resolve().parent.parent

# Small but complete: twins, follow-ups, unlabelled subjects and planted bad files.
TINY = DemoConfig.from_config(dict(seed=7, n_subjects=8, twin_fraction=0.5, followup_fraction=0.6,
                                  second_followup_fraction=0.5, unlabelled_fraction=0.15, matrix=64, slices=9))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_cohort")
    generate(TINY, out, workers=2)
    return out
