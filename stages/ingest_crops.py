"""Stage ingest_crops: a table of pre-cut crops (one row per image) -> the ingest stage's outputs and the crops.

For cohorts that come as crops or 2D slices with a grading spreadsheet instead of DICOM. The table (CSV or Parquet)
has one row per image; its columns are named in the config (``cohort.crops.columns``: our name -> yours):

    path       the image: PNG, TIFF, NPY, NIfTI or MetaImage; 2D or 3D; relative to the table's folder or absolute
    subject    who it is (any identifier; it is pseudonymised)
    study      the acquisition: two rows of one subject with different values are two "studies", the pairs that
               self-supervision learns from (two time points, or T1 and T2 of the same disc)
    time       optional: days since the subject's first study, or a date (it is dropped after use)
    structure  optional: vertebra / body / VB or disc / disk / IVD (needed for numeric levels)
    level      T12 ... S1 and T12-L1 ... L5-S1, as L4-L5, L4/L5, L4L5, L4-5, or numbers counted from the top or the
               sacrum (``cohort.level_numbering``)
    family, sex, age   optional
    + the label columns named in ``cohort.crops.labels`` with their allowed range (e.g. pfirrmann 1-5)

Every row is accounted for in ``files.csv``: used, or quarantined with the reason (missing file, unreadable image,
unknown level or structure, label out of range, no subject, duplicated row or duplicated structure). Each used image
is stored as it was read (float32, slices first: (S, H, W), a 2D image as one slice) in ``crops/`` for the extract
stage (stages.extract_crops), which brings it to the extraction sizes and normalisation.

Run:
    python -m stages.ingest_crops --table crops.csv --key-file KEY \\
        --column path=file --column subject=patient --label pfirrmann=1:5 \\
        --out-crops results/ingest/crops --out-crop-table results/ingest/crops.parquet ... (every --out-* of --help)

Writes (each Parquet table with a CSV copy beside it) --out-crops (the images, {crop_id}.npy), --out-crop-table (one
row per used image), --out-manifest (one row per subject and acquisition: a "scan"), --out-files (the accounting),
--out-series, --out-gradings (one row per labelled disc), --out-subjects and --out-summary, like the other ingest
stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.archive import pseudonym as pn
from stages.archive.manifest import MANIFEST_COLUMNS, QUARANTINED, USED, write_table
from stages.core import cli, levels

log = logging.getLogger("ingest_crops")

FIELDS = ("path", "subject", "study", "time", "structure", "level", "family", "sex", "age")
REQUIRED = ("path", "subject", "level")
NPY = (".npy",)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".npy")
CROP_COLUMNS = ["crop_id", "scan_id", "subject_id", "study_id", "days_since_first_study", "kind", "level", "file",
                "slices", "height", "width", "dimensions"]


@dataclass(frozen=True)
class CropOutputs:
    """What stages.ingest_crops writes (each table with its CSV copy beside it); the manifest names no volume."""

    crops: Path
    crop_table: Path
    manifest: Path
    files: Path
    series: Path
    gradings: Path
    subjects: Path
    summary: Path

    @classmethod
    def in_folder(cls, folder: Path) -> CropOutputs:
        """The outputs laid out in one folder as the workflow lays out results/ingest."""
        names = {"crops": "crops", "crop_table": "crops.parquet", "series": "series.csv", "summary": "summary.json"}
        return cls(**{f.name: folder / names.get(f.name, f"{f.name}.parquet") for f in fields(cls)})


CROP_OUTPUTS = {
    "crops": "Folder of the crops as read, {crop_id}.npy (float32, slices first).",
    "crop_table": "One row per used image (Parquet; CSV beside it).",
    "manifest": "One row per subject and acquisition (Parquet; CSV beside it).",
    "files": "Every row of the table: used or quarantined, with the reason (Parquet; CSV beside it).",
    "series": "The acquisitions (CSV).",
    "gradings": "One row per labelled disc (Parquet; CSV beside it).",
    "subjects": "One row per subject: family, sex, age (Parquet; CSV beside it).",
    "summary": "The counts (JSON).",
}


@dataclass(frozen=True)
class CropTableSpec:
    """How to read a user's crop table: column names (ours -> theirs), label ranges, level numbering, slice axis."""

    columns: dict[str, str] = field(default_factory=dict)
    labels: dict[str, tuple[float, float]] = field(default_factory=dict)
    count_from: str = "top"
    first: str | None = None
    slice_axis: int | None = None  # None: the shortest axis of a 3D image

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table, every column as text (identifiers keep their leading zeros)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path).astype("string").astype(object).where(lambda t: t.notna(), None)
    return pd.read_csv(path, dtype=str, keep_default_na=False).replace({"": None})


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: Path, slice_axis: int | None = None) -> np.ndarray:
    """The image as float32 (S, H, W): a 2D image as one slice, colour as its mean; raises ValueError if unusable."""
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported file type {suffix or '(none)'}")
    try:
        if suffix in NPY:
            array = np.load(path, allow_pickle=False)
        else:
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            if image.GetNumberOfComponentsPerPixel() > 1:  # RGB(A): grey as the mean of the colour channels
                array = array[..., :3].mean(axis=-1)
    except (RuntimeError, OSError, ValueError) as err:
        message = str(err).strip().splitlines()[-1].replace(str(path), path.name)
        message = re.sub(r"\(0x[0-9a-f]+\)", "", message)  # ITK's object addresses
        raise ValueError(f"unreadable image: {message[:160]}") from None
    array = np.squeeze(np.asarray(array, dtype=np.float32))
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        axis = int(np.argmin(array.shape)) if slice_axis is None else slice_axis
        array = np.moveaxis(array, axis, 0)
    else:
        raise ValueError(f"unreadable image: {array.ndim} dimensions (2D or 3D expected)")
    if min(array.shape[1:]) < 2:
        raise ValueError(f"unreadable image: {array.shape[1]} x {array.shape[2]} pixels")
    if not np.isfinite(array).all():
        raise ValueError("unreadable image: non-finite values")
    if not (array > 0).any():
        raise ValueError("blank image: no positive intensity")
    return array


