"""Real data end to end: disc crops cut from real lumbar MR slices, through crop ingest, pairs, a short pretraining on
disc pairs and the grade and herniation probes.

The data are 51 mid-sagittal slices (T1, T2, T2-SPACE) of 31 patients from SPIDER: van der Graaf J.W., van Hooff
M.L., Buckens C.F.M. et al., *Lumbar spine segmentation in MR images: a dataset and a public benchmark*, Scientific
Data 11, 264 (2024), CC BY 4.0, as stored in ``shared/real_spider_sagittal`` beside the repository (its README says
where they come from). Every patient's sequences were acquired in one session, so the positive pairs are T1/T2 of
one visit (``splits.same_session_pairs``) and no subject is a follow-up subject. The test is skipped when the data
are absent. What the probes reach on these crops is in the README ("Real data: SPIDER"); with 7 test subjects it is a
check that the path runs on real images, not a measurement of the method.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from test_workflow import snakemake

from stages.core import levels

DATA = ROOT.parent / "shared" / "real_spider_sagittal"
KEY = "spider-test-key-0123456789abcdef"
MODELS = ("siamese", "random", "scratch")
TASKS = ("grade", "herniation")


def spider_config(tmp_path: Path, table: Path) -> Path:
    """Crop cohort, disc pretraining and disc probes at test sizes (a few minutes on 2 cores)."""
    (tmp_path / "key").write_text(KEY)
    config = {
        "results": str(tmp_path / "results"),
        "cohort": {"source": "crops", "crops_table": str(table), "key_file": str(tmp_path / "key")},
        "extract": {"vertebra_size": [48, 48, 5], "disc_size": [44, 88, 5], "axial_size": [16, 16]},
        "pretrain": {"structure": "disc", "width": 0.125, "embedding_dim": 16, "batch_size": 16, "max_epochs": 3,
                     "checkpoint_every": 1000},
        "probes": {"disc_input": "disc", "tasks": list(TASKS), "baselines": ["random", "scratch"],
                   "label_fractions": [1.0], "seeds": 1, "bootstrap": 200},
        "probe_training": {"epochs": 3, "batch_size": 16, "augment_views": 2, "linear_c": [0.01, 0.1, 1.0],
                           "max_iter": 200},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "discs.csv").is_file(),
                    reason=f"the SPIDER slices are not in {DATA} (see the README's 'Real data: SPIDER')")
def test_real_spider_discs_run_through_crop_ingest_disc_pretraining_and_probes(tmp_path):
    cut = subprocess.run([sys.executable, "-m", "stages.slice_crops", "--discs", str(DATA / "discs.csv"),
                          "--images", str(DATA / "images"), "--out-table", str(tmp_path / "spider" / "crops.csv"),
                          "--out-dir", str(tmp_path / "spider" / "crops")],
                         check=False, capture_output=True, text=True, cwd=ROOT)
    assert cut.returncode == 0, cut.stderr
    results = tmp_path / "results"
    targets = [str(results / p) for p in ("splits/summary.json", "pretrain/siamese/pretext/evaluation.json",
                                          "probes/label_efficiency.csv")]
    run = snakemake(tmp_path, *targets, "--configfile", str(spider_config(tmp_path, tmp_path / "spider" / "crops.csv")))
    assert run.returncode == 0, run.stderr[-3000:]

    # every row of discs.csv: cut, or skipped with its reason; every cut row used or quarantined by ingest
    discs = pd.read_csv(DATA / "discs.csv", dtype=str, keep_default_na=False)
    table = pd.read_csv(tmp_path / "spider" / "crops.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(tmp_path / "spider" / "crops_skipped.csv")
    files = pd.read_csv(results / "ingest" / "files.csv")
    assert len(table) + len(skipped) == len(discs) and len(files) == len(table)
    assert sorted(table.source_row.astype(int).tolist() + skipped.source_row.tolist()) == list(range(2, len(discs) + 2))
    assert skipped.reason.str.len().gt(0).all()
    in_range = table.level.isin(levels.DISCS).to_numpy()
    assert (files.status == "used").to_numpy().tolist() == in_range.tolist()  # T10-T11, T11-T12, no level: out
    assert files.reason[~in_range].str.len().gt(0).all()

    # one session per subject (no follow-ups), yet downstream validation and test subjects, some with T1 and T2
    manifest = pd.read_parquet(results / "ingest" / "manifest.parquet")
    assert (manifest.days_since_first_study == 0).all()
    subjects = pd.read_parquet(results / "splits" / "subjects.parquet")
    assert not subjects.has_followup.any()
    test = set(subjects.subject_id[subjects.downstream_part == "test"])
    val = set(subjects.subject_id[subjects.downstream_part == "val"])
    assert test and val
    assert subjects[subjects.downstream_part.isin(["val", "test"])].n_scans.max() >= 2

    # pretraining on disc pairs: rows of discs.npy; positives one subject, two acquisitions, one level
    summary = json.loads((results / "splits" / "summary.json").read_text())
    assert summary["structure"] == "disc" and summary["array"] == "discs.npy"
    volumes = pd.read_parquet(results / "splits" / "volumes.parquet")
    rows = volumes[volumes.kind == "disc"].set_index("row")
    pairs = pd.read_parquet(results / "splits" / "pairs.parquet")
    assert len(pairs) and set(pairs.a) | set(pairs.b) <= set(rows.index)
    positives = pairs[pairs.positive]
    a, b = rows.loc[positives.a], rows.loc[positives.b]
    assert len(positives) > 0
    assert (a.subject_id.to_numpy() == b.subject_id.to_numpy()).all()
    assert (a.scan_id.to_numpy() != b.scan_id.to_numpy()).all()
    assert (a.level.to_numpy() == b.level.to_numpy()).all() and (positives.years == 0).all()
    metrics = pd.read_csv(results / "pretrain" / "siamese" / "metrics.csv")
    assert metrics.epoch.max() == 3 and np.isfinite(metrics.loss).all()

    # no downstream test subject in any training part: pretraining, its pairs, the probes' label subsets
    assert not test & set(subjects.subject_id[subjects.ssl_part != "excluded"])
    paired = set(rows.loc[pairs.a].subject_id) | set(rows.loc[pairs.b].subject_id)
    assert not test & paired
    assert not test & set(pd.read_parquet(results / "probes" / "subsets.parquet").subject_id)

    # every probe job scored on the test discs, every (model, head) in the summary
    for model in MODELS:
        for task in TASKS:
            job = json.loads((results / "probes" / "runs" / model / task / "f1" / "seed0" / "metrics.json").read_text())
            assert job["n_test"] > 0 and job["n_test_subjects"] == len(test), (model, task)
            assert job["samples"]["missing_body"] == 0
    probe_summary = pd.read_csv(results / "probes" / "summary.csv")
    headline = probe_summary[((probe_summary.task == "grade") & (probe_summary.metric == "average_class_accuracy"))
                             | ((probe_summary.task == "herniation") & (probe_summary.metric == "auc"))]
    assert set(zip(headline.model, headline.task)) == {(m, t) for m in MODELS for t in TASKS}
    assert headline["mean"].between(0, 1).all() and (headline.ci_low <= headline.ci_high).all()
