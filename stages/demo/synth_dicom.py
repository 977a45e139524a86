"""Write synthetic images as DICOM files the way an MR scanner does: one file per slice, MR Image Storage.

Series geometry follows the DICOM patient coordinate system (LPS, mm): each slice has an ImagePositionPatient
(centre of its first pixel), the ImageOrientationPatient row and column directions, and PixelSpacing
(between rows, between columns).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1351.1"  # spine-ssl demo generator (pydicom's root)


_UID_NAMESPACE = uuid.UUID("6f1f6d0e-3b7a-4c57-9a43-5e0c1a2b9d11")


def uid(*parts: object) -> str:
    """A valid, deterministic DICOM UID derived from ``parts``: 2.25 followed by a name-based (v5) UUID as an integer.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry of one image: position of the first pixel, row/column directions, spacing and size."""

    position: np.ndarray  # (3,) ImagePositionPatient
    row_dir: np.ndarray  # (3,) direction of increasing column index
    col_dir: np.ndarray  # (3,) direction of increasing row index
    spacing: float  # square pixels, mm
    rows: int
    cols: int
    thickness: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def points(self, offset_mm: float = 0.0) -> np.ndarray:
        """World coordinates (rows * cols, 3) of every pixel centre, row-major, shifted along the normal."""
        i, j = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return (self.position + offset_mm * self.normal
                + (j.reshape(-1, 1) * self.spacing) * self.row_dir
                + (i.reshape(-1, 1) * self.spacing) * self.col_dir)


def plane_frame(normal: np.ndarray, row_hint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions of an image plane with the given normal, the row closest to ``row_hint``."""
    n = normal / np.linalg.norm(normal)
    row = row_hint - (row_hint @ n) * n
    row /= np.linalg.norm(row)
    return row, np.cross(n, row)


def stack(centre: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, n_slices: int, spacing_between: float,
          pixel: float, matrix: int, thickness: float) -> list[SliceGeometry]:
    """Parallel slices centred on ``centre``, in increasing position along the normal."""
    normal = np.cross(row_dir, col_dir)
    half = (matrix - 1) / 2 * pixel
    out = []
    for k in range(n_slices):
        c = centre + (k - (n_slices - 1) / 2) * spacing_between * normal
        out.append(SliceGeometry(c - half * row_dir - half * col_dir, row_dir, col_dir, pixel, matrix, matrix, thickness))
    return out


def _ds(value: float) -> str:
    """Decimal String with at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


def mr_dataset(header: dict[str, object], geometry: SliceGeometry, instance: int, sop_uid: str,
               pixels: np.ndarray | None) -> Dataset:
    """One MR Image Storage dataset. ``header`` holds patient/study/series attributes by keyword."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    for key, value in header.items():
        setattr(ds, key, value)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(x) for x in geometry.position]
    ds.ImageOrientationPatient = [_ds(x) for x in (*geometry.row_dir, *geometry.col_dir)]
    ds.PixelSpacing = [_ds(geometry.spacing), _ds(geometry.spacing)]
    ds.SliceThickness = _ds(geometry.thickness)
    ds.SliceLocation = _ds(float(geometry.position @ geometry.normal))
    ds.Rows, ds.Columns = geometry.rows, geometry.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels is not None:
        if pixels.shape != (geometry.rows, geometry.cols):
            raise ValueError(f"pixels have shape {pixels.shape}, geometry wants {(geometry.rows, geometry.cols)}")
        data = np.clip(np.rint(pixels), 0, 4095).astype("<u2")
        ds.WindowCenter = _ds(float(np.percentile(data, 60)))
        ds.WindowWidth = _ds(float(max(np.percentile(data, 99.5) - np.percentile(data, 1), 1)))
        ds.PixelData = data.tobytes()
    return ds


def write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def read_volume(paths: list[Path]) -> tuple[np.ndarray, list[Dataset]]:
    """Read one series' files, ordered along the slice normal: (slices, rows, cols) array and the headers."""
    datasets = [pydicom.dcmread(p) for p in paths]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.array(d.ImagePositionPatient, dtype=float) @ normal))
    return np.stack([d.pixel_array for d in datasets]), datasets
