"""Ingest speed and memory against dcm2niix, the field's standard DICOM-to-NIfTI converter (issues 3 and 20).

Run: ``python -m benchmarks ingest`` (``make bench`` runs every benchmark). Two DICOM archives, each generated once by
the demo generator and kept in benchmarks/out/ (on 2 busy cores the first run spends about 12 and 17 minutes on them):
  demo   the demo cohort at its default size, 140 subjects: 215 studies, 9,033 files of 160 x 160 slices, 0.47 GB;
  large  85 subjects at matrix 320: 125 studies of 4 series (3-plane localizer, sagittal T1 and T2, axial), 5,253
         files of 320 x 320 slices, 1.08 GB.
On each, this runs ``python -m stages.ingest --threads 2`` and ``dcm2niix -z y`` and prints files, size, studies, the
wall time and peak memory of each (proportional set size summed over the process tree, so pages that forked workers
share with their parent count once; sampled every 50 ms) and the ratio of the wall times.

Targets: ingest wall time at most 1.0 x dcm2niix's on each archive, on 2 cores; ingest peak memory that does not grow
with the number of studies (the same run on every other patient of the demo archive is the comparison).

The work differs. dcm2niix reads every file and converts every series of every study (8 NIfTI files per study, all
42 slices) with its internal gzip at level 6, in one thread (it would use pigz if installed; pigz is not a
dependency). Ingest reads every file's header but decodes and writes only the selected sagittal T2 of each study (15
slices; gzip with run-length matches only, 4-5 % larger than level 6), checks each series (geometry, duplicates,
missing slices), pseudonymises, and accounts for every file; it runs 2 worker processes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from stages.archive.manifest import IngestOutputs
from stages.demo_cohort import DemoConfig, DemoOutputs, generate

OUT = Path(__file__).resolve().parent / "out"
TARGET_RATIO = 1.0


@dataclass(frozen=True)
class Archive:
    """A benchmark archive: the demo generator's settings, and where the archive is kept."""

    name: str
    demo: dict[str, Any]
    folder: str

    def path(self) -> Path:
        """The archive's cohort folder, generated on first use."""
        path = OUT / self.folder
        if not (path / "pseudonym.key").is_file():
            shutil.rmtree(path, ignore_errors=True)
            print(f"generating the {self.name} archive ({self.demo}) once, into {path} ...", flush=True)
            counts = generate(DemoConfig.from_config(self.demo), DemoOutputs.in_folder(path), workers=2)
            print(f"generated: {counts}", flush=True)
        return path


ARCHIVES = (
    Archive("demo", {"n_subjects": 140}, "cohort_140"),  # about 210 studies with the default follow-up rates
    Archive("large", {"n_subjects": 85, "matrix": 320}, "cohort_85_matrix320"),  # >= 100 studies, >= 5,000 files
)


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


def ingest_command(cohort: Path) -> list[str]:
    return [sys.executable, "-m", "stages.ingest", "--key-file", str(cohort / "pseudonym.key"), "--threads", "2"]


def compare(archive: Archive, tmp: Path) -> dict[str, Any]:
    """Ingest and dcm2niix on one archive; the figures this benchmark prints."""
    cohort = archive.path()
    dicom = cohort / "dicom"
    files = [p for p in dicom.rglob("*") if p.is_file()]
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    t_ingest, m_ingest = measure([*ingest_command(cohort), "--dicom-dir", str(dicom), *outputs(tmp / "ingest")])
    (tmp / "d2n").mkdir()
    # dcm2niix exits with 8 when some files could not be converted (the planted bad files).
    t_d2n, m_d2n = measure([dcm2niix, "-z", "y", "-b", "n", "-o", str(tmp / "d2n"), str(dicom)], ok=(0, 8))
    return {
        "files": len(files), "gb": sum(p.stat().st_size for p in files) / 1e9,
        "studies": sum(1 for p in dicom.glob("*/*") if p.is_dir()),
        "ingest_s": t_ingest, "ingest_mib": m_ingest, "d2n_s": t_d2n, "d2n_mib": m_d2n,
        "ingest_volumes": sum(1 for _ in (tmp / "ingest" / "volumes").glob("*.nii.gz")),
        "d2n_volumes": sum(1 for _ in (tmp / "d2n").glob("*.nii.gz")),
    }


def main() -> None:
    results = {}
    for archive in ARCHIVES:
        with tempfile.TemporaryDirectory() as tmp:
            r = results[archive.name] = compare(archive, Path(tmp))
        ratio = r["ingest_s"] / r["d2n_s"]
        print(f"ingest [{archive.name}]: {r['files']} files, {r['gb']:.2f} GB, {r['studies']} studies "
              f"({archive.folder})")
        print(f"ingest [{archive.name}]:   stages.ingest  {r['ingest_s']:7.1f} s  peak {r['ingest_mib']:6.0f} MiB  "
              f"({r['ingest_volumes']} volumes, 2 workers)")
        print(f"ingest [{archive.name}]:   dcm2niix -z y  {r['d2n_s']:7.1f} s  peak {r['d2n_mib']:6.0f} MiB  "
              f"({r['d2n_volumes']} volumes)")
        print(f"ingest [{archive.name}]: wall time ratio ingest / dcm2niix = {ratio:.2f} (target <= {TARGET_RATIO}: "
              f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})", flush=True)
    demo = ARCHIVES[0].path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_half = half_archive(demo / "dicom", tmp / "half")
        t_half, m_half = measure([*ingest_command(demo), "--dicom-dir", str(tmp / "half"), *outputs(tmp / "out")])
    full = results[ARCHIVES[0].name]
    print(f"ingest [demo]: peak memory {n_half} studies {m_half:.0f} MiB vs {full['studies']} studies "
          f"{full['ingest_mib']:.0f} MiB: ratio {full['ingest_mib'] / m_half:.2f} for "
          f"{full['studies'] / n_half:.2f} x the studies ({t_half:.1f} s)")


if __name__ == "__main__":
    main()
