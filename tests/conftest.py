from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stages.anatomy.crops import ExtractConfig, ExtractOutputs
from stages.anatomy.localiser import LocaliseConfig
from stages.demo_cohort import DemoConfig, DemoOutputs, generate
from stages.extract import extract
from stages.localise import Folders, LocaliseOutputs
from stages.localise import run as localise

ROOT = Path(__file__).resolve().parent.parent

# Small but complete: twins, follow-ups, unlabelled subjects and planted bad files.
TINY = DemoConfig.from_config(dict(seed=7, n_subjects=8, twin_fraction=0.5, followup_fraction=0.6,
                                  second_followup_fraction=0.5, unlabelled_fraction=0.15, matrix=64, slices=9))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_cohort")
    generate(TINY, DemoOutputs.in_folder(out), workers=2)
    return out


# The per-scan stages on folders laid out as the workflow lays out results/ (ingest/, localise/, extract/).

def localise_folder(ingest: Path, out: Path, cfg: LocaliseConfig, model: Path | None, workers: int = 1,
                    shard: tuple[int, int] = (0, 1), expected: tuple[str, ...] | None = None) -> dict:
    """stages.localise on the ingest folder ``ingest``, into the folder ``out`` (``expected``: the levels a label map
    must hold, default all); returns the summary."""
    return localise(ingest / "manifest.parquet", Folders(ingest / "volumes", ingest / "labels"),
                    ingest / "landmarks.parquet", LocaliseOutputs.in_folder(out), cfg, model, workers, shard, expected)


def extract_folder(ingest: Path, localised: Path, out: Path, cfg: ExtractConfig, workers: int = 1,
                   shard: tuple[int, int] = (0, 1)):
    """stages.extract on the ingest and localise folders, into the folder ``out``; returns the index."""
    return extract(ingest / "manifest.parquet", ingest / "volumes", localised / "structures.parquet",
                   localised / "flags.csv", ExtractOutputs.in_folder(out), cfg, workers, shard)


def out_args(outputs) -> list[str]:
    """``--out-<name> PATH`` for every output of a stage's outputs (IngestOutputs, ExtractOutputs, ...)."""
    return [arg for field in dataclasses.fields(outputs)
            for arg in (f"--out-{field.name.replace('_', '-')}", str(getattr(outputs, field.name)))]