def _days(values: pd.Series, subjects: pd.Series) -> pd.Series:
    """Days since each subject's first study, from numbers (days) or dates; 0 when no time is given."""
    numbers = pd.to_numeric(values, errors="coerce")
    if values.notna().any() and numbers[values.notna()].isna().any():  # not all numeric: dates
        dates = pd.to_datetime(values, errors="coerce")
        numbers = (dates - dates.groupby(subjects).transform("min")).dt.days.astype(float)
    else:
        numbers = numbers - numbers.groupby(subjects).transform("min")
    return numbers.fillna(0).round().astype(int)


def _label(value: Any, name: str, bounds: tuple[float, float]) -> float:
    if value is None or str(value).strip() == "":
        return np.nan
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"label {name}={value!r} is not a number") from None
    if not bounds[0] <= number <= bounds[1] or number != int(number):
        raise ValueError(f"label {name}={value!r} out of range (whole numbers {bounds[0]:g}-{bounds[1]:g})")
    return number


def check_rows(table: pd.DataFrame, base: Path, spec: CropTableSpec) -> tuple[pd.DataFrame, list[str]]:
    """Per row: the normalised fields, or the reason it cannot be used (everything but reading the image)."""
    missing = [spec.column(n) for n in REQUIRED if spec.column(n) not in table]
    missing += [spec.column(n) for n in spec.labels if spec.column(n) not in table]
    if missing:
        raise ValueError(f"the crop table has no column(s) {missing}; it has {list(table.columns)} "
                         "(map your names in cohort.crops.columns)")
    rows, reasons = [], []
    seen_path: dict[str, int] = {}
    seen_structure: dict[tuple[str, str, str], int] = {}
    for n, rec in enumerate(table.to_dict("records"), start=2):
        get = {name: rec.get(spec.column(name)) for name in FIELDS}
        row: dict[str, Any] = {"row": n, **get}
        reason = ""
        try:
            if not str(get["subject"] or "").strip():
                raise ValueError("missing identity: empty subject")
            kind = levels.structure_kind(get["structure"]) if get["structure"] else None
            level = levels.normalise_level(get["level"] or "", kind, spec.count_from, spec.first)
            row["kind"] = kind or ("disc" if "-" in level else "vertebra")
            row["level"] = level
            for name, bounds in spec.labels.items():
                value = _label(rec.get(spec.column(name)), name, bounds)
                row[name] = value if row["kind"] == "disc" else np.nan
            path = Path(str(get["path"] or ""))
            path = path if path.is_absolute() else base / path
            if not get["path"] or not path.is_file():
                raise ValueError("missing file")
            row["file"] = path
            resolved = str(path.resolve())
            if resolved in seen_path:
                raise ValueError(f"duplicated row: the same image as row {seen_path[resolved]}")
            study = str(get["study"] or "").strip()
            key = (str(get["subject"]), study, level)
            if key in seen_structure:
                raise ValueError(f"duplicated structure: the same subject, acquisition and level as row "
                                 f"{seen_structure[key]}")
            seen_path[resolved] = n
            seen_structure[key] = n
        except ValueError as err:  # LevelError is a ValueError
            reason = str(err)
        rows.append(row)
        reasons.append(reason)
    return pd.DataFrame(rows), reasons


