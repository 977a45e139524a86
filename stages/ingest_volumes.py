"""Stage ingest_volumes: a cohort of NIfTI / MetaImage volumes and a table -> the same outputs as DICOM ingest.

For public sets that ship volumes instead of DICOM (e.g. SPIDER: ``images/{id}_t2.mha``, ``masks/{id}_t2.mha``).
The table (CSV) has one row per volume:

    image    path of the volume (.nii, .nii.gz, .mha, .mhd, .nrrd), relative to the table's folder or absolute
    subject  who it is (any identifier; it is pseudonymised)
    study    optional: which study/visit, unique in the cohort (default: the image's file name); a gradings table
             names it in its study_uid column
    days     optional: days since the subject's first study (or give `date` as YYYY-MM-DD instead; it is dropped)
    mask     optional: a label map in the same geometry, relative like `image`, numbered as --label-scheme says
             (default VerSe; spider for SPIDER's masks; stages/archive/label_scheme.py)
    + optional columns field_strength_t, manufacturer, model, sex, age_years, series_description

Run:
    python -m stages.ingest_volumes --table cohort.csv --key-file KEY \\
        --out-volumes results/ingest/volumes --out-labels results/ingest/labels ... (every --out-* of --help)

Writes the --out-* outputs (volumes, labels, manifest, files, series, gradings, subjects, landmarks, landmark_rows,
summary) exactly as ``stages.ingest`` does (a --landmarks table names each scan by the value of its ``image`` column
here); ``files`` accounts for every row of the table (used, or quarantined with the reason: missing
file, unreadable image, label map with another geometry, duplicated row). Label maps are written in the workflow's
numbering (VerSe); a mask with values the scheme does not know is used with those set to background, one without any
level of the workflow is not used: the manifest's ``label_problem`` says which, the row's reason in ``files`` names the
mask, and the summary counts both.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.archive import pseudonym as pn
from stages.archive.label_scheme import (
    VERSE,
    LabelScheme,
    add_label_scheme_option,
    problem_counts,
    remap_image,
    scheme_from_args,
)
from stages.archive.landmark_tables import add_landmark_options, landmark_options, read_landmark_table, write_landmarks
from stages.archive.manifest import (
    INGEST_OUTPUTS,
    MANIFEST_COLUMNS,
    QUARANTINED,
    USED,
    IngestOutputs,
    write_pseudonymised_tables,
    write_table,
)
from stages.core import cli

log = logging.getLogger("ingest_volumes")

OPTIONAL = ("field_strength_t", "manufacturer", "model", "sex", "age_years", "series_description")


def _resolve(base: Path, value: Any) -> Path | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    path = Path(str(value))
    return path if path.is_absolute() else base / path


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3))


def ingest_volumes(table_path: Path, out: IngestOutputs, key: bytes, gradings: Path | None = None,
                   subjects: Path | None = None, landmark_table: Path | None = None,
                   landmark_columns: dict[str, str] | None = None, level_count_from: str = "top",
                   level_first: str | None = None, label_scheme: LabelScheme = VERSE) -> dict[str, Any]:
    """Run the stage; return the summary. Raises RuntimeError when no volume could be read, ValueError for a table
    without image and subject columns. A landmark table (stages.anatomy.landmarks) names scans by the ``image`` value;
    masks are numbered as ``label_scheme`` says (stages.archive.label_scheme)."""
    marks = read_landmark_table(landmark_table, landmark_columns, level_count_from, level_first)
    table = pd.read_csv(table_path, dtype={"subject": str, "study": str})
    missing = {"image", "subject"} - set(table.columns)
    if missing:
        raise ValueError(f"{table_path}: the table needs columns image and subject; missing {sorted(missing)}")
    base = table_path.parent
    if "days" in table:
        table["_days"] = pd.to_numeric(table["days"], errors="coerce")
    elif "date" in table:
        dates = pd.to_datetime(table["date"], errors="coerce")
        table["_days"] = (dates - dates.groupby(table["subject"]).transform("min")).dt.days
    else:
        table["_days"] = np.nan
    out.volumes.mkdir(parents=True, exist_ok=True)
    out.labels.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    seen: dict[str, int] = {}
    scan_ids: dict[str, str] = {}  # the image column's value -> scan id, for the landmark table
    for i, rec in enumerate(table.to_dict("records")):
        image_path = _resolve(base, rec["image"])
        entry = {"file": f"row {i + 2}: {rec['image']}", "status": QUARANTINED, "reason": "", "series": ""}
        files.append(entry)
        if not str(rec.get("subject") or "").strip() or str(rec["subject"]) == "nan":
            entry["reason"] = "missing identity: empty subject"
            continue
        if image_path is None or not image_path.is_file():
            entry["reason"] = "missing file"
            continue
        resolved = str(image_path.resolve())
        if resolved in seen:
            entry["reason"] = f"duplicated row: the same image as row {seen[resolved] + 2}"
            continue
        seen[resolved] = i
        try:
            image = sitk.ReadImage(str(image_path))
        except RuntimeError as err:
            entry["reason"] = f"unreadable image: {str(err).strip().splitlines()[-1][:120]}"
            continue
        if image.GetDimension() != 3:
            entry["reason"] = f"not a 3D volume ({image.GetDimension()}D)"
            continue
        study = str(rec.get("study") or "").strip() or Path(str(rec["image"])).name
        subject = pn.subject_id(key, str(rec["subject"]))
        scan_id = pn.series_id(key, f"{rec['subject']}|{study}|{rec['image']}")
        label_map, label_problem = "", ""
        mask_path = _resolve(base, rec.get("mask"))
        if mask_path is not None:
            if not mask_path.is_file():
                label_problem = "label map file missing"
            else:
                mask = sitk.ReadImage(str(mask_path))
                if _same_geometry(mask, image):
                    remapped, check = remap_image(mask, label_scheme)
                    label_problem = check.problem
                    if check.usable:
                        sitk.WriteImage(remapped, str(out.labels / f"{scan_id}.nii.gz"), useCompression=True)
                        label_map = f"labels/{scan_id}.nii.gz"
                else:
                    label_problem = "label map geometry differs from the volume"
        sitk.WriteImage(image, str(out.volumes / f"{scan_id}.nii.gz"), useCompression=True)
        scan_ids.setdefault(str(rec["image"]).strip(), scan_id)
        entry.update(status=USED, reason=f"in volume {scan_id}", series=scan_id)
        if label_problem:
            entry["reason"] += f"; label map {rec['mask']}: {label_problem}"
            log.warning("label map %s: %s", rec["mask"], label_problem)
        size, spacing = image.GetSize(), image.GetSpacing()
        rows.append({
            "scan_id": scan_id, "subject_id": subject, "study_id": pn.study_id(key, study),
            "days_since_first_study": rec["_days"], "modality": rec.get("modality", "MR"),
            **{k: rec.get(k) for k in OPTIONAL},
            "echo_time_ms": np.nan, "repetition_time_ms": np.nan,
            "spacing_x": spacing[0], "spacing_y": spacing[1], "spacing_z": spacing[2],
            "size_x": size[0], "size_y": size[1], "size_z": size[2], "n_source_files": 1, "candidate_rank": 0,
            "volume": f"volumes/{scan_id}.nii.gz", "label_map": label_map, "label_problem": label_problem})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["age_years"] = pd.to_numeric(manifest.age_years, errors="coerce").clip(upper=90)
    accounting = pd.DataFrame(files)
    write_table(manifest, out.manifest)
    write_table(accounting, out.files)
    write_table(pd.DataFrame({"series": manifest.scan_id, "study_id": manifest.study_id, "reasons": ""}), out.series,
                parquet=False)
    tables = write_pseudonymised_tables(out, key, gradings, subjects, str)
    sizes = {r.scan_id: (int(r.size_x), int(r.size_y), int(r.size_z)) for r in manifest.itertuples()}
    landmark_summary = write_landmarks(out.landmarks, out.landmark_rows, marks, scan_ids, sizes)
    counts = accounting.status.value_counts().to_dict()
    summary = {"files": len(accounting), "used": counts.get(USED, 0), "skipped": 0,
               "quarantined": counts.get(QUARANTINED, 0), "volumes": len(manifest),
               "subjects": int(manifest.subject_id.nunique()), "studies": int(manifest.study_id.nunique()),
               "with_label_map": int((manifest.label_map != "").sum()),
               **problem_counts(manifest.label_problem), "tables": tables, "landmarks": landmark_summary}
    out.summary.parent.mkdir(parents=True, exist_ok=True)
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(files)d table rows: %(used)d used, %(quarantined)d quarantined (see files.csv)", summary)
    if not len(manifest):
        raise RuntimeError(f"no volume could be read from the {len(accounting)} rows of {table_path}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest_volumes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, required=True, help="CSV with one row per volume (see above).")
    pn.add_key_option(parser)
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="Threads for reading and writing images (default: 1).")
    parser.add_argument("--gradings", type=Path, default=None, help="Optional gradings CSV (patient_id = subject).")
    parser.add_argument("--subjects", type=Path, default=None, help="Optional subjects CSV (patient_id = subject).")
    add_landmark_options(parser, "the value of the table's image column")
    add_label_scheme_option(parser)
    cli.add_output_options(parser, INGEST_OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.table.is_file():
        parser.error(f"--table {args.table} is not a file")
    marks = landmark_options(args, parser)
    scheme = scheme_from_args(args, parser)
    key = pn.key_from_args(args, parser)
    out = IngestOutputs(**cli.outputs_from_args(args, parser, INGEST_OUTPUTS))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    cli.setup_logging(args.log, "ingest_volumes")
    try:
        ingest_volumes(args.table, out, key, args.gradings, args.subjects, **marks, label_scheme=scheme)
    except (RuntimeError, ValueError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
