"""First pass over a DICOM archive: find every file, read headers only, and classify series.

:func:`read_header` never loads pixel data; it reads the tag and length of PixelData and checks that the file is long
enough to hold it, so truncated files are caught here. :func:`classify_series` decides plane (from
ImageOrientationPatient), modality, weighting (from EchoTime/RepetitionTime/InversionTime, with SeriesDescription as a
hint) and whether a series is a localizer, using :class:`ClassifyRules` from the config.

Headers are read by :func:`scan_header`, a walk over the raw elements of the common file (DICM preamble, a little
endian transfer syntax, defined-length pixel data) that keeps only the elements asked for, whose values pydicom's
converters then convert as a Dataset would; any other file (big endian, deflated, compressed pixel data, no preamble,
anything the walk finds unusual) goes to ``pydicom.dcmread``. Why: the header pass over every file was ingest's
largest phase, and two thirds of a header's time went to building a Dataset of every element and converting values
through it; a header now takes 0.2 ms instead of 0.6 ms on the benchmark archives (issue 20, bench_ingest.py).
tests/test_ingest.py checks that both paths give the same fields on pydicom's own test files and on odd variants.

Enhanced (multi-frame) objects, such as Enhanced MR Image Storage, hold a whole series in one file, its geometry in
functional groups (PerFrameFunctionalGroupsSequence, SharedFunctionalGroupsSequence) rather than at the top level.
Every multi-frame file, and every file without a top-level ImageOrientationPatient, is read by pydicom (they are few
and large); :func:`frame_geometry` reads each frame's position, orientation, pixel measures and rescale into the
record's ``frame_geometry``, and its echo and timing into the record's EchoTime, RepetitionTime and InversionTime.
:func:`slices_of` then gives one entry per image, whether single-frame files or frames, so that classification and
volume assembly treat both alike.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_value

from stages.core.config import section_config

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
PIXEL_DATA = 0x7FE00010
PLANES = ("sagittal", "coronal", "axial")
# The elements read_header converts, by keyword (SpecificCharacterSet decodes the text ones). None has an ambiguous
# VR ("US or SS"), which a Dataset would resolve from other elements.
HEADER_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "PatientName",
    "PatientBirthDate", "AccessionNumber", "InstitutionName", "PatientSex", "PatientAge", "StudyInstanceUID",
    "SeriesInstanceUID", "FrameOfReferenceUID", "StudyTime", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "SeriesNumber", "InstanceNumber", "SeriesDescription", "ProtocolName", "ImageType", "Manufacturer",
    "ManufacturerModelName", "MagneticFieldStrength", "EchoTime", "RepetitionTime", "InversionTime",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
)
HEADER_TAGS = frozenset(tag_for_keyword(k) for k in HEADER_KEYWORDS)
HEAD_BYTES = 16384  # the first read of a file: most headers fit (when one does not, the whole file is read)
CHARSET = 0x00080005
IOP = 0x00200037  # ImageOrientationPatient: an image without it at the top level may be an enhanced object
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # sequence delimiters
UNDEFINED = 0xFFFFFFFF
_VRS = {vr.value.encode(): str(vr.value) for vr in VR if len(vr.value) == 2}
_LONG_VRS = frozenset(EXPLICIT_VR_LENGTH_32)
_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")
_LENGTH = struct.Struct("<L")


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


def _first(value: Any) -> Any:
    """The first value of a multi-valued element (InversionTimes), the value itself otherwise."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


class _Short(Exception):
    """The walk needs bytes past the end of what was read."""


class _Unusual(Exception):
    """Something :func:`scan_header` leaves to pydicom (which knows every variant and its error message)."""


