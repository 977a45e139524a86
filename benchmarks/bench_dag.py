"""Building the workflow's DAG at population scale (issue 9): ``snakemake -n`` on synthetic cohorts of 20,000 and
100,000 studies.

Each cohort is a DICOM archive whose ingest has already run: a synthetic ingest plan and manifest with one scan per
study (and the other ingest outputs, small) written under a temporary results folder, so that Snakemake passes the
ingest checkpoints and plans every job: the ingest, localise and extract shard jobs (``scale.scans_per_shard`` scans
each), their merges, splits, pretraining, probes and the report. Prints the planned jobs, the wall time and the peak memory
(summed PSS of the process tree) of ``snakemake -n``, and the ratio to the target: under 60 s for 20,000 studies.
For contrast, per-scan jobs (``scans_per_shard: 1``) on 2,000 studies.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.bench_ingest import measure

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TARGET_S = 60.0
COHORTS = ((20_000, 500, True), (100_000, 500, True), (20_000, 500, False), (100_000, 500, False),
           (2_000, 1, True))  # (studies, scans per shard, ingest done)
SOURCE = "dicom"


DEMO_OUTPUTS = ("dicom/", "truth/labels/", "truth/subjects.csv", "truth/studies.csv", "truth/gradings.csv",
                "truth/landmarks.csv", "truth/planted_files.csv", "pseudonym.key")


def synthetic_cohort(workdir: Path, n_studies: int, scans_per_shard: int, source: str = "volumes",
                     ingest_done: bool = True) -> Path:
    """A cohort of ``n_studies`` studies whose ingest outputs exist (source ``volumes``: a volumes table; ``demo``:
    the demo cohort's outputs, empty); returns its config file."""
    results = workdir / "results"
    ingest = results / "ingest"
    subjects = [f"s{i // 2:06d}" for i in range(n_studies)]  # two studies per subject
    config: dict = {"results": str(results), "scale": {"scans_per_shard": scans_per_shard}}
    (workdir / "key").write_text("benchmark-key-0123456789abcdef")
    if source == "volumes":
        table = workdir / "volumes.csv"
        pd.DataFrame({"image": [f"images/{i:06d}.nii.gz" for i in range(n_studies)], "subject": subjects}).to_csv(
            table, index=False)
        config["cohort"] = {"source": "volumes", "volumes_table": str(table), "key_file": str(workdir / "key")}
    elif source == "dicom":
        (workdir / "archive").mkdir()
        config["cohort"] = {"source": "dicom", "dicom_dir": str(workdir / "archive"), "key_file": str(workdir / "key")}
    else:
        for name in DEMO_OUTPUTS:
            target = results / "demo_cohort" / name
            target.mkdir(parents=True, exist_ok=True) if name.endswith("/") else (
                target.parent.mkdir(parents=True, exist_ok=True), target.write_text(""))
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    if source != "volumes":  # a DICOM archive's ingest plan (its shards are temporary: gone once merged)
        (ingest / "plan").mkdir(parents=True)
        pd.DataFrame({"file_key": [], "shard": []}).to_parquet(ingest / "plan" / "plan.parquet")
        (ingest / "plan" / "plan.json").write_text(json.dumps({"shards": -(-n_studies // scans_per_shard)}))
    if not ingest_done:  # the plan only: Snakemake plans the ingest shard jobs and their merge
        return path
    for folder in ("volumes", "labels"):
        (ingest / folder).mkdir(parents=True, exist_ok=True)
    scans = [f"scan-{i:016x}" for i in range(n_studies)]
    manifest = pd.DataFrame({"scan_id": scans, "subject_id": [f"sub-{s}" for s in subjects],
                             "study_id": [f"ses-{i:012x}" for i in range(n_studies)],
                             "days_since_first_study": np.where(np.arange(n_studies) % 2, 800, 0),
                             "volume": [f"volumes/{s}.nii.gz" for s in scans], "label_map": ""})
    manifest.to_parquet(ingest / "manifest.parquet", index=False)
    manifest.to_csv(ingest / "manifest.csv", index=False)
    files = pd.DataFrame({"file": [f"row {i + 2}" for i in range(n_studies)], "status": "used", "reason": ""})
    files.to_parquet(ingest / "files.parquet", index=False)
    files.to_csv(ingest / "files.csv", index=False)
    pd.DataFrame({"series": scans}).to_csv(ingest / "series.csv", index=False)
    for name in ("gradings", "subjects", "landmarks"):
        pd.DataFrame({"subject_id": []}).to_parquet(ingest / f"{name}.parquet", index=False)
        pd.DataFrame({"subject_id": []}).to_csv(ingest / f"{name}.csv", index=False)
    (ingest / "landmark_rows.csv").write_text("row,status,reason\n")
    (ingest / "summary.json").write_text(json.dumps({"volumes": n_studies}))
    return path


def plan(config: Path, workdir: Path) -> tuple[int, float, float]:
    """Jobs planned by ``snakemake -n``, its wall time (s) and peak memory (MiB)."""
    listing = workdir / "plan.txt"
    command = ["bash", "-c", f"'{SNAKEMAKE}' -n -s '{ROOT / 'Snakefile'}' --directory '{workdir}' "
                             f"--configfile '{config}' --cores 2 --quiet rules > '{listing}' 2>&1"]
    wall, peak = measure(command)
    text = listing.read_text()
    total = re.search(r"^total\s+(\d+)$", text, flags=re.M)
    if total is None:
        raise RuntimeError(f"no job count in the output of snakemake -n:\n{text[-2000:]}")
    return int(total.group(1)), wall, peak


def rulegraph() -> str:
    """The rule graph of the demo workflow (Graphviz dot), drawn past the ingest checkpoint: ``make rulegraph``."""
    with tempfile.TemporaryDirectory(prefix="spine_ssl_rulegraph_") as tmp:
        workdir = Path(tmp)
        config = synthetic_cohort(workdir, 100, 500, source="demo")
        run = subprocess.run([str(SNAKEMAKE), "--rulegraph", "--quiet", "all", "-s", str(ROOT / "Snakefile"),
                              "--directory", str(workdir), "--configfile", str(config)],
                             capture_output=True, text=True, check=True)
    return run.stdout.replace(str(workdir) + "/", "")


def main() -> None:
    print(f"snakemake -n on synthetic DICOM cohorts (one scan per study); target < {TARGET_S:.0f} s for 20,000 "
          "studies", flush=True)
    for n_studies, per_shard, ingest_done in COHORTS:
        with tempfile.TemporaryDirectory(prefix="spine_ssl_dag_") as tmp:
            workdir = Path(tmp)
            config = synthetic_cohort(workdir, n_studies, per_shard, SOURCE, ingest_done)
            jobs, wall, peak = plan(config, workdir)
        shards = -(-n_studies // per_shard)
        state = ("ingest done: localise/extract shards onwards" if ingest_done
                 else "ingest planned: ingest shards and merge")
        ratio = f", ratio to the target {wall / TARGET_S:.2f}" if n_studies == 20_000 else ""
        print(f"{n_studies:>7,} studies, {per_shard:>3} scans per shard ({shards:,} shards), {state}: {jobs:,} jobs "
              f"planned, {wall:.1f} s, peak {peak:.0f} MiB{ratio}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--rulegraph"]:
        print(rulegraph(), end="")
    else:
        main()
