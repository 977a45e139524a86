"""The lumbar region of a sagittal scan (T12 to S1), resampled to isotropic voxels: what MLSSCL (Cao et al. 2022)
cuts its axial, coronal and sagittal clips from (stages/lumbar_regions.py writes them for the cohort).

The region is a box of fixed physical size (``size_mm``: superior-inferior, anterior-posterior, left-right) in the
spine's own frame, centred half-way between the highest and the lowest vertebral body the localisation found (T12 and
S1 when both are there): its rows run down the line from the highest to the lowest body centre, its columns from
anterior to posterior (the mean of the bodies' anterior directions, made perpendicular to that line), its slices from
right to left (their cross product). Every voxel is ``spacing_mm`` wide in all three directions; its value is the
scan's, interpolated trilinearly in the scan's voxel grid (scipy's ``map_coordinates``, order 1: between two of the
thick sagittal slices, 3 to 4.5 mm apart, this is linear interpolation between them), and zero outside the scan.
Intensities are scaled as the extract stage scales its crops: the median of the vertebral bodies' median intensities
becomes 0.5 (stages/anatomy/crops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from stages.anatomy.crops import _vec, body_medians, normalise
from stages.anatomy.spine_structures import world_to_index
from stages.core import levels
from stages.core.config import section_config

TOO_FEW_BODIES = "fewer than two vertebral bodies localised: no spine axis for the lumbar region"


@dataclass(frozen=True)
class RegionConfig:
    """The ``regions`` section of the config (see its schema)."""

    spacing_mm: float = 3.0
    size_mm: tuple[float, float, float] = (240.0, 120.0, 60.0)

    def __post_init__(self) -> None:
        if not self.spacing_mm > 0 or len(self.size_mm) != 3 or min(self.size_mm) < self.spacing_mm:
            raise ValueError(f"regions need spacing_mm > 0 and three sizes of at least one voxel, got {self}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels along (superior-inferior, anterior-posterior, left-right)."""
        return tuple(int(round(s / self.spacing_mm)) for s in self.size_mm)  # type: ignore[return-value]

    @classmethod
    def from_config(cls, section: dict | None = None) -> RegionConfig:
        return section_config(cls, "regions", section)


@dataclass(frozen=True)
class RegionFrame:
    """Where a scan's lumbar region lies: its centre (LPS, mm), and its unit axes: ``down`` (rows), ``posterior``
    (columns) and ``lateral`` (slices)."""

    centre: np.ndarray
    down: np.ndarray
    posterior: np.ndarray
    lateral: np.ndarray
    top: str
    bottom: str


def lumbar_frame(structures: pd.DataFrame) -> RegionFrame | None:
    """The frame of the lumbar region from one scan's localised structures (columns ``kind``, ``level``, ``x``,
    ``y``, ``z``, ``ap_x`` ...); None with fewer than two vertebral bodies of T12 ... S1."""
    bodies = structures[(structures.kind == "vertebra") & structures.level.isin(levels.VERTEBRAE)]
    bodies = bodies.drop_duplicates("level").set_index("level").reindex(
        [lv for lv in levels.VERTEBRAE if lv in set(bodies.level)])
    if len(bodies) < 2:
        return None
    centres = bodies[["x", "y", "z"]].to_numpy(dtype=float)
    down = centres[-1] - centres[0]
    if not np.linalg.norm(down) > 0:
        return None
    down /= np.linalg.norm(down)
    anterior = np.mean([_vec(row, "ap") for row in bodies.itertuples()], axis=0)
    anterior -= (anterior @ down) * down
    if not np.linalg.norm(anterior) > 0:
        return None
    posterior = -anterior / np.linalg.norm(anterior)
    lateral = np.cross(down, posterior)
    return RegionFrame(centre=(centres[0] + centres[-1]) / 2, down=down, posterior=posterior, lateral=lateral,
                       top=str(bodies.index[0]), bottom=str(bodies.index[-1]))


def region_points(frame: RegionFrame, shape: tuple[int, int, int], spacing_mm: float) -> np.ndarray:
    """``(*shape, 3)`` LPS points of the region's voxel centres: ``spacing_mm`` apart along each of the frame's axes,
    centred on the frame's centre."""
    axes = [(np.arange(n) - (n - 1) / 2) * spacing_mm for n in shape]
    r, c, s = np.meshgrid(*axes, indexing="ij")
    return (frame.centre + r[..., None] * frame.down + c[..., None] * frame.posterior
            + s[..., None] * frame.lateral)


def resample_region(volume: np.ndarray, image: sitk.Image, frame: RegionFrame, cfg: RegionConfig,
                    order: int = 1) -> np.ndarray:
    """The scan's values (``volume``, the (k, j, i) array of ``image``) on the region's isotropic grid
    ``(SI, AP, LR)``: trilinear (``order`` 1; 0: the nearest voxel's, for a label map), zero outside the scan."""
    points = region_points(frame, cfg.shape, cfg.spacing_mm)
    ijk = world_to_index(image, points.reshape(-1, 3))
    values = map_coordinates(volume, [ijk[:, 2], ijk[:, 1], ijk[:, 0]], order=order, cval=0.0, mode="constant")
    return values.reshape(cfg.shape).astype(np.float32)


def region_labels(label_map: sitk.Image, frame: RegionFrame, cfg: RegionConfig) -> np.ndarray:
    """A label map (the scan's, VerSe numbering) on the region's grid, uint8 ``cfg.shape``: each voxel the label of
    the nearest voxel of the map (0 outside it)."""
    array = sitk.GetArrayFromImage(label_map)
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise ValueError(f"label values outside 0-255 ({array.min()} to {array.max()}): not a VerSe-numbered map")
    return resample_region(array.astype(np.float32), label_map, frame, cfg, order=0).astype(np.uint8)


def lumbar_region(volume: np.ndarray, image: sitk.Image, structures: pd.DataFrame,
                  cfg: RegionConfig) -> tuple[np.ndarray, RegionFrame | None, str]:
    """One scan's lumbar region, float16 ``cfg.shape``, its frame and an empty flag; where there is none (fewer than
    two bodies, no body intensity to scale by), zeros, and the reason as the flag."""
    frame = lumbar_frame(structures)
    if frame is None:
        return np.zeros(cfg.shape, np.float16), None, TOO_FEW_BODIES
    medians = body_medians(volume, image, structures)
    reference = float(np.median(list(medians.values()))) if medians else float("nan")
    (region,), _, flag = normalise([resample_region(volume, image, frame, cfg)], reference)
    return region, frame, flag
