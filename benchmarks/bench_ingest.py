"""Ingest speed and memory against dcm2niix, the field's standard DICOM-to-NIfTI converter (issue 3).

On the same DICOM tree (a demo cohort of >= 200 studies at the default demo size, generated once and kept in
benchmarks/out/), this runs ``python -m stages.ingest --threads 2`` and ``dcm2niix -z y`` and prints wall time and
peak memory (proportional set size summed over the process tree, so pages that forked workers share with their
parent count once; sampled every 50 ms) and their ratio.
Targets: ingest wall time within 1.5 x dcm2niix's on 2 cores; ingest peak memory that does not grow with the number
of studies (the same run on half the cohort is the comparison).

Note the work differs: dcm2niix converts every series of every study (localizer, T1, T2, axial), ingest reads every
header but decodes and writes only the selected sagittal T2 of each study, and pseudonymises.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stages.archive.manifest import IngestOutputs
from stages.demo_cohort import DemoConfig, DemoOutputs, generate

OUT = Path(__file__).resolve().parent / "out"
N_SUBJECTS = 140  # about 210 studies with the default follow-up rates
TARGET_RATIO = 1.5


def _memory(process: psutil.Process) -> int:
    """Proportional set size: pages shared between processes (forked workers) are counted once across the tree."""
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return process.memory_info().rss


def measure(command: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Wall time (s) and peak memory (MiB, summed PSS) of the whole process tree of ``command``."""
    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(_memory(p) for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 2**20


def cohort() -> Path:
    path = OUT / f"cohort_{N_SUBJECTS}"
    if not (path / "pseudonym.key").is_file():
        shutil.rmtree(path, ignore_errors=True)
        print(f"generating the benchmark cohort ({N_SUBJECTS} subjects) once, into {path} ...", flush=True)
        generate(DemoConfig.from_config({"n_subjects": N_SUBJECTS}), DemoOutputs.in_folder(path), workers=2)
    return path


def outputs(folder: Path) -> list[str]:
    """The ingest stage's --out-* options for outputs laid out in ``folder`` as the workflow lays out results/ingest."""
    laid_out = IngestOutputs.in_folder(folder)
    return [arg for name, path in vars(laid_out).items() for arg in (f"--out-{name.replace('_', '-')}", str(path))]


def half_archive(archive: Path, target: Path) -> int:
    """A second archive with every other patient folder of the first (symbolic links); returns its study count."""
    target.mkdir(parents=True)
    studies = 0
    for i, patient in enumerate(sorted(p for p in archive.iterdir() if p.is_dir())):
        if i % 2 == 0:
            (target / patient.name).symlink_to(patient)
            studies += sum(1 for s in patient.iterdir() if s.is_dir())
    return studies


def main() -> None:
    source = cohort()
    archive = source / "dicom"
    n_studies = sum(1 for p in archive.glob("*/*") if p.is_dir())
    n_files = sum(1 for p in archive.rglob("*") if p.is_file())
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest = [sys.executable, "-m", "stages.ingest", "--key-file", str(source / "pseudonym.key"), "--threads", "2"]
        t_ingest, m_ingest = measure([*ingest, "--dicom-dir", str(archive), *outputs(tmp / "ingest")])
        (tmp / "d2n").mkdir()
        # dcm2niix exits with 8 when some files could not be converted (the planted bad files).
        t_d2n, m_d2n = measure([dcm2niix, "-z", "y", "-b", "n", "-o", str(tmp / "d2n"), str(archive)], ok=(0, 8))
        n_half = half_archive(archive, tmp / "half")
        t_half, m_half = measure([*ingest, "--dicom-dir", str(tmp / "half"), *outputs(tmp / "ingest_half")])
        n_d2n = sum(1 for _ in (tmp / "d2n").glob("*.nii.gz"))
        n_ingest = sum(1 for _ in (tmp / "ingest" / "volumes").glob("*.nii.gz"))
    print(f"ingest: {n_studies} studies, {n_files} files ({source.name})")
    print(f"ingest:   stages.ingest  {t_ingest:7.1f} s  peak {m_ingest:7.0f} MiB  ({n_ingest} volumes, 2 workers)")
    print(f"ingest:   dcm2niix -z y  {t_d2n:7.1f} s  peak {m_d2n:7.0f} MiB  ({n_d2n} volumes)")
    ratio = t_ingest / t_d2n
    print(f"ingest: wall time ratio ingest / dcm2niix = {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    print(f"ingest: peak memory {n_half} studies {m_half:.0f} MiB vs {n_studies} studies {m_ingest:.0f} MiB: "
          f"ratio {m_ingest / m_half:.2f} for {n_studies / n_half:.2f} x the studies ({t_half:.1f} s)")


if __name__ == "__main__":
    main()
