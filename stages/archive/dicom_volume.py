"""Second pass: turn the files of one selected series into a volume with its full geometry.

A slice is a single-frame file or one frame of an enhanced (multi-frame) file (:func:`stages.archive.dicom_index.
slices_of`), and both are treated alike: the same slices as single-frame files or as the frames of one enhanced object
give the same volume, voxel for voxel and in geometry. Slices are ordered by their position along the slice normal
(never by InstanceNumber or frame number). The series must have one orientation, one matrix and one pixel spacing; its
ImageOrientationPatient must be orthonormal: row and column of unit length and at right angles, each within
ORTHONORMAL_TOL = 1e-3 (0.06 degrees). A DS written to four decimals stays within it, so a worse one is a broken
header, not rounding, which NIfTI's writer would coerce to a rotation with no more than a warning. Slices at the same
position are duplicates (dropped when their pixels are identical, fatal otherwise); a gap larger than 1.5 spacings is
a missing slice. The geometry follows SimpleITK's ImageSeriesReader: origin at the first slice, direction columns
(row, column, normal), slice spacing from the positions (not SliceThickness), voxels after the modality LUT
(RescaleSlope/Intercept, per frame for an enhanced object). The row and column written are the orthonormal pair
nearest the header's (they differ by less than the tolerance), so that the NIfTI writer has nothing to coerce. A
series of one slice (``min_slices`` 1) takes its slice spacing from SpacingBetweenSlices, as SimpleITK reads one file,
else SliceThickness, else DEFAULT_SLICE_SPACING_MM (SimpleITK's 1 mm) with a note on the file.

Pixels of uncompressed (little endian) files are read at the offset the header walk finds
(:func:`stages.archive.dicom_index.scan_header`) and decoded by pydicom's own decoder with the options pydicom takes
from the dataset, so they equal ``Dataset.pixel_array``; other files go through ``pydicom.dcmread``, which parses
the whole file again: 0.2 ms a slice instead of 0.5 ms on the benchmark archives (issue 20). An enhanced file is
decoded whole, once, the same way.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stages.archive.dicom_index import scan_header, slices_of

ORIENTATION_TOL = 1e-4  # the largest difference between the orientations of the slices of one series
ORTHONORMAL_TOL = 1e-3  # the largest departure of the row and column from unit length and from a right angle
DEFAULT_SLICE_SPACING_MM = 1.0  # a single slice without SpacingBetweenSlices or SliceThickness (as SimpleITK)
SPACING_REL_TOL = 0.01
# What decoding needs: the Image Pixel module (as pydicom.pixels.utils.as_pixel_options reads it) and the rescale.
PIXEL_TAGS = frozenset({0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011, 0x00280100,
                        0x00280101, 0x00280103, 0x00281052, 0x00281053})


class SeriesError(ValueError):
    """The series cannot become a volume; ``files`` maps the files to blame to their own reason."""

    def __init__(self, message: str, files: dict[str, str] | None = None):
        super().__init__(message)
        self.files = files or {}


@dataclass
class Volume:
    array: np.ndarray  # (slices, rows, cols)
    origin: np.ndarray  # (3,) LPS mm
    spacing: np.ndarray  # (3,) col, row, slice spacing, mm
    direction: np.ndarray  # (3, 3) columns: row dir, col dir, normal
    used: list[str]  # paths of the files in the volume, in the order of their first slice
    dropped: dict[str, str]  # path -> why it was left out (duplicates)
    notes: dict[str, str] = field(default_factory=dict)  # path of a used file -> what to know (frames left out...)

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetOrigin(tuple(float(x) for x in self.origin))
        image.SetSpacing(tuple(float(x) for x in self.spacing))
        image.SetDirection(tuple(float(x) for x in self.direction.ravel()))
        return image


def _name(image: dict[str, Any]) -> str:
    """How a reason names one slice: its file, or its frame of an enhanced file (counted from 1, as DICOM does)."""
    return image["path"] if image.get("frame") is None else f"frame {image['frame'] + 1} of {image['path']}"


def orientation_problem(iop: list[float]) -> str | None:
    """Why an ImageOrientationPatient is not orthonormal within ORTHONORMAL_TOL; None when it is."""
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    lengths, dot = (float(np.linalg.norm(row)), float(np.linalg.norm(col))), float(row @ col)
    if max(abs(lengths[0] - 1), abs(lengths[1] - 1), abs(dot)) <= ORTHONORMAL_TOL:
        return None
    return (f"ImageOrientationPatient not orthonormal: row length {lengths[0]:.4f}, column length {lengths[1]:.4f}, "
            f"row . column {dot:.4f} (tolerance {ORTHONORMAL_TOL:g})")


def orthonormal_axes(iop: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and normal: the orthonormal pair nearest the header's row and column (the polar factor of the
    3 x 2 matrix [row column], which moves neither more than the other), and their cross product."""
    u, _, vt = np.linalg.svd(np.column_stack([iop[:3], iop[3:]]), full_matrices=False)
    pair = u @ vt
    return pair[:, 0], pair[:, 1], np.cross(pair[:, 0], pair[:, 1])


