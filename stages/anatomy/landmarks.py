"""Landmark tables: level centres given by the user (challenge sets ship them), standing in for the localiser.

A landmark table (CSV, or Parquet by suffix) has one row per structure of a scan. Its columns, under the user's names
(``columns`` maps ours to theirs; a name not mapped is looked for as ours):

    scan       the scan as the user knows it: the SeriesInstanceUID (DICOM cohorts) or the value of the volumes
               table's ``image`` column (stages.ingest_volumes)
    slice      0-based slice index k
    x, y       column index i and row index j, pixels (may be fractional)
    level      T12 ... S1 (bodies) or T12-L1 ... L5-S1 (discs), in any notation stages.core.levels.normalise_level
               accepts (L4-L5, L4/L5, L4L5, L4-5, or numbers counted from the top or from the sacrum)
    structure  optional: vertebra/body/VB or disc/disk/IVD (needed for numeric levels; otherwise the level name says)
    depth_mm   optional: the structure's antero-posterior extent in mm (estimated from the body spacing when absent)

Ingest reads it (:func:`read_landmarks`), normalises levels and coordinates (:func:`normalise_landmarks`), and keeps
the rows of the scans it ingested under their pseudonymous ids (:func:`pseudonymise_landmarks`), accounting for every
row by its row number and a reason, never by a raw identifier. Localisation turns one scan's landmarks into a
structure table (:func:`structures_from_landmarks`) with the same axes the label-map path computes from the same
centres.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from stages.anatomy.spine_structures import COLUMNS, in_plane_axes, index_to_world, slice_normal
from stages.core import levels

REQUIRED = ("scan", "slice", "x", "y", "level")
OPTIONAL = ("structure", "depth_mm")
OURS = REQUIRED + OPTIONAL
OUTPUT = ["scan_id", "kind", "level", "i", "j", "k", "depth_mm"]
ACCOUNT = ["row", "status", "reason"]
USED, REJECTED = "used", "rejected"
UNKNOWN_SCAN = "unknown scan (not among the ingested scans)"
# Extents as multiples of the median distance between neighbouring body centres (as the learned localiser estimates
# them, stages.anatomy.localiser.structures_from_heatmaps): (height, depth, width) along the spine, antero-posterior, across.
EXTENT_FACTORS = {"vertebra": (0.75, 0.95, 1.3), "disc": (0.25, 0.95, 1.3)}
DEFAULT_BODY_SPACING_MM = 35.0  # with fewer than two bodies, as the learned localiser does


class LandmarkError(ValueError):
    """A landmark table that cannot be used at all (unreadable, a required column missing, a bad column mapping)."""


def check_column_mapping(columns: Mapping[str, str]) -> None:
    """A column mapping (ours -> theirs) names only our columns."""
    unknown = sorted(set(columns) - set(OURS))
    if unknown:
        raise LandmarkError(f"unknown landmark column(s) {unknown} in the column mapping; ours are {list(OURS)}")


def read_landmarks(path: Path, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The table under our column names (only ours, optional ones added empty), with ``row``: the row number as in
    the CSV file (the header is row 1, the first data row row 2; a Parquet table is numbered the same way).

    Values are kept as read (text for CSV); :func:`normalise_landmarks` parses them. Raises :class:`LandmarkError`
    when the file cannot be read or a required column is missing (naming the column under both names)."""
    columns = dict(columns or {})
    check_column_mapping(columns)
    path = Path(path)
    if not path.is_file():
        raise LandmarkError(f"landmark table {path} is not a file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # any reader failure means a bad table: say which and why
        raise LandmarkError(f"landmark table {path} cannot be read: {err}") from err
    theirs = {ours: columns.get(ours, ours) for ours in OURS}
    missing = [f"{theirs[c]!r}" + (f" (for {c})" if theirs[c] != c else "") for c in REQUIRED
               if theirs[c] not in raw.columns]
    if missing:
        raise LandmarkError(f"landmark table {path} has no column {', '.join(missing)}; its columns are "
                            f"{[str(c) for c in raw.columns]} (map yours with --landmark-column OURS=THEIRS)")
    out = pd.DataFrame({"row": np.arange(len(raw)) + 2})
    for ours in OURS:
        out[ours] = raw[theirs[ours]].to_numpy() if theirs[ours] in raw.columns else None
    return out


def _text(value: Any) -> str:
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return ""
    return str(value).strip()


def _number(value: Any) -> float:
    text = _text(value)
    try:
        return float(text) if text else float("nan")
    except ValueError:
        return float("nan")


def normalise_landmarks(table: pd.DataFrame, count_from: str = "top", first: str | None = None) -> pd.DataFrame:
    """Parse the columns of :func:`read_landmarks`' table: ``scan`` (text), ``kind`` and ``level`` (the workflow's
    names), ``i, j, k`` and ``depth_mm`` (floats, NaN when absent), ``row``, and ``problem``: why the row cannot be
    used ("" when it can): an unknown level or structure, a missing or non-numeric coordinate, a bad depth."""
    if count_from not in levels.NUMBERINGS:
        raise ValueError(f"count_from must be one of {levels.NUMBERINGS}, got {count_from!r}")
    if first is not None and first not in levels.VERTEBRAE:
        raise ValueError(f"first must be one of {levels.VERTEBRAE}, got {first!r}")
    rows = []
    for rec in table.to_dict("records"):
        problem, kind, level = "", "", ""
        try:
            structure = _text(rec.get("structure"))
            given_kind = levels.structure_kind(structure) if structure else None
            level = levels.normalise_level(_text(rec["level"]), given_kind, count_from, first)
            kind = given_kind or ("disc" if "-" in level else "vertebra")
        except levels.LevelError as err:
            text = str(err)
            problem = text if text.startswith(("unknown level", "unknown structure")) else f"unknown level: {text}"
            level = ""
        ijk = {ours: _number(rec[theirs]) for ours, theirs in (("i", "x"), ("j", "y"), ("k", "slice"))}
        depth = _number(rec.get("depth_mm"))
        if not problem:
            gaps = [theirs for ours, theirs in (("i", "x"), ("j", "y"), ("k", "slice")) if not np.isfinite(ijk[ours])]
            bad = [g for g in gaps if _text(rec[g])]
            if bad:
                problem = f"bad coordinate: {', '.join(bad)} is not a number"
            elif gaps:
                problem = f"missing coordinate: {', '.join(gaps)}"
            elif _text(rec.get("depth_mm")) and not (np.isfinite(depth) and depth > 0):
                problem = "bad depth_mm: not a positive number"
        rows.append({"row": int(rec["row"]), "scan": _text(rec["scan"]), "kind": kind, "level": level, **ijk,
                     "depth_mm": depth, "problem": problem})
    return pd.DataFrame(rows, columns=["row", "scan", "kind", "level", "i", "j", "k", "depth_mm", "problem"])


def pseudonymise_landmarks(table: pd.DataFrame, scan_ids: Mapping[str, str],
                           sizes: Mapping[str, tuple[int, int, int]] | None = None
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable rows of :func:`normalise_landmarks`' table under their scan ids (columns ``OUTPUT``), and an
    account of every row (``row``, ``status`` used/rejected, ``reason``).

    ``scan_ids`` maps the raw scan identifier to the ingested scan's id; a scan not in it is unknown. With ``sizes``
    (scan id -> the volume's (columns, rows, slices)), a centre outside the volume is rejected. The first row of a
    scan and level is used, a later one rejected as a duplicate. Neither output holds a raw identifier."""
    kept, account = [], []
    seen: dict[tuple[str, str], int] = {}
    for rec in table.to_dict("records"):
        scan_id = scan_ids.get(rec["scan"]) if rec["scan"] else None
        reason = rec["problem"]
        if scan_id is None:
            reason = UNKNOWN_SCAN if rec["scan"] else "missing scan identifier"
        elif not reason and sizes is not None and scan_id in sizes:
            size = sizes[scan_id]
            outside = [name for name, v, n in (("x", rec["i"], size[0]), ("y", rec["j"], size[1]),
                                               ("slice", rec["k"], size[2])) if not -0.5 <= v <= n - 0.5]
            if outside:
                reason = f"coordinate outside the volume: {', '.join(outside)}"
        if not reason:
            first = seen.setdefault((scan_id, rec["level"]), rec["row"])
            if first != rec["row"]:
                reason = f"duplicated level: the same scan and level as row {first}"
        account.append({"row": f"row {rec['row']}", "status": REJECTED if reason else USED,
                        "reason": reason or f"{rec['kind']} {rec['level']} of scan {scan_id}"})
        if not reason:
            kept.append({"scan_id": scan_id, **{c: rec[c] for c in OUTPUT[1:]}})
    landmarks = pd.DataFrame(kept, columns=OUTPUT).astype({c: float for c in ("i", "j", "k", "depth_mm")})
    return landmarks, pd.DataFrame(account, columns=ACCOUNT)


def empty_landmarks() -> pd.DataFrame:
    """The pseudonymised landmark table with no rows (written when no table is given)."""
    return pd.DataFrame(columns=OUTPUT).astype({c: float for c in ("i", "j", "k", "depth_mm")})


def summarise_landmarks(account: pd.DataFrame) -> dict[str, Any]:
    """Rows, used, rejected, and the rejection reasons counted by their kind (the text before the first colon or
    parenthesis)."""
    rejected = account[account.status == REJECTED].reason
    kinds = rejected.str.split(r"[:(]", regex=True).str[0].str.strip()
    return {"rows": len(account), "used": int((account.status == USED).sum()), "rejected": len(rejected),
            "reasons": {k: int(v) for k, v in kinds.value_counts().items()}}


def body_spacing_mm(image: sitk.Image, landmarks: pd.DataFrame) -> float:
    """Median distance between neighbouring vertebral-body centres (mm), per level step when a level between two
    given bodies is missing; 35 mm with fewer than two bodies."""
    bodies = landmarks[landmarks.kind == "vertebra"]
    order = sorted(bodies.itertuples(), key=lambda r: levels.VERTEBRAE.index(r.level))
    if len(order) < 2:
        return DEFAULT_BODY_SPACING_MM
    world = index_to_world(image, np.array([[r.i, r.j, r.k] for r in order], dtype=float))
    steps = np.diff([levels.VERTEBRAE.index(r.level) for r in order])
    return float(np.median(np.linalg.norm(np.diff(world, axis=0), axis=1) / steps))


def structures_from_landmarks(image: sitk.Image, landmarks: pd.DataFrame) -> pd.DataFrame:
    """One scan's landmarks (columns kind, level, i, j, k, depth_mm) -> its structure table (spine_structures).

    Centres are the given indices in the image's geometry; the spine axis and anterior direction come from each
    kind's centres ordered top to bottom, exactly as stages.anatomy.spine_structures.structures_from_label_map does, so that
    the same centres give the same axes. ``depth_mm`` is the given one where there is one; otherwise it, and always
    the height and width, are estimated from the body spacing as the learned localiser does."""
    duplicated = landmarks.duplicated(["kind", "level"])
    if duplicated.any():
        raise ValueError(f"landmarks repeat level(s) {sorted(landmarks.level[duplicated])}; one row per level")
    spacing_mm = body_spacing_mm(image, landmarks)
    normal = slice_normal(image)
    out = []
    for kind, names, labels in (("vertebra", levels.VERTEBRAE, levels.VERTEBRA_LABELS),
                                ("disc", levels.DISCS, levels.DISC_LABELS)):
        group = landmarks[landmarks.kind == kind]
        unknown = set(group.level) - set(names)
        if unknown:
            raise ValueError(f"unknown {kind} level(s) {sorted(unknown)}; expected {names}")
        group = group.set_index("level").reindex([n for n in names if n in set(group.level)])
        if group.empty:
            continue
        index = group[["i", "j", "k"]].to_numpy(float)
        centres = index_to_world(image, index)
        axes, ap = in_plane_axes(centres, normal)
        height, depth, width = (f * spacing_mm for f in EXTENT_FACTORS[kind])
        for level, idx, c, a, p, given in zip(group.index, index, centres, axes, ap, group.depth_mm.to_numpy(float),
                                                  strict=True):
            out.append({"kind": kind, "level": level, "label": labels[level], "x": c[0], "y": c[1], "z": c[2],
                        "i": idx[0], "j": idx[1], "k": idx[2], "axis_x": a[0], "axis_y": a[1], "axis_z": a[2],
                        "ap_x": p[0], "ap_y": p[1], "ap_z": p[2], "height_mm": height,
                        "depth_mm": float(given) if np.isfinite(given) else depth, "width_mm": width, "n_voxels": 0})
    return pd.DataFrame(out, columns=COLUMNS)