@dataclass(frozen=True)
class HeaderScan:
    """The wanted top-level elements of a DICOM file (before and after its pixel data), raw as pydicom reads them, and
    their values looked up by keyword as ``Dataset.get`` converts them (same converters, same character set)."""

    meta: dict[int, RawDataElement]
    elements: dict[int, RawDataElement]
    pixel_data: RawDataElement  # the tag, VR, length and value_tell of PixelData; its value is not read
    transfer_syntax: str
    size: int

    @functools.cached_property
    def encoding(self) -> str | list[str]:
        """The character set of the text values: what pydicom's read_dataset derives from SpecificCharacterSet."""
        raw = self.elements.get(CHARSET)
        return default_encoding if raw is None else convert_encodings(convert_raw_data_element(raw).value)

    def get(self, keyword: str) -> Any:
        """The value of a top-level element (None when absent), as ``Dataset.get(keyword)`` converts it: pydicom's
        converter for the VR (the dictionary's when the file's VR is implicit); its default hooks add nothing for
        these elements and took as long again."""
        raw = self.elements.get(tag_for_keyword(keyword))
        if raw is None:
            return None
        encoding = default_encoding if raw.tag == CHARSET else self.encoding
        try:
            return convert_value(raw.VR or dictionary_VR(raw.tag), raw, encoding)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert: its Dataset's error, raised the same way
            return convert_raw_data_element(raw, encoding=encoding).value

    def meta_get(self, keyword: str) -> Any:
        """The value of a file meta element (None when absent), as ``FileMetaDataset.get(keyword)`` converts it."""
        raw = self.meta.get(tag_for_keyword(keyword))
        return None if raw is None else convert_raw_data_element(raw, encoding=default_encoding).value


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR, length, position of the value) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Short
    if implicit:
        group, elem, length = _IMPLICIT.unpack_from(buf, pos)
        return group << 16 | elem, None, length, pos + 8
    group, elem, vr_bytes, length = _EXPLICIT.unpack_from(buf, pos)
    vr = _VRS.get(vr_bytes)
    if vr is None:  # pydicom guesses (implicit after all, or an unknown VR): its call
        raise _Unusual
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Short
        return group << 16 | elem, vr, _LENGTH.unpack_from(buf, pos + 8)[0], pos + 12
    return group << 16 | elem, vr, length, pos + 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """The position after the undefined-length sequence whose items start at ``pos``."""
    while True:
        if pos + 8 > len(buf):
            raise _Short
        group, elem, length = _IMPLICIT.unpack_from(buf, pos)
        tag, pos = group << 16 | elem, pos + 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Unusual
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            if pos + 8 > len(buf):
                raise _Short
            group, elem, _ = _IMPLICIT.unpack_from(buf, pos)
            if group == 0xFFFE:
                if group << 16 | elem != ITEM_END:
                    raise _Unusual
                pos += 8
                break
            _, _, length, pos = _element(buf, pos, implicit)
            pos = _skip_sequence(buf, pos, implicit) if length == UNDEFINED else pos + length


def _walk(buf: bytes, pos: int, implicit: bool, wanted: frozenset[int], found: dict[int, RawDataElement],
          stop_at_pixels: bool) -> tuple[int, RawDataElement | None]:
    """Walk top-level elements from ``pos`` to PixelData (``stop_at_pixels``) or the end of ``buf``, keeping the wanted
    ones in ``found``; returns the position reached and the PixelData element (value not read) if met."""
    while pos < len(buf):
        tag, vr, length, start = _element(buf, pos, implicit)
        group = tag >> 16
        if group in (0x0000, 0x0002, 0x0004, 0xFFFE) or (group == 0x7FE0 and tag != PIXEL_DATA):
            raise _Unusual  # command set, a second file meta, DICOMDIR records, delimiters, float pixel data
        if tag == PIXEL_DATA:
            if length == UNDEFINED or not stop_at_pixels:
                raise _Unusual  # encapsulated pixel data (pydicom scans it), or a second PixelData
            return start, RawDataElement(BaseTag(tag), vr, length, None, start, implicit, True)
        if length == UNDEFINED:  # a sequence, skipped (pydicom reads it; nothing wanted is in one)
            if vr is None and tag in DicomDictionary:
                vr = dictionary_VR(tag)
            if tag in wanted or (vr is not None and vr not in ("SQ", "UN")):
                raise _Unusual  # an undefined-length value that pydicom scans for its delimiter
            pos = _skip_sequence(buf, start, implicit)
            continue
        pos = start + length
        if tag in wanted:
            if vr == "UN" or pos > len(buf):  # UN: pydicom may look the VR up; a value past the end: truncated
                raise _Unusual if vr == "UN" else _Short
            found[tag] = RawDataElement(BaseTag(tag), vr, length, buf[start:pos], start, implicit, True)
    if pos > len(buf):
        raise _Short
    return pos, None


