"""Crop geometry shared by the extraction stages: the volumes of a structure cut from a scan along the spine's local
axes (Jamaludin et al. 2017, section 2.1), the neighbour-body intensity reference, the extraction config and the
columns of the extraction index (see stages/extract.py for the whole stage).

The index is also where extraction flags a volume: its ``flag`` column is empty for a usable volume and says why
otherwise (no intensity to normalise by, e.g. no vertebral body found around a disc); a flagged volume's slot in the
array holds zeros, never NaN, and the splits stage leaves it out of everything it writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from stages.anatomy.spine_structures import slice_normal, world_to_index
from stages.core import levels
from stages.core.config import section_config

INDEX_COLUMNS = ["array", "row", "scan_id", "subject_id", "study_id", "days_since_first_study", "source", "kind",
                 "level", "x", "y", "z", "step_mm", "scale", "flag"]
ARRAYS = ("vertebrae", "discs", "axial")


@dataclass(frozen=True)
class ExtractOutputs:
    """What an extraction stage writes: the three arrays and the index (Parquet, with a CSV copy beside it)."""

    vertebrae: Path
    discs: Path
    axial: Path
    index: Path

    @classmethod
    def in_folder(cls, folder: Path) -> ExtractOutputs:
        """The outputs laid out in one folder as the workflow lays out results/extract (and a shard its folder)."""
        return cls(**{name: folder / f"{name}.npy" for name in ARRAYS}, index=folder / "index.parquet")


EXTRACT_OUTPUTS = {
    "vertebrae": "Vertebral-body volumes, float16 (N, S, H, W).",
    "discs": "Disc volumes, float16 (N, S, Hd, W).",
    "axial": "Axial slices through each disc, float16 (N, 3, Ha, Wa).",
    "index": "One row per extracted volume (Parquet; a CSV copy beside it).",
}


@dataclass(frozen=True)
class ExtractConfig:
    """The ``extract`` section of the config (see its schema)."""

    vertebra_size: tuple[int, int, int]
    disc_size: tuple[int, int, int]
    axial_size: tuple[int, int]
    axial_spacing_mm: float
    width_fraction: float
    qc_scans: int

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> ExtractConfig:
        """Validate a (partial) ``extract`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "extract", section)


def _vec(row: Any, name: str) -> np.ndarray:
    return np.array([getattr(row, f"{name}_x"), getattr(row, f"{name}_y"), getattr(row, f"{name}_z")], dtype=float)


def sample_plane(volume: np.ndarray, image: sitk.Image, centre: np.ndarray, down: np.ndarray, across: np.ndarray,
                 shape: tuple[int, int], step: float) -> np.ndarray:
    """A rows x cols image sampled (trilinear, zero outside) on the plane through ``centre`` spanned by ``down``
    (rows) and ``across`` (columns), ``step`` mm apart."""
    rows, cols = shape
    r = (np.arange(rows) - (rows - 1) / 2) * step
    c = (np.arange(cols) - (cols - 1) / 2) * step
    points = centre + r[:, None, None] * down + c[None, :, None] * across
    ijk = world_to_index(image, points.reshape(-1, 3))
    values = map_coordinates(volume, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=1, cval=0.0, mode="constant")
    return values.reshape(rows, cols)


def crop(volume: np.ndarray, image: sitk.Image, structure: Any, size: tuple[int, int, int],
         width_fraction: float) -> tuple[np.ndarray, float]:
    """(S, H, W) crop of one structure and its pixel size (mm). Slices are the scan's own, centred on the structure's
    middle slice; beyond the scan they are zero."""
    height, width, n_slices = size
    step = structure.depth_mm / (width_fraction * width)
    spacing_z = image.GetSpacing()[2]
    normal = slice_normal(image)
    centre = np.array([structure.x, structure.y, structure.z])
    mid = int(np.rint(structure.k))
    out = np.zeros((n_slices, height, width), dtype=np.float32)
    for s in range(n_slices):
        k = mid + s - (n_slices - 1) // 2
        if 0 <= k < volume.shape[0]:
            on_slice = centre + (k - structure.k) * spacing_z * normal
            out[s] = sample_plane(volume, image, on_slice, _vec(structure, "axis"), -_vec(structure, "ap"),
                                  (height, width), step)
    return out, step


def axial_stack(volume: np.ndarray, image: sitk.Image, disc: Any, size: tuple[int, int], spacing_mm: float,
                width_fraction: float) -> np.ndarray:
    """(3, Ha, Wa): slices perpendicular to the spine through the disc centre and ``spacing_mm`` above and below;
    rows run anterior to posterior, columns right to left."""
    step = disc.depth_mm / (width_fraction * size[1])
    axis, ap = _vec(disc, "axis"), _vec(disc, "ap")
    lateral = np.cross(axis, ap)
    centre = np.array([disc.x, disc.y, disc.z])
    return np.stack([sample_plane(volume, image, centre + o * axis, -ap, lateral, size, step)
                     for o in (-spacing_mm, 0.0, spacing_mm)])


def body_medians(volume: np.ndarray, image: sitk.Image, structures: pd.DataFrame) -> dict[str, float]:
    """Median intensity of the central part of each vertebral body (middle 60% of height and depth, 3 slices)."""
    medians = {}
    for row in structures[structures.kind == "vertebra"].itertuples():
        core = row._replace(depth_mm=row.depth_mm * 0.6)
        box, _ = crop(volume, image, core, (9, 9, 3), 1.0)  # 9 x 9 samples over 60% of the depth, 3 slices
        values = box[box > 0]
        if values.size:
            medians[row.level] = float(np.median(values))
    return medians


def neighbour_reference(level: str, kind: str, medians: dict[str, float]) -> float:
    """The median intensity that must become 0.5: the vertebral bodies above and below (a disc's, or a body's
    neighbours) of those in ``medians``; at the ends of the column, or where a body is missing, the one there is (L5
    alone for L5-S1 in a label map without S1), else the body itself (a disc with neither: NaN, flagged)."""
    if kind == "disc":
        around = level.split("-")
    else:
        i = levels.VERTEBRAE.index(level)
        around = [levels.VERTEBRAE[j] for j in (i - 1, i + 1) if 0 <= j < len(levels.VERTEBRAE)]
    values = [medians[n] for n in around if np.isfinite(medians.get(n, np.nan))] or [medians.get(level, np.nan)]
    return float(np.median(values))


NO_REFERENCE = "no vertebral-body intensity to normalise by (no body found around the structure)"
NOT_FINITE = "intensities not finite after normalisation (reference intensity {reference:.3g})"


def normalise(volumes: list[np.ndarray], reference: float,
              missing: str = NO_REFERENCE) -> tuple[list[np.ndarray], float, str]:
    """The volumes of one structure (its crop; a disc's axial stack too) multiplied so that the intensity
    ``reference`` becomes 0.5, as float16, with the factor and an empty flag. Where that is undefined (no reference:
    NaN or not > 0: the flag is ``missing``) or not finite in float16, zeros of the same shapes, factor NaN, and the
    reason as the flag: a NaN never reaches the arrays."""
    if not (np.isfinite(reference) and reference > 0):
        return [np.zeros(v.shape, np.float16) for v in volumes], float("nan"), missing
    scale = 0.5 / reference
    with np.errstate(over="ignore"):  # an overflow becomes inf, caught below
        scaled = [(v * scale).astype(np.float16) for v in volumes]
    if not all(np.isfinite(v).all() for v in scaled):
        return ([np.zeros(v.shape, np.float16) for v in volumes], float("nan"),
                NOT_FINITE.format(reference=reference))
    return scaled, scale, ""
