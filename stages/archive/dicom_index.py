"""First pass over a DICOM archive: find every file, read headers only, and classify series.

:func:`read_header` never loads pixel data; it reads the tag and length of PixelData and checks that the file is long
enough to hold it, so truncated files are caught here. :func:`classify_series` decides plane (from
ImageOrientationPatient), modality, weighting (from EchoTime/RepetitionTime/InversionTime, with SeriesDescription as a
hint) and whether a series is a localizer, using :class:`ClassifyRules` from the config.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from stages.core.config import section_config

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
PIXEL_DATA = 0x7FE00010
PLANES = ("sagittal", "coronal", "axial")


def is_hidden(path: Path) -> bool:
    """Hidden files (``.DS_Store``, ``.snakemake_timestamp``...) are accounted for but never read as DICOM."""
    return path.name.startswith(".")


def walk(root: Path) -> list[Path]:
    """Every regular file below ``root``, whatever its name, in a stable (sorted) order. Symbolic links are followed."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(Path(folder) / f for f in sorted(files))
    return found


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def read_header(path: Path) -> dict[str, Any]:
    """Header fields of one file, or ``{"path", "problem"}`` saying why it cannot be used. Never raises."""
    record: dict[str, Any] = {"path": str(path), "problem": ""}
    if is_hidden(path):
        record.update(problem="hidden file (the name starts with a dot)", kind="hidden")
        return record
    try:
        size = path.stat().st_size
        ds = pydicom.dcmread(path, defer_size=256)
    except InvalidDicomError:
        record["problem"] = "not DICOM: no DICM marker after the 128-byte preamble"
        return record
    except Exception as err:  # noqa: BLE001 - any parse failure is a property of the file
        record["problem"] = f"unreadable DICOM header: {type(err).__name__}: {str(err)[:120]}"
        return record
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None))
    if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        record["problem"] = "DICOMDIR: a media index, not an image (files are found by walking the folder)"
        record["kind"] = "dicomdir"
        return record
    tsyntax = _text(meta.get("TransferSyntaxUID")) if meta else ""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None  # tag and length, not the value
    has_pixels = raw is not None
    truncated = False
    if has_pixels and getattr(raw, "length", None) not in (None, 0xFFFFFFFF) and hasattr(raw, "value_tell"):
        truncated = raw.value_tell + raw.length > size
    record.update({
        "size": size,
        "sop_uid": _text(ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)),
        "sop_class": sop_class,
        "transfer_syntax": tsyntax,
        "modality": _text(ds.get("Modality")).upper(),
        "patient_id": _text(ds.get("PatientID")),
        "patient_name": _text(ds.get("PatientName")),
        "birth_date": _text(ds.get("PatientBirthDate")),
        "accession": _text(ds.get("AccessionNumber")),
        "institution": _text(ds.get("InstitutionName")),
        "sex": _text(ds.get("PatientSex")).upper()[:1],
        "age": _text(ds.get("PatientAge")),
        "study_uid": _text(ds.get("StudyInstanceUID")),
        "series_uid": _text(ds.get("SeriesInstanceUID")),
        "frame_uid": _text(ds.get("FrameOfReferenceUID")),
        "study_time": _text(ds.get("StudyTime")),
        "study_date": _text(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate")
                            or ds.get("ContentDate")),
        "series_number": _float(ds.get("SeriesNumber")),
        "instance_number": _float(ds.get("InstanceNumber")),
        "series_description": _text(ds.get("SeriesDescription") or ds.get("ProtocolName")),
        "image_type": "\\".join(str(v) for v in (ds.get("ImageType") or [])).upper(),
        "manufacturer": _text(ds.get("Manufacturer")),
        "model": _text(ds.get("ManufacturerModelName")),
        "field_strength": _float(ds.get("MagneticFieldStrength")),
        "echo_time": _float(ds.get("EchoTime")),
        "repetition_time": _float(ds.get("RepetitionTime")),
        "inversion_time": _float(ds.get("InversionTime")),
        "iop": _floats(ds.get("ImageOrientationPatient"), 6),
        "ipp": _floats(ds.get("ImagePositionPatient"), 3),
        "pixel_spacing": _floats(ds.get("PixelSpacing"), 2),
        "slice_thickness": _float(ds.get("SliceThickness")),
        "rows": int(ds.get("Rows") or 0),
        "cols": int(ds.get("Columns") or 0),
        "frames": int(_float(ds.get("NumberOfFrames")) or 1),
        "samples": int(ds.get("SamplesPerPixel") or 1),
    })
    if not has_pixels:
        record["problem"] = "no pixel data (not an image object)"
    elif truncated:
        record["problem"] = f"truncated: pixel data needs {raw.value_tell + raw.length} bytes, the file has {size}"
    return record