def _scan(path: Path, wanted: frozenset[int], head: int | None) -> HeaderScan:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        buf = handle.read(head) if head else handle.read()
        complete = len(buf) == size
        if buf[128:132] != b"DICM":
            raise _Unusual  # pydicom says why: no preamble, or not DICOM at all
        meta: dict[int, RawDataElement] = {}
        pos = 132
        while True:  # the file meta information: explicit VR little endian, group 0002
            if pos + 2 > len(buf):
                raise _Short
            if buf[pos:pos + 2] != b"\x02\x00":
                break
            tag, vr, length, start = _element(buf, pos, implicit=False)
            if length == UNDEFINED:
                raise _Unusual
            pos = start + length
            if pos > len(buf):
                raise _Short
            meta[tag] = RawDataElement(BaseTag(tag), vr, length, buf[start:pos], start, False, True)
        syntax_raw = meta.get(0x00020010)
        syntax = convert_raw_data_element(syntax_raw).value if syntax_raw else None
        if not syntax or syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, *PrivateTransferSyntaxes):
            raise _Unusual
        implicit = syntax == ImplicitVRLittleEndian
        vr_bytes = buf[pos + 4:pos + 6]
        if len(vr_bytes) < 2 or (not (0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B)) != implicit:
            raise _Unusual  # the dataset is not encoded as the transfer syntax says: pydicom switches, with a warning
        elements: dict[int, RawDataElement] = {}
        _, pixel_data = _walk(buf, pos, implicit, wanted, elements, stop_at_pixels=True)
        if pixel_data is None:
            if complete:
                raise _Unusual  # no pixel data: pydicom's reading says what else is there
            raise _Short
        end = pixel_data.value_tell + pixel_data.length
        if end < size:  # elements after the pixel data (trailing padding, private groups): pydicom reads them too
            handle.seek(end)
            _walk(handle.read(), 0, implicit, wanted, trailing := {}, stop_at_pixels=False)
            elements.update({tag: raw._replace(value_tell=raw.value_tell + end) for tag, raw in trailing.items()})
    return HeaderScan(meta=meta, elements=elements, pixel_data=pixel_data, transfer_syntax=str(syntax), size=size)


def scan_header(path: Path, wanted: frozenset[int] = HEADER_TAGS) -> HeaderScan | None:
    """The top-level elements ``wanted`` of a DICOM file with a little endian transfer syntax and defined-length pixel
    data, read without pydicom's Dataset; None for any other file, any file this walk finds unusual, and any file it
    cannot read (pydicom then reads it, and says what is wrong). Never raises."""
    try:
        try:
            return _scan(path, wanted, HEAD_BYTES)
        except _Short:
            return _scan(path, wanted, None)
    except Exception:  # noqa: BLE001 - _Short, _Unusual, OSError, or anything else: pydicom reads the file
        return None