def ingest_crops(table_path: Path, out: CropOutputs, key: bytes, spec: CropTableSpec) -> dict[str, Any]:
    table = read_table(table_path)
    rows, reasons = check_rows(table, table_path.parent, spec)
    tokens = pn.identity_tokens(str(s) for s in rows.subject.dropna())
    out.crops.mkdir(parents=True, exist_ok=True)
    rows["subject"] = rows.subject.fillna("").astype(str)
    rows["study"] = rows.study.fillna("").astype(str).str.strip()
    rows["days"] = _days(rows.time, rows.subject) if "time" in rows and rows.time.notna().any() else 0
    files, crops = [], []
    for i, rec in enumerate(rows.to_dict("records")):
        name = pn.scrub_path(str(rec["path"] or ""), tokens) if rec["path"] else ""
        entry = {"file": f"row {rec['row']}: {name}", "status": QUARANTINED, "reason": reasons[i], "series": ""}
        files.append(entry)
        if reasons[i]:
            continue
        try:
            image = read_image(rec["file"], spec.slice_axis)
        except ValueError as err:
            entry["reason"] = pn.scrub(str(err), tokens)
            continue
        acquisition = f"{rec['subject']}|{rec['study']}"
        scan_id = pn.series_id(key, acquisition)
        crop_id = f"{scan_id}-{rec['level']}"
        np.save(out.crops / f"{crop_id}.npy", image)
        entry.update(status=USED, reason=f"crop {crop_id}", series=scan_id)
        crops.append({"crop_id": crop_id, "scan_id": scan_id, "subject_id": pn.subject_id(key, rec["subject"]),
                      "study_id": pn.study_id(key, acquisition), "days_since_first_study": int(rec["days"]),
                      "kind": rec["kind"], "level": rec["level"], "file": f"crops/{crop_id}.npy",
                      "slices": image.shape[0], "height": image.shape[1], "width": image.shape[2],
                      "dimensions": 2 if image.shape[0] == 1 else 3,
                      "_row": i})
    crop_table = pd.DataFrame(crops, columns=CROP_COLUMNS + ["_row"])
    used = rows.iloc[crop_table["_row"].to_numpy()] if len(crop_table) else rows.iloc[:0]
    crop_table = crop_table.drop(columns="_row")
    accounting = pd.DataFrame(files, columns=["file", "status", "reason", "series"])
    write_table(crop_table, out.crop_table)
    write_table(accounting, out.files)
    write_table(manifest_of(crop_table, used), out.manifest)
    write_table(pd.DataFrame({"series": sorted(set(crop_table.scan_id)), "reasons": ""}), out.series, parquet=False)
    gradings = gradings_of(crop_table, used, list(spec.labels))
    subjects = subjects_of(crop_table, used, key)
    write_table(gradings, out.gradings)
    write_table(subjects, out.subjects)
    counts = accounting.status.value_counts().to_dict()
    reasons_used = accounting[accounting.status == QUARANTINED].reason.str.split(":").str[0]
    summary = {"files": len(accounting), "used": counts.get(USED, 0), "skipped": 0,
               "quarantined": counts.get(QUARANTINED, 0), "volumes": int(crop_table.scan_id.nunique()),
               "crops": len(crop_table), "crops_2d": int((crop_table.dimensions == 2).sum()),
               "subjects": int(crop_table.subject_id.nunique()), "studies": int(crop_table.study_id.nunique()),
               "with_label_map": 0, "tables": {"gradings": len(gradings), "subjects": len(subjects)},
               "quarantine_reasons": {r: int(n) for r, n in reasons_used.value_counts().items()}}
    summary["labelled_discs_without_both_bodies"] = discs_without_bodies(crop_table, gradings)
    assert summary["used"] + summary["quarantined"] == summary["files"] == len(table)
    out.summary.parent.mkdir(parents=True, exist_ok=True)
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(files)d table rows: %(used)d crops used (%(crops_2d)d 2D) in %(volumes)d acquisitions of "
             "%(subjects)d subjects, %(quarantined)d quarantined (see files.csv)", summary)
    if summary["labelled_discs_without_both_bodies"]:
        log.warning("%d labelled disc(s) lack the crop of a vertebral body above or below them in their acquisition: "
                    "the disc tasks read the disc crop itself (probes.disc_input: disc), but with disc_input: bodies "
                    "they see a disc through its two bodies and will leave these out",
                    summary["labelled_discs_without_both_bodies"])
    if not len(crop_table):
        raise RuntimeError(f"no crop could be read from the {len(accounting)} rows of {table_path}")
    return summary


