"""The tables every ingest stage writes alike (DICOM archive, volume table, crop table): the scan manifest's columns,
the statuses of the file account, and how a table is written (Parquet for the workflow, CSV beside it to read)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

USED, SKIPPED, QUARANTINED = "used", "skipped", "quarantined"

MANIFEST_COLUMNS = ["scan_id", "subject_id", "study_id", "days_since_first_study", "age_years", "sex", "modality",
                    "field_strength_t", "manufacturer", "model", "echo_time_ms", "repetition_time_ms", "spacing_x",
                    "spacing_y", "spacing_z", "size_x", "size_y", "size_z", "series_description", "n_source_files",
                    "candidate_rank", "volume", "label_map", "label_problem"]


def write_table(frame: pd.DataFrame, base: Path, parquet: bool = True) -> None:
    """``frame`` as ``base``.parquet (unless ``parquet`` is False) and ``base``.csv."""
    base.parent.mkdir(parents=True, exist_ok=True)
    if parquet:
        frame.to_parquet(base.with_suffix(".parquet"), index=False)
    frame.to_csv(base.with_suffix(".csv"), index=False)