def read_header(path: Path) -> dict[str, Any]:
    """Header fields of one file, or ``{"path", "problem"}`` saying why it cannot be used. Never raises."""
    record: dict[str, Any] = {"path": str(path), "problem": ""}
    if is_hidden(path):
        record.update(problem="hidden file (the name starts with a dot)", kind="hidden")
        return record
    scan = scan_header(path)
    if scan is not None and (IOP not in scan.elements or (_float(scan.get("NumberOfFrames")) or 1) > 1):
        scan = None  # multi-frame, or perhaps an enhanced object: pydicom reads its functional groups
    directory_records = False  # a DICOMDIR's directory records (scan_header leaves those files to pydicom)
    if scan is not None:
        size, get, meta_get, raw = scan.size, scan.get, scan.meta_get, scan.pixel_data
    else:
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
        get, meta_get = ds.get, (meta.get if meta else lambda keyword: None)
        directory_records = "DirectoryRecordSequence" in ds
        raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None  # tag and length, not value
    sop_class = _text(get("SOPClassUID") or meta_get("MediaStorageSOPClassUID"))
    if sop_class == DICOMDIR_CLASS or directory_records:
        record["problem"] = "DICOMDIR: a media index, not an image (files are found by walking the folder)"
        record["kind"] = "dicomdir"
        return record
    tsyntax = _text(meta_get("TransferSyntaxUID"))
    has_pixels = raw is not None
    functional_groups = scan is None and ("PerFrameFunctionalGroupsSequence" in ds
                                          or "SharedFunctionalGroupsSequence" in ds)
    truncated = False
    if has_pixels and getattr(raw, "length", None) not in (None, 0xFFFFFFFF) and hasattr(raw, "value_tell"):
        truncated = raw.value_tell + raw.length > size
    record.update({
        "size": size,
        "sop_uid": _text(get("SOPInstanceUID") or meta_get("MediaStorageSOPInstanceUID")),
        "sop_class": sop_class,
        "transfer_syntax": tsyntax,
        "modality": _text(get("Modality")).upper(),
        "patient_id": _text(get("PatientID")),
        "patient_name": _text(get("PatientName")),
        "birth_date": _text(get("PatientBirthDate")),
        "accession": _text(get("AccessionNumber")),
        "institution": _text(get("InstitutionName")),
        "sex": _text(get("PatientSex")).upper()[:1],
        "age": _text(get("PatientAge")),
        "study_uid": _text(get("StudyInstanceUID")),
        "series_uid": _text(get("SeriesInstanceUID")),
        "frame_uid": _text(get("FrameOfReferenceUID")),
        "study_time": _text(get("StudyTime")),
        "study_date": _text(get("StudyDate") or get("SeriesDate") or get("AcquisitionDate") or get("ContentDate")),
        "series_number": _float(get("SeriesNumber")),
        "instance_number": _float(get("InstanceNumber")),
        "series_description": _text(get("SeriesDescription") or get("ProtocolName")),
        "image_type": "\\".join(str(v) for v in (get("ImageType") or [])).upper(),
        "manufacturer": _text(get("Manufacturer")),
        "model": _text(get("ManufacturerModelName")),
        "field_strength": _float(get("MagneticFieldStrength")),
        "echo_time": _float(get("EchoTime")),
        "repetition_time": _float(get("RepetitionTime")),
        "inversion_time": _float(get("InversionTime")),
        "iop": _floats(get("ImageOrientationPatient"), 6),
        "ipp": _floats(get("ImagePositionPatient"), 3),
        "pixel_spacing": _floats(get("PixelSpacing"), 2),
        "slice_thickness": _float(get("SliceThickness")),
        "spacing_between": _float(get("SpacingBetweenSlices")),
        "rows": int(get("Rows") or 0),
        "cols": int(get("Columns") or 0),
        "frames": int(_float(get("NumberOfFrames")) or 1),
        "samples": int(get("SamplesPerPixel") or 1),
        "frame_geometry": None,
    })
    if functional_groups:
        try:
            _read_frames(ds, record)
        except Exception as err:  # noqa: BLE001 - malformed functional groups are a property of the file
            record["problem"] = f"unreadable functional groups: {type(err).__name__}: {str(err)[:120]}"
            return record
    if not has_pixels:
        record["problem"] = "no pixel data (not an image object)"
    elif truncated:
        record["problem"] = f"truncated: pixel data needs {raw.value_tell + raw.length} bytes, the file has {size}"
    return record