def discs_without_bodies(crops: pd.DataFrame, gradings: pd.DataFrame) -> int:
    """Labelled discs whose acquisition lacks the body above or below them."""
    bodies = set(zip(crops.study_id, crops.level))
    return sum((study, level.split("-")[0]) not in bodies or (study, level.split("-")[1]) not in bodies
               for study, level in zip(gradings.study_id, gradings.level))


def manifest_of(crops: pd.DataFrame, used: pd.DataFrame) -> pd.DataFrame:
    """One row per acquisition ("scan"), in the ingest manifest's columns (scanner fields unknown)."""
    frame = crops.assign(sex=used["sex"].fillna("").to_numpy(),
                         age=pd.to_numeric(used["age"], errors="coerce").to_numpy())
    scans = frame.groupby("scan_id", sort=True).agg(
        subject_id=("subject_id", "first"), study_id=("study_id", "first"),
        days_since_first_study=("days_since_first_study", "min"), sex=("sex", "first"), age_years=("age", "first"),
        n_source_files=("crop_id", "size")).reset_index()
    scans["age_years"] = scans.age_years.clip(upper=pn.MAX_AGE)
    scans["modality"] = "MR"
    scans["candidate_rank"] = 0
    for column in ("volume", "label_map", "label_problem", "manufacturer", "model", "series_description"):
        scans[column] = ""
    return scans.reindex(columns=MANIFEST_COLUMNS)


