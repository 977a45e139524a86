"""Stage demo_montage: a PNG of demo studies as a radiologist would see them, read back from the DICOM files.

Each row is one subject with follow-ups: the mid-sagittal slice of the sagittal T2 at baseline and at every
follow-up, side by side, with the Pfirrmann grade (and H for herniation) of each disc from the ground truth.
No identity is shown: subjects are numbered in the montage only.

Run:
    python -m stages.demo_montage --dicom results/demo_cohort/dicom --studies results/demo_cohort/truth/studies.csv \\
        --gradings results/demo_cohort/truth/gradings.csv --landmarks results/demo_cohort/truth/landmarks.csv \\
        --montage-subjects 3 --out results/demo_cohort/montage.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stages.core import cli  # noqa: E402
from stages.demo.synth_dicom import read_volume  # noqa: E402

log = logging.getLogger("demo_montage")


def pick_subjects(studies: pd.DataFrame, gradings: pd.DataFrame, n: int) -> list[str]:
    """The first ``n`` graded subjects (in table order) with at least one follow-up; fall back to any subject."""
    counts = studies.groupby("patient_id", sort=False).size()
    graded = set(gradings["patient_id"])
    with_fu = [p for p, c in counts.items() if c > 1 and p in graded]
    rest = [p for p in counts.index if p not in with_fu]
    return (with_fu + rest)[:n]


def montage(dicom: Path, studies_file: Path, gradings_file: Path, landmarks_file: Path, n_subjects: int,
            out: Path) -> None:
    """The montage of ``n_subjects`` subjects, read from the archive ``dicom`` (the studies table names series
    folders relative to the cohort folder, the one that holds the archive) and the truth tables."""
    studies = pd.read_csv(studies_file)
    gradings = pd.read_csv(gradings_file)
    landmarks = pd.read_csv(landmarks_file)
    chosen = pick_subjects(studies, gradings, n_subjects)
    if not chosen:
        raise ValueError(f"no studies in {studies_file}")
    n_cols = int(studies[studies.patient_id.isin(chosen)].groupby("patient_id").size().max())
    fig, axes = plt.subplots(len(chosen), n_cols, figsize=(3.6 * n_cols, 3.9 * len(chosen)), squeeze=False,
                             facecolor="black")
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, pid in enumerate(chosen):
        for c, study in enumerate(studies[studies.patient_id == pid].sort_values("visit").itertuples()):
            files = sorted(p for p in (dicom.parent / study.sag_t2_dir).iterdir() if p.is_file())
            volume, headers = read_volume(files)
            marks = landmarks[landmarks.series_uid == study.sag_t2_series_uid]
            k = int(np.clip(np.rint(marks[marks.level == "L3"].k.iloc[0]), 0, len(volume) - 1))
            image = volume[k].astype(float)
            lo, hi = np.percentile(image, [0.5, 99.7])
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
            grades = gradings[gradings.study_uid == study.study_uid].set_index("level")
            for mark in marks[marks.structure == "disc"].itertuples():
                if mark.level in grades.index:
                    g = grades.loc[mark.level]
                    text = f"{mark.level} P{g.pfirrmann}" + (" H" if g.herniation else "")
                    ax.annotate(text, (mark.i, mark.j), xytext=(mark.i - 0.42 * image.shape[1], mark.j),
                                color="yellow", fontsize=7, va="center",
                                arrowprops={"arrowstyle": "-", "color": "yellow", "lw": 0.5, "alpha": 0.6})
            when = "baseline" if study.visit == 0 else f"+{study.years_from_baseline:.1f} y"
            ax.set_title(f"subject {r + 1} · {when} · {study.field_strength_t:g} T", color="white", fontsize=9)
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Demo cohort: sagittal T2, mid-sagittal slice (anterior left)\n"
                 "Pfirrmann grade per disc (P1-P5), H = herniation", color="white", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor="black")
    plt.close(fig)
    log.info("wrote %s (%d subjects)", out, len(chosen))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.demo_montage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom", type=cli.existing_folder, required=True,
                        help="The archive stages.demo_cohort wrote (--out-dicom).")
    for name in ("studies", "gradings", "landmarks"):
        parser.add_argument(f"--{name}", type=cli.existing_file, required=True,
                            help=f"The {name} table of stages.demo_cohort (--out-{name}).")
    parser.add_argument("--montage-subjects", type=cli.positive_int, default=3,
                        help="Number of subjects (rows) to show (demo.montage_subjects; default: 3).")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write.")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log, "demo_montage")
    montage(args.dicom, args.studies, args.gradings, args.landmarks, args.montage_subjects, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