def _group_value(ds: Any, frame: Any, shared: Any, group: str, keyword: str) -> Any:
    """``keyword`` of the functional group ``group``: in the frame's groups, else the shared ones, else at the top
    level (where a legacy converted object may keep it); None when absent."""
    for source in (frame, shared):
        items = source.get(group) if source is not None else None
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def frame_geometry(ds: Any) -> list[dict[str, Any]]:
    """Per frame of an enhanced object (a pydicom Dataset with functional groups): ImagePositionPatient (``ipp``,
    PlanePositionSequence), ImageOrientationPatient (``iop``, PlaneOrientationSequence), PixelSpacing, SliceThickness
    and SpacingBetweenSlices (PixelMeasuresSequence), RescaleSlope and RescaleIntercept (``slope``, ``intercept``,
    PixelValueTransformationSequence; 1 and 0 when absent, as for a single-frame file). Raises ValueError when the
    per-frame groups do not match NumberOfFrames."""
    n = int(_float(ds.get("NumberOfFrames")) or 1)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    if per_frame and len(per_frame) != n:
        raise ValueError(f"{len(per_frame)} per-frame functional groups for NumberOfFrames {n}")
    out = []
    for k in range(n):
        value = functools.partial(_group_value, ds, per_frame[k] if per_frame else None, shared)
        out.append({
            "ipp": _floats(value("PlanePositionSequence", "ImagePositionPatient"), 3),
            "iop": _floats(value("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            "pixel_spacing": _floats(value("PixelMeasuresSequence", "PixelSpacing"), 2),
            "slice_thickness": _float(value("PixelMeasuresSequence", "SliceThickness")),
            "spacing_between": _float(value("PixelMeasuresSequence", "SpacingBetweenSlices")),
            "slope": _float(value("PixelValueTransformationSequence", "RescaleSlope")) or 1.0,
            "intercept": _float(value("PixelValueTransformationSequence", "RescaleIntercept")) or 0.0,
        })
    return out


def _read_frames(ds: Any, record: dict[str, Any]) -> None:
    """The functional groups of an enhanced object into its header record: ``frame_geometry``, the first frame's
    geometry where the top level has none, and EchoTime (EffectiveEchoTime, MREchoSequence), RepetitionTime
    (MRTimingAndRelatedParametersSequence) and InversionTime (the first InversionTimes, MRModifierSequence) where the
    top level has none."""
    frames = frame_geometry(ds)
    record["frame_geometry"] = frames
    for key in ("ipp", "iop", "pixel_spacing", "slice_thickness", "spacing_between"):
        if record[key] is None:
            record[key] = frames[0][key]
    first = (ds.get("PerFrameFunctionalGroupsSequence") or [None])[0]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    for key, group, keyword in (("echo_time", "MREchoSequence", "EffectiveEchoTime"),
                                ("repetition_time", "MRTimingAndRelatedParametersSequence", "RepetitionTime"),
                                ("inversion_time", "MRModifierSequence", "InversionTimes")):
        if record[key] is None:
            record[key] = _float(_first(_group_value(ds, first, shared, group, keyword)))


def slices_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per image of a series: the record of a single-frame file, or for each frame of an enhanced file its
    record with the frame's geometry and rescale (:func:`frame_geometry`) and ``frame``, its index (from 0)."""
    out = []
    for r in records:
        frames = r.get("frame_geometry")
        if frames:
            out.extend({**r, **g, "frame": k} for k, g in enumerate(frames))
        else:
            out.append(r)
    return out


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
    second_series: bool = False
    second_plane: tuple[str, ...] = ("axial",)
    second_weighting: tuple[str, ...] = ("T2",)

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
    return "unknown" if iop is None else _plane_of(tuple(iop), oblique_max_deg)


@functools.lru_cache(maxsize=2**12)
def _plane_of(iop: tuple[float, ...], oblique_max_deg: float) -> str:
    """:func:`plane_of` of one orientation, computed once (the slices of a series share it)."""
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
    """Classification of one series from its files' headers, the reasons it does not meet the selection
    (``reasons``), and those it cannot be a study's second series (``second_reasons``: ingest.second_series,
    second_plane and second_weighting; modality, localizer and frame geometry as for the selection; any number of
    slices)."""
    first = records[0]
    images = slices_of(records)
    modalities = sorted({r["modality"] for r in records})
    planes = sorted({plane_of(r["iop"], rules.oblique_max_deg) for r in images})
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
    if any(r["frames"] > 1 and not r.get("frame_geometry") for r in records):
        reasons.append("multi-frame object without per-frame geometry (no functional groups)")
    common = [r for r in reasons if not r.startswith(("plane ", "weighting ", f"{n_images} image(s)"))]
    second = common + ([] if plane in rules.second_plane else [f"plane {plane} not in {list(rules.second_plane)}"]) \
        + ([] if modality != "MR" or weighting in rules.second_weighting
           else [f"weighting {weighting} ({source}) not in {list(rules.second_weighting)}"])
    if n_images < rules.min_slices:
        reasons.append(f"{n_images} image(s), fewer than min_slices {rules.min_slices}")
    if not rules.second_series:
        second = ["no second series kept (ingest.second_series false)"]
    return {"modality": modality, "plane": plane, "weighting": weighting, "weighting_source": source,
            "localizer": localizer, "n_files": len(records), "description": description, "reasons": reasons,
            "second_reasons": second}


def second_preference(records: list[dict[str, Any]], weighting: str, rules: ClassifyRules) -> tuple:
    """Order of preference among the second-series candidates of one study (smallest first): the weighting listed
    first in ``second_weighting``, then as :func:`tie_break_key`."""
    rank = rules.second_weighting.index(weighting) if weighting in rules.second_weighting else len(
        rules.second_weighting)
    return (rank, *tie_break_key(records))


def tie_break_key(records: list[dict[str, Any]]) -> tuple:
    """Order of preference among candidate series of one study (smallest first): more slices (files or frames), finer
    in-plane pixels, the later series (a repeat after motion), then the SeriesInstanceUID so the choice is always the
    same."""
    spacing = records[0]["pixel_spacing"] or [math.inf, math.inf]
    return (-sum(r["frames"] for r in records), spacing[0] * spacing[1], -(records[0]["series_number"] or 0),
            records[0]["series_uid"])