def order_slices(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Check one orthonormal orientation, one matrix and one pixel spacing; return the slices (records of
    single-frame files and frames, :func:`stages.archive.dicom_index.slices_of`) sorted along the normal, their
    positions along it, and the normal."""
    first = records[0]
    for key in ("iop", "ipp", "pixel_spacing"):
        missing = [r for r in records if r[key] is None]
        if missing:
            raise SeriesError(f"{len(missing)} image(s) without {key.upper()}",
                              {r["path"]: f"no {key.upper()}" + ("" if r.get("frame") is None else
                                                                  f" (frame {r['frame'] + 1})") for r in missing})
    bad = {r["path"]: problem for r in records if (problem := orientation_problem(r["iop"]))}
    if bad:
        raise SeriesError(next(iter(bad.values())), bad)
    iop = np.array(first["iop"])
    for r in records:
        if np.abs(np.array(r["iop"]) - iop).max() > ORIENTATION_TOL:
            raise SeriesError("inconsistent geometry: slices with different orientations in one series")
        if (r["rows"], r["cols"]) != (first["rows"], first["cols"]):
            raise SeriesError("inconsistent geometry: slices with different matrix sizes in one series")
        if np.abs(np.array(r["pixel_spacing"]) - first["pixel_spacing"]).max() > 1e-4:
            raise SeriesError("inconsistent geometry: slices with different pixel spacing in one series")
    normal = orthonormal_axes(first["iop"])[2]
    position = np.array([np.dot(r["ipp"], normal) for r in records])
    frame = np.array([-1 if r.get("frame") is None else r["frame"] for r in records])
    order = np.lexsort((frame, np.array([r["path"] for r in records]), position))
    return [records[i] for i in order], position[order], normal


def _read_pixels(path: str) -> tuple[np.ndarray, Dataset]:
    """The pixel array of one file and a dataset that holds at least its Image Pixel module and rescale."""
    scan = scan_header(Path(path), PIXEL_TAGS)
    if scan is None or scan.transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = pydicom.dcmread(path)
        return ds.pixel_array, ds
    ds = Dataset({raw.tag: raw for raw in scan.elements.values()})
    with open(path, "rb") as handle:
        handle.seek(scan.pixel_data.value_tell)
        data = handle.read(scan.pixel_data.length)
    # As Dataset.pixel_array decodes (pydicom.pixels.utils.pixel_array), from the buffer instead of the dataset.
    pixels, _ = get_decoder(scan.transfer_syntax).as_array(data, validate=True, raw=False, decoding_plugin="",
                                                            pixel_keyword="PixelData", **as_pixel_options(ds))
    return pixels, ds


def decode_slice(path: str) -> tuple[np.ndarray, float, float]:
    """The pixels of one single-frame greyscale file (as ``Dataset.pixel_array``), its RescaleSlope and Intercept."""
    pixels, ds = _read_pixels(path)
    if pixels.ndim != 2:
        raise SeriesError(f"pixel data of shape {pixels.shape}; a single-frame greyscale image is needed",
                          {path: f"not a single-frame greyscale image (shape {pixels.shape})"})
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels, slope, intercept


def decode_frames(path: str) -> np.ndarray:
    """The frames of one enhanced greyscale file (frames, rows, cols), as ``Dataset.pixel_array``; their rescale is
    per frame (``slope`` and ``intercept`` of :func:`stages.archive.dicom_index.frame_geometry`)."""
    pixels, ds = _read_pixels(path)
    shape = (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns))
    if int(ds.get("SamplesPerPixel") or 1) != 1 or pixels.size != np.prod(shape) or pixels.shape[-2:] != shape[1:]:
        raise SeriesError(f"pixel data of shape {pixels.shape}; {shape[0]} greyscale frame(s) are needed",
                          {path: f"not a multi-frame greyscale image (shape {pixels.shape})"})
    return pixels.reshape(shape)


def assemble(records: list[dict[str, Any]], min_slices: int = 2) -> Volume:
    """The volume of one series (its files' header records), with at least ``min_slices`` distinct slice positions.
    Raises :class:`SeriesError` saying why not."""
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    ordered, position, _ = order_slices(slices_of(records))
    # Slices at (nearly) the same position: identical pixels -> keep the first; otherwise the series is ambiguous.
    tol = 1e-3
    keep: list[int] = []
    left_out: list[tuple[dict[str, Any], str]] = []  # (slice, why)
    decoded: dict[int, tuple[np.ndarray, float, float]] = {}
    frames: dict[str, np.ndarray] = {}  # the decoded enhanced files

    def decode(image: dict[str, Any]) -> tuple[np.ndarray, float, float]:
        if image.get("frame") is None:
            return decode_slice(image["path"])
        if image["path"] not in frames:
            frames[image["path"]] = decode_frames(image["path"])
        return frames[image["path"]][image["frame"]], image["slope"], image["intercept"]

    def pixels(i: int) -> tuple[np.ndarray, float, float]:
        if i not in decoded:
            try:
                decoded[i] = decode(ordered[i])
            except SeriesError:
                raise
            except Exception as err:  # noqa: BLE001 - a decoder failure is a property of the file
                reason = f"undecodable pixel data ({ordered[i]['transfer_syntax'] or 'unknown transfer syntax'}): " \
                         f"{type(err).__name__}: {str(err)[:100]}"
                raise SeriesError("a slice could not be decoded", {ordered[i]["path"]: reason}) from err
        return decoded[i]

    for i in range(len(ordered)):
        if keep and abs(position[i] - position[keep[-1]]) < tol:
            a, b = pixels(keep[-1])[0], pixels(i)[0]
            if a.shape == b.shape and np.array_equal(a, b):
                left_out.append((ordered[i], f"same position and pixels as {_name(ordered[keep[-1]])}"))
                continue
            raise SeriesError(f"two different images at one position ({position[i]:.2f} mm along the normal)")
        keep.append(i)
    if len(keep) < min_slices:
        raise SeriesError(f"{len(keep)} distinct slice position(s), fewer than min_slices {min_slices}")
    used = list(dict.fromkeys(ordered[i]["path"] for i in keep))
    notes: dict[str, list[str]] = defaultdict(list)
    dropped: dict[str, str] = {}
    in_volume = set(used)
    for image, why in left_out:
        if image["path"] in in_volume:
            notes[image["path"]].append(f"frame {image['frame'] + 1} left out as a duplicate slice: {why}")
        elif image["path"] not in dropped:
            dropped[image["path"]] = "duplicate slice" + (
                "" if image.get("frame") is None else f" (frame {image['frame'] + 1})") + f": {why}"
    first = ordered[keep[0]]
    if len(keep) > 1:
        gaps = np.diff(position[keep])
        spacing = float(np.median(gaps))
        big = np.flatnonzero(gaps > 1.5 * spacing)
        if big.size:
            k = int(big[0])
            raise SeriesError(f"missing slice(s): a gap of {gaps[k]:.2f} mm after slice {k + 1} of {len(keep)} where "
                              f"the spacing is {spacing:.2f} mm")
        if np.abs(gaps - spacing).max() > SPACING_REL_TOL * spacing:
            raise SeriesError(f"non-uniform slice spacing: {gaps.min():.3f} to {gaps.max():.3f} mm")
        slice_spacing = (position[keep[-1]] - position[keep[0]]) / (len(keep) - 1)
    else:
        slice_spacing = next((v for v in (first.get("spacing_between"), first.get("slice_thickness"))
                              if v is not None and v > 0), None)
        if slice_spacing is None:
            slice_spacing = DEFAULT_SLICE_SPACING_MM
            notes[first["path"]].append(f"one slice without SpacingBetweenSlices or SliceThickness: slice spacing set "
                                        f"to {DEFAULT_SLICE_SPACING_MM:g} mm")
    slices = []
    rescaled = False
    for i in keep:
        data, slope, intercept = pixels(i)
        if slope != 1 or intercept != 0:
            rescaled = True
            data = data.astype(np.float64) * slope + intercept
        slices.append(data)
    array = np.stack(slices)
    if rescaled:
        if np.all(np.equal(np.mod(array, 1), 0)) and array.min() >= -32768 and array.max() <= 32767:
            array = array.astype(np.int16)
        else:
            array = array.astype(np.float32)
    row, col, normal = orthonormal_axes(first["iop"])
    ps = first["pixel_spacing"]
    return Volume(array=array, origin=np.array(first["ipp"]), spacing=np.array([ps[1], ps[0], slice_spacing]),
                  direction=np.column_stack([row, col, normal]), used=used, dropped=dropped,
                  notes={path: "; ".join(text) for path, text in notes.items()})


def split_blocks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The slices of a series (its files' header records; frames of an enhanced file each on their own) in blocks
    that can each become a volume: one orientation (within ORIENTATION_TOL) and, along its normal, no gap larger than
    1.5 times the smallest spacing of the block's orientation. An axial series angled to each disc holds one block
    per disc (a block per orientation), and parallel blocks at several levels are split at the gaps between them.
    Blocks are ordered from the patient's head down (the block centre's LPS z, descending). Raises
    :class:`SeriesError` for slices without geometry or with a non-orthonormal orientation."""
    images = slices_of(records)
    for key in ("iop", "ipp", "pixel_spacing"):
        missing = {r["path"]: f"no {key.upper()}" for r in images if r[key] is None}
        if missing:
            raise SeriesError(f"{len(missing)} image(s) without {key.upper()}", missing)
    bad = {r["path"]: problem for r in images if (problem := orientation_problem(r["iop"]))}
    if bad:
        raise SeriesError(next(iter(bad.values())), bad)
    groups: list[list[dict[str, Any]]] = []
    for image in images:
        home = next((g for g in groups if np.abs(np.array(g[0]["iop"]) - image["iop"]).max() <= ORIENTATION_TOL),
                    None)
        if home is None:
            groups.append([image])
        else:
            home.append(image)
    blocks = []
    for group in groups:
        normal = orthonormal_axes(group[0]["iop"])[2]
        position = np.array([np.dot(r["ipp"], normal) for r in group])
        order = np.argsort(position, kind="stable")
        gaps = np.diff(position[order])
        step = gaps[gaps > 1e-3].min() if (gaps > 1e-3).any() else 0.0
        start = 0
        for k, gap in enumerate(gaps, start=1):
            if step and gap > 1.5 * step:
                blocks.append([group[i] for i in order[start:k]])
                start = k
        blocks.append([group[i] for i in order[start:]])
    # Frames of an enhanced file travel as single-slice entries (their geometry and rescale already in the entry).
    blocks = [[{**r, "frame_geometry": None} for r in block] for block in blocks]
    return sorted(blocks, key=lambda b: -float(np.mean([r["ipp"][2] for r in b])))


def write_volume(volume: Volume, path: Path) -> None:
    """Write as NIfTI (or any format SimpleITK knows from the extension), atomically.

    A ``.nii.gz`` is SimpleITK's uncompressed NIfTI, gzipped by zlib with run-length matches only (Z_RLE): SimpleITK's
    own gzip ignores compressionLevel for NIfTI and took 2.2 x as long, the largest part of writing a volume (issue 20;
    160 x 160 x 15: 14 ms and 501 kB against 6 ms and 522 kB, where dcm2niix's level 6 gives 502 kB; 320 x 320 x 15:
    51 ms and 1.95 MB against 23 ms and 2.04 MB). Decompressed, the file is the same.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    if not path.name.endswith(".nii.gz"):
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
        tmp.replace(path)
        return
    plain = tmp.with_suffix("")  # .tmp-{name}.nii
    sitk.WriteImage(volume.to_sitk(), str(plain))
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)  # 16 + : the gzip container
    tmp.write_bytes(packer.compress(plain.read_bytes()) + packer.flush())
    plain.unlink()
    tmp.replace(path)