def fill_missing_uids(record: dict[str, Any]) -> None:
    """Anonymisers sometimes blank the study and series UIDs. Group such files by what is left: the series by its
    folder, SeriesNumber, Modality and FrameOfReferenceUID; the study by PatientID, StudyDate and StudyTime (and the
    folder above the series' when PatientID is blank too). The record notes that it was done."""
    notes = []
    folder = str(Path(record["path"]).parent)
    if not record["series_uid"]:
        record["series_uid"] = "derived:" + "|".join(
            [folder, str(record["series_number"]), record["modality"], record["frame_uid"]])
        notes.append("no SeriesInstanceUID: grouped by folder, SeriesNumber, Modality and FrameOfReferenceUID")
    if not record["study_uid"]:
        parent = "" if record["patient_id"] else str(Path(folder).parent)
        record["study_uid"] = "derived:" + "|".join(
            [record["patient_id"], record["study_date"], record["study_time"], parent])
        notes.append("no StudyInstanceUID: grouped by PatientID, StudyDate and StudyTime")
    record["uid_note"] = "; ".join(notes)


@dataclass(frozen=True)
class ClassifyRules:
    """How series are classified and which are selected: the ``ingest`` section of the config (see its schema)."""

    modality: tuple[str, ...]
    plane: tuple[str, ...]
    weighting: tuple[str, ...]
    min_slices: int
    oblique_max_deg: float
    t1_max_te_ms: float
    t1_max_tr_ms: float
    t2_min_te_ms: float
    t2_min_tr_ms: float
    localizer_pattern: str
    hint_stir: str
    hint_flair: str
    hint_t2: str
    hint_t1: str
    hint_pd: str

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> ClassifyRules:
        """Validate a (partial) ``ingest`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "ingest", section)

    @property
    def description_hints(self) -> dict[str, str]:
        """Weighting -> pattern, in the order they are tried."""
        return {"STIR": self.hint_stir, "FLAIR": self.hint_flair, "T2": self.hint_t2, "T1": self.hint_t1,
                "PD": self.hint_pd}


def plane_of(iop: list[float] | None, oblique_max_deg: float) -> str:
    """sagittal / coronal / axial by the axis closest to the slice normal; oblique if it is further than the limit."""
    if iop is None:
        return "unknown"
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return "unknown"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if math.degrees(math.acos(min(1.0, normal[axis]))) > oblique_max_deg:
        return "oblique"
    return PLANES[axis]


def weighting_of(te: float | None, tr: float | None, ti: float | None, description: str,
                 rules: ClassifyRules) -> tuple[str, str]:
    """(weighting, how it was decided). Physics first (TE/TR/TI); the description decides only when physics cannot."""
    hint = next((w for w, pattern in rules.description_hints.items() if re.search(pattern, description, re.I)), None)
    if ti and ti > 0:
        if ti < 300:
            return "STIR", "TI"
        if ti > 1500:
            return "FLAIR", "TI"
    if te is not None and tr is not None:
        if te >= rules.t2_min_te_ms and tr >= rules.t2_min_tr_ms:
            return "T2", "TE/TR"
        if te <= rules.t1_max_te_ms and tr <= rules.t1_max_tr_ms:
            return "T1", "TE/TR"
        if te <= rules.t1_max_te_ms and tr >= rules.t2_min_tr_ms:
            return "PD", "TE/TR"
    if hint:
        return hint, "description"
    return "unknown", "none"


def classify_series(records: list[dict[str, Any]], rules: ClassifyRules) -> dict[str, Any]:
    """Classification of one series from its files' headers, and the reasons it does not meet the selection."""
    first = records[0]
    modalities = sorted({r["modality"] for r in records})
    planes = sorted({plane_of(r["iop"], rules.oblique_max_deg) for r in records})
    plane = planes[0] if len(planes) == 1 else "mixed"
    description = first["series_description"]
    localizer = "LOCALIZER" in first["image_type"] or bool(re.search(rules.localizer_pattern, description, re.I))
    modality = modalities[0] if len(modalities) == 1 else "mixed"
    if modality == "MR":
        weighting, source = weighting_of(first["echo_time"], first["repetition_time"], first["inversion_time"],
                                         description, rules)
    else:
        weighting, source = "n/a", "not MR"
    n_images = sum(r["frames"] for r in records)
    reasons = []
    if modality not in rules.modality:
        reasons.append(f"modality {modality or 'missing'} not in {list(rules.modality)}")
    if plane not in rules.plane:
        reasons.append(f"plane {plane} not in {list(rules.plane)}")
    if modality == "MR" and weighting not in rules.weighting:
        reasons.append(f"weighting {weighting} ({source}) not in {list(rules.weighting)}")
    if localizer:
        reasons.append("localizer")
    if any(r["frames"] > 1 for r in records):
        reasons.append("multi-frame (enhanced) objects are not supported")
    if n_images < rules.min_slices:
        reasons.append(f"{n_images} image(s), fewer than min_slices {rules.min_slices}")
    return {"modality": modality, "plane": plane, "weighting": weighting, "weighting_source": source,
            "localizer": localizer, "n_files": len(records), "description": description, "reasons": reasons}


def tie_break_key(records: list[dict[str, Any]]) -> tuple:
    """Order of preference among candidate series of one study (smallest first): more slices, finer in-plane pixels,
    the later series (a repeat after motion), then the SeriesInstanceUID so the choice is always the same."""
    spacing = records[0]["pixel_spacing"] or [math.inf, math.inf]
    return (-len(records), spacing[0] * spacing[1], -(records[0]["series_number"] or 0), records[0]["series_uid"])
