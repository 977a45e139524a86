"""The tables every ingest stage writes alike (DICOM archive, volume table, crop table): the scan manifest's columns,
the statuses of the file account, how a table is written (Parquet for the workflow, CSV beside it to read), and the
outputs an ingest stage is told to write.

The manifest names each scan's volume and label map as ``volumes/{scan_id}.nii.gz`` and ``labels/{scan_id}.nii.gz``:
the file of that name in the volumes (labels) folder the workflow declares (:func:`scan_file`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from stages.archive import pseudonym as pn
from stages.core import cli

USED, SKIPPED, QUARANTINED = "used", "skipped", "quarantined"

MANIFEST_COLUMNS = ["scan_id", "subject_id", "study_id", "days_since_first_study", "age_years", "sex", "modality",
                    "field_strength_t", "manufacturer", "model", "echo_time_ms", "repetition_time_ms", "spacing_x",
                    "spacing_y", "spacing_z", "size_x", "size_y", "size_z", "series_description", "n_source_files",
                    "candidate_rank", "volume", "label_map", "label_problem"]


def write_table(frame: pd.DataFrame, path: Path, parquet: bool = True) -> None:
    """``frame`` as ``path``: Parquet with a CSV copy beside it (same name, suffix .csv), or, with ``parquet`` False,
    CSV alone."""
    if parquet and path.suffix == ".csv":
        raise ValueError(f"{path}: a Parquet table needs another suffix than its CSV copy's")
    path.parent.mkdir(parents=True, exist_ok=True)
    if parquet:
        frame.to_parquet(path, index=False)
    frame.to_csv(path.with_suffix(".csv") if parquet else path, index=False)


def scan_file(folder: Path, entry: str) -> Path:
    """The file a manifest entry (``volumes/{scan_id}.nii.gz``, ``labels/...``) names, in ``folder``."""
    return folder / PurePosixPath(entry).name


@dataclass(frozen=True)
class IngestOutputs:
    """What an ingest stage of a DICOM archive or a volume table writes (each table with its CSV copy beside it)."""

    volumes: Path
    labels: Path
    manifest: Path
    files: Path
    series: Path
    gradings: Path
    subjects: Path
    landmarks: Path
    landmark_rows: Path
    summary: Path

    @classmethod
    def in_folder(cls, folder: Path) -> IngestOutputs:
        """The outputs laid out in one folder as the workflow lays out results/ingest (and a shard its folder)."""
        return cls(volumes=folder / "volumes", labels=folder / "labels", manifest=folder / "manifest.parquet",
                   files=folder / "files.parquet", series=folder / "series.csv",
                   gradings=folder / "gradings.parquet", subjects=folder / "subjects.parquet",
                   landmarks=folder / "landmarks.parquet", landmark_rows=folder / "landmark_rows.csv",
                   summary=folder / "summary.json")


SECOND_COLUMNS = ["scan_id", "subject_id", "study_id", "series", "block", "plane", "weighting", "echo_time_ms",
                  "repetition_time_ms", "spacing_x", "spacing_y", "spacing_z", "size_x", "size_y", "size_z",
                  "series_description", "n_source_files", "candidate_rank", "volume"]


@dataclass(frozen=True)
class SecondOutputs:
    """Where the DICOM ingest writes each study's second series (ingest.second_series: its axial T2, Hou et al.
    2023): the folder of their volumes, ``{series}_{block}.nii.gz``, one per block of one orientation, and the table
    second_series.parquet (SECOND_COLUMNS, a CSV copy beside it), one row per volume, ``volume`` naming it as
    ``second/{series}_{block}.nii.gz`` (:func:`scan_file` finds it in the folder)."""

    volumes: Path
    table: Path

    @classmethod
    def in_folder(cls, folder: Path) -> SecondOutputs:
        """Laid out in one folder as the workflow lays out results/ingest (and a shard its folder)."""
        return cls(volumes=folder / "second", table=folder / "second_series.parquet")


SECOND_OUTPUTS = {
    "second_volumes": "Folder of the studies' second series (e.g. axial T2), {series}_{block}.nii.gz "
                      "(default: 'second' beside --out-manifest).",
    "second_series": "One row per second-series volume: its scan, study, block, geometry (Parquet; CSV beside it; "
                     "default: second_series.parquet beside --out-manifest).",
}


INGEST_OUTPUTS = {
    "volumes": "Folder of the volumes, {scan_id}.nii.gz.",
    "labels": "Folder of the label maps, {scan_id}.nii.gz.",
    "manifest": "The scan manifest (Parquet; a CSV copy beside it).",
    "files": "Every file or table row: used, skipped or quarantined, with the reason (Parquet; CSV beside it).",
    "series": "One row per series: classification and decision (CSV).",
    "gradings": "The gradings table, pseudonymised (Parquet; CSV beside it; empty without --gradings).",
    "subjects": "The subjects table, pseudonymised (Parquet; CSV beside it; empty without --subjects).",
    "landmarks": "The landmark table's usable rows under scan ids (Parquet; CSV beside it).",
    "landmark_rows": "Every row of the landmark table: used, or rejected with the reason (CSV).",
    "summary": "The counts (JSON).",
}


def write_pseudonymised_tables(out: IngestOutputs, key: bytes, gradings: Path | None, subjects: Path | None,
                               dtype: type | dict[str, type]) -> dict[str, int]:
    """The --gradings and --subjects tables (CSV, read with ``dtype``) pseudonymised into ``out``; written all the
    same, empty, when not given, so that later stages always find them. Returns their numbers of rows."""
    rows = {}
    for name, path in (("gradings", gradings), ("subjects", subjects)):
        if path is None:
            table = pd.DataFrame(columns=["subject_id", "study_id"] if name == "gradings" else ["subject_id"])
        else:
            table = pn.pseudonymise_table(pd.read_csv(path, dtype=dtype), key, name)
        write_table(table, getattr(out, name))
        rows[name] = len(table)
    return rows


INGEST_INPUTS = {
    "manifest": ("FILE", "Ingest's scan manifest (manifest.parquet)."),
    "volumes": ("FOLDER", "Ingest's folder of volumes ({scan_id}.nii.gz)."),
    "labels": ("FOLDER", "Ingest's folder of label maps ({scan_id}.nii.gz)."),
    "landmarks": ("FILE", "Ingest's landmark table (landmarks.parquet), if any."),
}


def add_ingest_inputs(group: argparse._ActionsContainer, *names: str, required: bool = True) -> None:
    """--manifest, --volumes, --labels, --landmarks (those named): ingest's outputs that a later stage reads."""
    for name in names:
        kind, text = INGEST_INPUTS[name]
        group.add_argument(f"--{name}", type=cli.existing_file if kind == "FILE" else cli.existing_folder,
                           required=required, default=None, metavar=kind, help=text)
