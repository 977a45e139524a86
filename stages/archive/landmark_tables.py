"""Landmark tables at ingest (level centres standing in for the localiser, stages/anatomy/landmarks.py): read and
normalised before any work, pseudonymised with the scans, and the command-line options every ingest stage shares."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from stages.anatomy import landmarks
from stages.archive.manifest import write_table
from stages.core import levels

log = logging.getLogger("ingest")


def read_landmark_table(path: Path | None, columns: dict[str, str] | None, count_from: str,
                        first: str | None) -> pd.DataFrame | None:
    """The landmark table read and normalised (stages.anatomy.landmarks), None without one; a bad table raises
    landmarks.LandmarkError at once, before any work."""
    if path is None:
        return None
    return landmarks.normalise_landmarks(landmarks.read_landmarks(path, columns), count_from, first)


def write_landmarks(marks_file: Path, rows_file: Path, table: pd.DataFrame | None, scan_ids: dict[str, str],
                    sizes: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    """The usable rows under scan ids as ``marks_file`` (Parquet, CSV beside it; empty without a table) and every
    row's account as ``rows_file`` (CSV); returns their summary."""
    if table is None:
        marks, account = landmarks.empty_landmarks(), pd.DataFrame(columns=landmarks.ACCOUNT)
    else:
        marks, account = landmarks.pseudonymise_landmarks(table, scan_ids, sizes)
    write_table(marks, marks_file)
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    account.to_csv(rows_file, index=False)
    summary = landmarks.summarise_landmarks(account)
    if table is not None:
        log.info("landmark table: %d rows, %d used (%d scans), %d rejected (see landmark_rows.csv)", summary["rows"],
                 summary["used"], marks.scan_id.nunique(), summary["rejected"])
    return summary


def _column_pair(text: str) -> tuple[str, str]:
    """argparse type of --landmark-column: OURS=THEIRS, OURS one of the landmark table's columns."""
    ours, sep, theirs = text.partition("=")
    if not sep or not ours.strip() or not theirs.strip():
        raise argparse.ArgumentTypeError(f"expected OURS=THEIRS (e.g. level=vertebra_name), got {text!r}")
    if ours.strip() not in landmarks.OURS:
        raise argparse.ArgumentTypeError(f"unknown landmark column {ours.strip()!r}; ours are "
                                         f"{', '.join(landmarks.OURS)}")
    return ours.strip(), theirs.strip()


def add_landmark_options(parser: argparse.ArgumentParser, scan: str) -> None:
    """--landmarks, --landmark-column, --level-count-from, --level-first (every ingest stage of DICOM or volumes)."""
    group = parser.add_argument_group("landmark table (level centres standing in for the localiser; see "
                                      "stages/anatomy/landmarks.py)")
    group.add_argument("--landmarks", type=Path, default=None,
                       help=f"Optional CSV or Parquet table of level centres: scan ({scan}), slice, x, y, level, "
                            "optional structure and depth_mm.")
    group.add_argument("--landmark-column", type=_column_pair, action="append", default=[], metavar="OURS=THEIRS",
                       help="The landmark table's name of one of our columns (scan, slice, x, y, level, structure, "
                            "depth_mm), e.g. level=vertebra; repeatable.")
    group.add_argument("--level-count-from", choices=levels.NUMBERINGS, default="top",
                       help="Numeric levels count from the top or from the sacrum (default: top).")
    group.add_argument("--level-first", choices=levels.VERTEBRAE, default=None,
                       help="The vertebra numbered 1 (default: T12 counting from the top, L5 from the sacrum).")


def landmark_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The landmark keyword arguments of ingest_dicom / ingest_volumes; a missing or bad table exits with code 2."""
    columns = dict(args.landmark_column)
    if args.landmarks is not None:
        if not args.landmarks.is_file():
            parser.error(f"--landmarks {args.landmarks} is not a file")
        try:
            read_landmark_table(args.landmarks, columns, args.level_count_from, args.level_first)
        except (landmarks.LandmarkError, ValueError) as err:
            parser.error(str(err))
    return {"landmark_table": args.landmarks, "landmark_columns": columns, "level_count_from": args.level_count_from,
            "level_first": args.level_first}