def gradings_of(crops: pd.DataFrame, used: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per disc crop with a label: subject_id, study_id, level and the label columns."""
    frame = crops[["subject_id", "study_id", "level"]].copy()
    for name in labels:
        frame[name] = used[name].to_numpy() if name in used else np.nan
    has_label = frame[labels].notna().any(axis=1).to_numpy() if labels else np.zeros(len(frame), bool)
    labelled = (crops.kind == "disc").to_numpy() & has_label
    return frame[labelled].reset_index(drop=True)


def subjects_of(crops: pd.DataFrame, used: pd.DataFrame, key: bytes) -> pd.DataFrame:
    """One row per subject: family (pseudonymised; the subject's own when not given), sex, age at the first study."""
    frame = pd.DataFrame({"subject_id": crops.subject_id.to_numpy(), "days": crops.days_since_first_study.to_numpy(),
                          "family": used["family"].to_numpy(), "sex": used["sex"].fillna("").to_numpy(),
                          "age": pd.to_numeric(used["age"], errors="coerce").to_numpy()})
    frame = frame.sort_values(["subject_id", "days"])
    out = frame.groupby("subject_id", sort=True).agg(family=("family", "first"), sex=("sex", "first"),
                                                     age=("age", "first")).reset_index()
    out["family_id"] = [pn.family_id(key, str(f)) if f is not None and str(f).strip() else pn.family_id(key, s)
                        for f, s in zip(out.family, out.subject_id)]
    out["age_years"] = out.age.clip(upper=pn.MAX_AGE)
    return out[["subject_id", "family_id", "sex", "age_years"]]


def parse_pairs(values: list[str], what: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, other = value.partition("=")
        if not sep or not name or not other:
            parser.error(f"{what} {value!r}: expected NAME=VALUE")
        pairs[name] = other
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest_crops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=cli.existing_file, required=True, help="CSV or Parquet, one row per image.")
    pn.add_key_option(parser)
    parser.add_argument("--column", action="append", default=[], metavar="OURS=YOURS",
                        help=f"Name of one of our columns in your table (ours: {', '.join(FIELDS)}, label names).")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=MIN:MAX",
                        help="A label column and its allowed range of whole numbers, e.g. pfirrmann=1:5.")
    parser.add_argument("--level-count-from", choices=levels.NUMBERINGS, default="top",
                        help="Numeric levels count from the top (1 = T12) or from the sacrum (1 = L5) (default: top).")
    parser.add_argument("--level-first", choices=levels.VERTEBRAE, default=None,
                        help="The vertebra numbered 1 (default: T12 from the top, L5 from the sacrum).")
    parser.add_argument("--slice-axis", default="auto",
                        help="Axis of a 3D image (as loaded) that runs across slices: 0, 1, 2, or auto = the shortest.")
    cli.add_output_options(parser, CROP_OUTPUTS)
    cli.add_log_option(parser)
    return parser


def spec_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> CropTableSpec:
    columns = parse_pairs(args.column, "--column", parser)
    unknown = set(columns) - set(FIELDS) - {n.partition("=")[0] for n in args.label}
    if unknown:
        parser.error(f"--column names unknown field(s) {sorted(unknown)}; ours are {', '.join(FIELDS)} and the labels")
    labels = {}
    for name, bounds in parse_pairs(args.label, "--label", parser).items():
        low, sep, high = bounds.partition(":")
        try:
            labels[name] = (float(low), float(high))
        except ValueError:
            parser.error(f"--label {name}={bounds}: expected MIN:MAX numbers")
        if not sep or labels[name][0] > labels[name][1]:
            parser.error(f"--label {name}={bounds}: expected MIN:MAX with MIN <= MAX")
    if args.slice_axis not in ("auto", "0", "1", "2"):
        parser.error(f"--slice-axis {args.slice_axis}: expected 0, 1, 2 or auto")
    return CropTableSpec(columns=columns, labels=labels, count_from=args.level_count_from, first=args.level_first,
                         slice_axis=None if args.slice_axis == "auto" else int(args.slice_axis))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = spec_from_args(args, parser)
    key = pn.key_from_args(args, parser)
    out = CropOutputs(**cli.outputs_from_args(args, parser, CROP_OUTPUTS))
    cli.setup_logging(args.log, "ingest_crops")
    try:
        ingest_crops(args.table, out, key, spec)
    except (RuntimeError, ValueError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
