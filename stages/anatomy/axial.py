"""Axial slices of a scan's own axial series, assigned to the discs of its sagittal localisation (Hou et al. 2023).

A slice of the axial series is a plane: a point (its centre), a normal, and an extent (its field of view). A disc of
the localisation (stages.anatomy.spine_structures) is a centre and a plane too: the endplates are normal to the spine
axis there (``axis``, from the neighbouring vertebral body centres), so the disc plane's normal is that axis. A slice
goes through a disc when

* its distance to the disc centre (along the slice normal) is at most ``max_distance_mm``,
* the angle between its plane and the disc plane (between the two normals) is at most ``max_angle_deg``, and
* the disc centre, projected onto the slice plane, lies inside the slice's field of view;

of the discs it goes through, it is assigned to the nearest; a slice that goes through none (between two discs, or
angled too far) is assigned to none. The slices of a disc, ordered along the spine axis, are its stack; the three
central ones (:func:`central_three`: of 5, slices 2-4; of 4, slices 1-3; Hou et al.'s second sample of 4, 2-4, is not
taken) are cut around the disc centre (:func:`cut_slice`) with the axes and pixel size of the stack resliced from the
sagittal volume (stages.anatomy.crops.axial_stack): rows anterior to posterior, columns right to left, the disc's
antero-posterior depth spanning ``width_fraction`` of the width.

The disc's mask on a cut slice (:func:`cut_mask`) is its label map (on the sagittal volume's grid) sampled at the
world coordinates of the cut's pixels: the disc's indicator interpolated linearly, then >= 0.5 (as
stages/disc_masks.py cuts the sagittal crops); on the resliced stack (:func:`resliced_mask`) the indicator goes
through the same ``axial_stack`` call as the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from stages.anatomy.crops import axial_stack, sample_plane
from stages.anatomy.spine_structures import world_to_index
from stages.core.config import section_config

ASSIGNMENT_COLUMNS = ["scan_id", "study_id", "series", "block", "slice", "level", "distance_mm", "angle_deg",
                      "disc_row", "central"]
INDEX_COLUMNS = ["row", "scan_id", "level", "source", "n_slices", "series", "slices", "scale", "has_mask",
                 "second_sample"]
SOURCES = ("native", "resliced", "none")


@dataclass(frozen=True)
class AxialConfig:
    """The ``axial`` section of the config (see its schema)."""

    max_distance_mm: float
    max_angle_deg: float

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> AxialConfig:
        """Validate a (partial) ``axial`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "axial", section)


@dataclass(frozen=True)
class SlicePlane:
    """One slice: its centre (LPS mm), unit row and column directions, and half its extent along them (mm)."""

    centre: np.ndarray
    row: np.ndarray
    col: np.ndarray
    half_row_mm: float
    half_col_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)


def slice_planes(image: sitk.Image) -> list[SlicePlane]:
    """The planes of the slices of a volume (an axial block, as ingest writes a second series), in slice order."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, (cols, rows, n) = np.array(image.GetSpacing()), image.GetSize()
    origin = np.array(image.GetOrigin())
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    middle = origin + (cols - 1) / 2 * spacing[0] * row + (rows - 1) / 2 * spacing[1] * col
    return [SlicePlane(middle + k * spacing[2] * normal, row, col, cols * spacing[0] / 2, rows * spacing[1] / 2)
            for k in range(n)]


def plane_to_disc(plane: SlicePlane, centre: np.ndarray, axis: np.ndarray) -> tuple[float, float, bool]:
    """(distance of the disc centre from the slice plane in mm, angle between the slice and the disc plane in degrees,
    whether the disc centre projects inside the slice's field of view)."""
    normal = plane.normal / np.linalg.norm(plane.normal)
    offset = np.asarray(centre, float) - plane.centre
    distance = abs(float(offset @ normal))
    cosine = abs(float(normal @ axis)) / float(np.linalg.norm(axis))
    angle = float(np.degrees(np.arccos(min(1.0, cosine))))
    inside = abs(float(offset @ plane.row)) <= plane.half_row_mm and abs(float(offset @ plane.col)) <= plane.half_col_mm
    return distance, angle, inside


def assign_slices(planes: list[SlicePlane], discs: pd.DataFrame, cfg: AxialConfig) -> pd.DataFrame:
    """One row per plane: the disc level it goes through (``level``, "" for none; module docstring), and its
    ``distance_mm`` and ``angle_deg`` to that disc, or to the nearest disc (by distance) when it goes through none
    (NaN without discs). ``discs``: one row per disc, with level, x, y, z (centre, LPS mm) and axis_x, axis_y, axis_z
    (the spine axis there, the disc plane's normal)."""
    if cfg.max_distance_mm <= 0 or not 0 <= cfg.max_angle_deg <= 90:
        raise ValueError(f"max_distance_mm must be > 0 and max_angle_deg in [0, 90], got {cfg.max_distance_mm} and "
                         f"{cfg.max_angle_deg}")
    centres = discs[["x", "y", "z"]].to_numpy(float)
    axes = discs[["axis_x", "axis_y", "axis_z"]].to_numpy(float)
    rows = []
    for plane in planes:
        measured = [plane_to_disc(plane, c, a) for c, a in zip(centres, axes)]
        through = [i for i, (d, angle, inside) in enumerate(measured)
                   if d <= cfg.max_distance_mm and angle <= cfg.max_angle_deg and inside]
        pick = min(through, key=lambda i: measured[i][0]) if through else (
            min(range(len(measured)), key=lambda i: measured[i][0]) if measured else None)
        rows.append({"level": discs.level.iloc[pick] if through else "",
                     "distance_mm": measured[pick][0] if pick is not None else float("nan"),
                     "angle_deg": measured[pick][1] if pick is not None else float("nan")})
    return pd.DataFrame(rows, columns=["level", "distance_mm", "angle_deg"])


def central_three(n: int) -> slice:
    """The three central of ``n`` >= 3 slices ordered along the spine: of 5, slices 2-4; of 4, 1-3 (counting from 1)."""
    if n < 3:
        raise ValueError(f"three central slices need at least 3 slices, got {n}")
    start = (n - 3) // 2
    return slice(start, start + 3)


def slice_grid(image: sitk.Image, k: int, centre: np.ndarray, axis: np.ndarray,
               ap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the cut of slice ``k`` of a block volume (``image``) is centred, the disc centre projected onto the
    slice, and its row and column directions: anterior to posterior and right to left as the resliced stack has them
    (the disc's ``ap`` and ``axis`` x ``ap`` projected onto the slice plane)."""
    plane = slice_planes(image)[k]
    normal = plane.normal / np.linalg.norm(plane.normal)
    on_plane = np.asarray(centre, float) - float((np.asarray(centre, float) - plane.centre) @ normal) * normal
    down = -np.asarray(ap, float) + float(np.asarray(ap, float) @ normal) * normal
    down /= np.linalg.norm(down)
    across = np.cross(normal, down)
    if across @ np.cross(axis, ap) < 0:  # right to left, as the resliced stack
        across = -across
    return on_plane, down, across


def cut_slice(array: np.ndarray, image: sitk.Image, k: int, centre: np.ndarray, axis: np.ndarray, ap: np.ndarray,
              size: tuple[int, int], step: float) -> np.ndarray:
    """(Ha, Wa) image cut from slice ``k`` of a block volume (``array`` (slices, rows, cols) of ``image``), bilinear,
    zero outside, on the grid of :func:`slice_grid`, ``step`` mm apart."""
    on_plane, down, across = slice_grid(image, k, centre, axis, ap)
    rows, cols = size
    r = (np.arange(rows) - (rows - 1) / 2) * step
    c = (np.arange(cols) - (cols - 1) / 2) * step
    points = on_plane + r[:, None, None] * down + c[None, :, None] * across
    ijk = world_to_index(image, points.reshape(-1, 3))
    values = map_coordinates(np.asarray(array[k], np.float32), [ijk[:, 1], ijk[:, 0]], order=1, cval=0.0,
                             mode="constant")
    return values.reshape(rows, cols)


def cut_mask(indicator: np.ndarray, label: sitk.Image, image: sitk.Image, k: int, centre: np.ndarray,
             axis: np.ndarray, ap: np.ndarray, size: tuple[int, int], step: float) -> np.ndarray:
    """(Ha, Wa) uint8 mask on exactly the pixels of :func:`cut_slice` (the same arguments): ``indicator`` (a disc's
    indicator, (slices, rows, cols) on ``label``'s grid, the sagittal volume's) sampled at their world coordinates,
    trilinear, zero outside, then >= 0.5."""
    on_plane, down, across = slice_grid(image, k, centre, axis, ap)
    return (sample_plane(indicator, label, on_plane, down, across, size, step) >= 0.5).astype(np.uint8)


def resliced_mask(indicator: np.ndarray, label: sitk.Image, disc: Any, size: tuple[int, int], spacing_mm: float,
                  width_fraction: float) -> np.ndarray:
    """(3, Ha, Wa) uint8 mask on exactly the pixels of the disc's resliced stack: ``indicator`` (on ``label``'s grid,
    the sagittal volume's) through the ``axial_stack`` call extraction makes on the image, then >= 0.5."""
    return (axial_stack(indicator, label, disc, size, spacing_mm, width_fraction) >= 0.5).astype(np.uint8)


def match_intensity(native: np.ndarray, resliced: np.ndarray) -> float:
    """The factor that gives ``native`` (raw intensities) the median of ``resliced`` (the same disc's stack resliced
    from the sagittal volume, normalised by extraction, on the same grid) over the pixels both cover (the resliced
    stack is zero beyond the sagittal slab); NaN when they share none."""
    both = (native > 0) & (resliced > 0)
    if not both.any():
        return float("nan")
    reference = float(np.median(native[both]))
    return float(np.median(resliced[both])) / reference if reference > 0 else float("nan")
