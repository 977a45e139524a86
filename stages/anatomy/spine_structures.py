"""Vertebral bodies and discs of one scan as a table: centre, spine axis, size, by level; and the checks on it.

A *structure table* has one row per structure with columns ``kind`` (vertebra / disc), ``level``, ``label``, the
centre in patient coordinates (``x, y, z``, LPS mm) and in voxels (``i, j, k``: column, row, slice), ``axis_*`` (unit
vector down the spine, in the slice plane), ``ap_*`` (unit vector to anterior, in the slice plane), and the extents
``height_mm`` (along the axis), ``depth_mm`` (antero-posterior) and ``width_mm`` (left-right, across slices).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.core import levels

COLUMNS = ["kind", "level", "label", "x", "y", "z", "i", "j", "k", "axis_x", "axis_y", "axis_z", "ap_x", "ap_y", "ap_z",
           "height_mm", "depth_mm", "width_mm", "n_voxels"]
ANTERIOR = np.array([0.0, -1.0, 0.0])  # LPS: +y is posterior


def slice_normal(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection()).reshape(3, 3)[:, 2]


def index_to_world(image: sitk.Image, index: np.ndarray) -> np.ndarray:
    """(N, 3) continuous (i, j, k) indices -> (N, 3) LPS points."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (np.asarray(index) * np.asarray(image.GetSpacing())) @ direction.T


def world_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ((np.asarray(points) - np.asarray(image.GetOrigin())) @ direction) / np.asarray(image.GetSpacing())


def in_plane_axes(centres: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spine axis (down, from neighbouring centres) and anterior direction at each of an ordered run of centres."""
    n = len(centres)
    axes = np.zeros((n, 3))
    for i in range(n):
        lo, hi = max(i - 1, 0), min(i + 1, n - 1)
        d = centres[hi] - centres[lo] if hi > lo else np.array([0.0, 0.0, -1.0])
        d = d - (d @ normal) * normal
        axes[i] = d / (np.linalg.norm(d) or 1.0)
    ap = np.cross(axes, normal)
    ap *= np.where(ap @ ANTERIOR < 0, -1.0, 1.0)[:, None]
    return axes, ap


def structures_from_label_map(label: sitk.Image) -> pd.DataFrame:
    """Every labelled body and disc of a label map (stages.core.levels numbering), with axes and extents."""
    array = sitk.GetArrayFromImage(label)  # (k, j, i)
    normal = slice_normal(label)
    rows = []
    for kind, names, labelmap in (("vertebra", levels.VERTEBRAE, levels.VERTEBRA_LABELS),
                                  ("disc", levels.DISCS, levels.DISC_LABELS)):
        for name in names:
            kji = np.argwhere(array == labelmap[name])
            if len(kji) == 0:
                continue
            ijk = kji[:, ::-1].astype(float)
            centre = ijk.mean(axis=0)
            rows.append({"kind": kind, "level": name, "label": labelmap[name], "centre_index": centre,
                         "points": index_to_world(label, ijk), "n_voxels": len(ijk)})
    out = []
    for kind in ("vertebra", "disc"):
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        centres = index_to_world(label, np.array([r["centre_index"] for r in group]))
        axes, ap = in_plane_axes(centres, normal)
        spacing = np.asarray(label.GetSpacing())
        for r, c, a, p in zip(group, centres, axes, ap):
            rel = r["points"] - c
            out.append({
                "kind": kind, "level": r["level"], "label": r["label"], "x": c[0], "y": c[1], "z": c[2],
                "i": r["centre_index"][0], "j": r["centre_index"][1], "k": r["centre_index"][2],
                "axis_x": a[0], "axis_y": a[1], "axis_z": a[2], "ap_x": p[0], "ap_y": p[1], "ap_z": p[2],
                "height_mm": float(np.ptp(rel @ a) + spacing[1]), "depth_mm": float(np.ptp(rel @ p) + spacing[0]),
                "width_mm": float(np.ptp(rel @ normal) + spacing[2]), "n_voxels": r["n_voxels"]})
    return pd.DataFrame(out, columns=COLUMNS)


def check_structures(table: pd.DataFrame, label_values: set[int] | None = None,
                     expected: Collection[str] | None = None) -> list[str]:
    """Reasons to doubt a scan's structures (empty when it looks right): missing levels, a transitional vertebra,
    levels out of order along the spine, implausible spacing, a disc not between its bodies. ``expected``: the levels
    that must be there (default all, T12 ... S1 and T12-L1 ... L5-S1); one left out is not reported missing (a label
    map whose scheme cannot name it: SPIDER's have no S1), and every other check is the same."""
    problems = []
    if label_values is not None and levels.TRANSITIONAL_L6 in label_values:
        problems.append("transitional vertebra: a sixth lumbar vertebra (label 25) is present")
    wanted = set(levels.VERTEBRAE + levels.DISCS) if expected is None else set(expected)
    for kind, names in (("vertebra", levels.VERTEBRAE), ("disc", levels.DISCS)):
        missing = [n for n in names if n in wanted and n not in set(table.level[table.kind == kind])]
        if missing:
            problems.append(f"missing {kind} level(s): {', '.join(missing)}")
    bodies = table[table.kind == "vertebra"].set_index("level").reindex(levels.VERTEBRAE).dropna(subset=["x"])
    if len(bodies) >= 2:
        centres = bodies[["x", "y", "z"]].to_numpy()
        steps = np.diff(centres, axis=0)
        down = centres[-1] - centres[0]
        down /= np.linalg.norm(down) or 1.0
        if np.any(steps @ down <= 0):
            problems.append("levels out of order along the spine")
        position = np.array([levels.VERTEBRAE.index(n) for n in bodies.index])
        adjacent = np.diff(position) == 1  # distances are judged between neighbouring levels only
        gaps = np.linalg.norm(steps, axis=1)[adjacent]
        if gaps.size and np.any((gaps < 15) | (gaps > 70)):
            problems.append(f"implausible distance between neighbouring bodies: {gaps.min():.0f}-{gaps.max():.0f} mm")
        for disc in table[table.kind == "disc"].itertuples():
            upper, lower = disc.level.split("-")
            if upper in bodies.index and lower in bodies.index:
                a, b = bodies.loc[upper, ["x", "y", "z"]].to_numpy(float), bodies.loc[lower, ["x", "y", "z"]].to_numpy(float)
                t = (np.array([disc.x, disc.y, disc.z]) - a) @ (b - a) / ((b - a) @ (b - a))
                if not 0.15 < t < 0.85:
                    problems.append(f"disc {disc.level} is not between its vertebrae")
    return problems
