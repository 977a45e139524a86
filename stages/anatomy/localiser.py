"""A learned localiser for scans without label maps: heatmap regression of vertebral-body and disc centres.

A small 2D U-Net looks at three neighbouring sagittal slices at a time (resized to ``image_size`` square) and
predicts three heatmaps: Gaussians at the centres of the vertebral bodies (channel 0), of the discs (channel 1) and of
the L5-S1 disc alone (channel 2, the anchor of the level count). Run over every slice of a scan, the peaks of the
maximum over slices give the in-plane centres, and the slice of strongest response gives each structure's own middle
slice. Levels are counted from the lumbosacral junction: S1 and L5 are the two bodies around the anchor's peak, and the
chain of bodies is followed up from them, each next body near where the last step predicts it (so sacral segments
below S1, and posterior elements beside the chain, are not counted). Without a confident anchor, S1 is the lowest
body with a confident disc above it. Each disc is the disc peak nearest the midpoint of two neighbouring bodies. A
single 2D slice is a one-slice volume: its stack repeats it three times.

Which localiser serves a cohort is ``localise.model``: ``builtin``, the shipped weights (:data:`BUILTIN`, trained
on domain-randomised phantom slices by ``stages.localiser_builtin``; their model card is in the README), ``cohort``,
trained on the cohort's own label maps by ``stages.localiser_train`` (from the built-in weights with
``localise.start_from_builtin``), or the path of weights saved by either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy.ndimage import maximum_filter
from torch import nn

from stages.anatomy.landmarks import EXTENT_FACTORS
from stages.anatomy.spine_structures import (
    COLUMNS,
    in_plane_axes,
    index_to_world,
    slice_normal,
    structures_from_label_map,
)
from stages.core import levels, seeds
from stages.core.config import section_config

log = logging.getLogger("localiser")

CONFIDENT = 0.5  # a disc peak at least this strong marks a real intervertebral disc (for finding S1)
CHANNELS = ("vertebra", "disc", "L5-S1")  # the heatmaps: body centres, disc centres, the lumbosacral disc
ANCHOR = "L5-S1"
STEP_TOLERANCE = 0.55  # the next body of the chain lies within this share of a step of where the step predicts it
BUILTIN = Path(__file__).parent / "weights" / "builtin_localiser.pt"  # the shipped weights
BUILTIN_CARD = BUILTIN.with_suffix(".json")  # how they were trained and what they reach


@dataclass(frozen=True)
class LocaliseConfig:
    """The ``localise`` section of the config (see its schema)."""

    withhold_label_fraction: float
    seed: int
    epochs: int
    image_size: int
    batch_size: int
    learning_rate: float
    heatmap_sigma_mm: float
    peak_threshold: float
    width: int
    model: str = "builtin"
    start_from_builtin: bool = False

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> LocaliseConfig:
        """Validate a (partial) ``localise`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "localise", section)


def model_path(cfg: LocaliseConfig, trained: Path | None = None) -> Path | None:
    """The weights ``cfg.model`` names: the shipped ones, ``trained`` (the cohort's, from stages.localiser_train) or
    a path."""
    if cfg.model == "builtin":
        return BUILTIN
    if cfg.model == "cohort":
        return trained
    return Path(cfg.model)


def save_localiser(model: HeatmapUNet | None, cfg: LocaliseConfig, path: Path) -> None:
    """Weights (None: untrained) and the config they were trained with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": None if model is None else model.state_dict(), "config": dataclasses.asdict(cfg)}, path)


def load_localiser(path: Path) -> tuple[HeatmapUNet | None, LocaliseConfig]:
    """A localiser saved by :func:`save_localiser`; None when it could not be trained (no label maps)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    known = {f.name for f in dataclasses.fields(LocaliseConfig)}
    cfg = LocaliseConfig(**{k: v for k, v in saved["config"].items() if k in known})
    if saved["state_dict"] is None:
        return None, cfg
    model = HeatmapUNet(cfg.width)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), cfg


def withheld_subjects(subjects: list[str], fraction: float, seed: int) -> set[str]:
    """The subjects whose label maps localisation pretends not to have: a fixed share, chosen by a seeded hash."""
    ranked = sorted(set(subjects), key=lambda s: hashlib.sha256(f"{seed}|{s}".encode()).hexdigest())
    return set(ranked[: int(round(fraction * len(ranked)))])


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class HeatmapUNet(nn.Module):
    """(B, 3, S, S) slices -> (B, 3, S, S) heatmap logits (CHANNELS). S must be divisible by 8."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc = nn.ModuleList([_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)])
        self.bottom = _block(4 * w, 8 * w)
        self.dec = nn.ModuleList([_block(8 * w + 4 * w, 4 * w), _block(4 * w + 2 * w, 2 * w), _block(2 * w + w, w)])
        self.head = nn.Conv2d(w, len(CHANNELS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for block, skip in zip(self.dec, reversed(skips)):
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
        return self.head(x)


def slice_stacks(volume: np.ndarray, size: int) -> torch.Tensor:
    """(K, rows, cols) volume -> (K, 3, size, size): each slice with its two neighbours, intensity-normalised."""
    scale = float(np.percentile(volume, 99.5)) or 1.0
    v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32) / scale)
    k = np.arange(len(volume))
    stacks = torch.stack([v[np.clip(k - 1, 0, len(k) - 1)], v, v[np.clip(k + 1, 0, len(k) - 1)]], dim=1)
    return F.interpolate(stacks, size=(size, size), mode="bilinear", align_corners=False)


def heatmap_targets(structures: pd.DataFrame, shape: tuple[int, int], spacing: tuple[float, float], size: int,
                    sigma_mm: float) -> np.ndarray:
    """(3, size, size) Gaussian targets at the structures' in-plane centres (CHANNELS: bodies, discs, and the L5-S1
    disc again); ``structures`` has columns kind, level, i, j."""
    rows, cols = shape
    sx, sy = size / cols, size / rows
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((len(CHANNELS), size, size), dtype=np.float32)
    for row in structures.itertuples():
        x, y = (row.i + 0.5) * sx - 0.5, (row.j + 0.5) * sy - 0.5
        gx, gy = sigma_mm * sx / spacing[0], sigma_mm * sy / spacing[1]
        blob = np.exp(-((xx - x) ** 2 / (2 * gx**2) + (yy - y) ** 2 / (2 * gy**2)))
        for channel in (CHANNELS.index(row.kind), CHANNELS.index(ANCHOR) if row.level == ANCHOR else None):
            if channel is not None:
                out[channel] = np.maximum(out[channel], blob)
    return out


def training_samples(volume_path: str, label_path: str, cfg: LocaliseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from the three slices around the middle of the spine of one labelled scan."""
    image = sitk.ReadImage(volume_path, sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(image)
    structures = structures_from_label_map(sitk.ReadImage(label_path))
    mid = int(np.rint(structures.k.median()))
    ks = [k for k in (mid - 1, mid, mid + 1) if 0 <= k < len(volume)]
    stacks = slice_stacks(volume, cfg.image_size)[ks]
    spacing = image.GetSpacing()
    target = heatmap_targets(structures, volume.shape[1:], (spacing[0], spacing[1]), cfg.image_size,
                             cfg.heatmap_sigma_mm)
    return stacks, torch.from_numpy(target).expand(len(ks), -1, -1, -1).clone()


def train(samples: list[tuple[torch.Tensor, torch.Tensor]], cfg: LocaliseConfig,
          start: HeatmapUNet | None = None) -> tuple[HeatmapUNet, list[dict]]:
    """Fit the network (from ``start``'s weights if given); returns it and the loss per epoch. Deterministic for a
    seed on the CPU."""
    seeds.seed_torch(seeds.localiser(cfg.seed))
    x = torch.cat([s[0] for s in samples])
    y = torch.cat([s[1] for s in samples])
    model = HeatmapUNet(cfg.width)
    if start is not None:
        model.load_state_dict(start.state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(cfg.epochs, 1))
    generator = seeds.generator(seeds.localiser(cfg.seed))
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            gain = 1 + 0.4 * (torch.rand(len(idx), 1, 1, 1, generator=generator) - 0.5)  # intensity augmentation
            batch_x, batch_y = x[idx] * gain, y[idx]
            shift = [int(v) for v in torch.randint(-6, 7, (2,), generator=generator)]  # small translations
            batch_x = torch.roll(batch_x, shifts=shift, dims=(2, 3))
            batch_y = torch.roll(batch_y, shifts=shift, dims=(2, 3))
            pred = torch.sigmoid(model(batch_x))
            loss = ((pred - batch_y) ** 2 * (1 + 20 * batch_y)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        schedule.step()
        history.append({"epoch": epoch + 1, "loss": total / len(x)})
        if (epoch + 1) % 10 == 0 or epoch == 0:
            log.info("epoch %d/%d loss %.5f", epoch + 1, cfg.epochs, total / len(x))
    return model, history


@torch.no_grad()
def predict_heatmaps(model: HeatmapUNet, volume: np.ndarray, size: int) -> np.ndarray:
    """(K, 3, size, size) heatmaps (CHANNELS), one per slice."""
    model.eval()
    stacks = slice_stacks(volume, size)
    return torch.cat([torch.sigmoid(model(stacks[i:i + 8])) for i in range(0, len(stacks), 8)]).numpy()


def localise_image(model: HeatmapUNet, cfg: LocaliseConfig, image: sitk.Image) -> tuple[pd.DataFrame, list[str]]:
    """The structure table of one scan (a volume, or a one-slice image) and what makes it doubtful."""
    heat = predict_heatmaps(model, sitk.GetArrayFromImage(image), cfg.image_size)
    return structures_from_heatmaps(heat, image, cfg.peak_threshold)


def slice_image(pixels: np.ndarray, pixel_mm: float, thickness_mm: float = 4.0) -> sitk.Image:
    """A 2D sagittal slice (rows head to feet, columns anterior to posterior, as a sagittal series is displayed) as a
    one-slice volume with square ``pixel_mm`` pixels, in patient coordinates (LPS)."""
    image = sitk.GetImageFromArray(np.asarray(pixels, dtype=np.float32)[None])
    image.SetSpacing((pixel_mm, pixel_mm, thickness_mm))
    row, col = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    image.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
    return image


def _peaks(heat: np.ndarray, threshold: float, min_distance_px: int) -> list[tuple[float, float]]:
    """Sub-pixel (y, x) local maxima of a 2D map above a threshold."""
    local = maximum_filter(heat, size=2 * min_distance_px + 1, mode="constant")
    found = []
    for y, x in zip(*np.nonzero((heat == local) & (heat > threshold))):
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, heat.shape[0]), max(x - 1, 0), min(x + 2, heat.shape[1])
        patch = heat[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        found.append((float((patch * yy).sum() / patch.sum()), float((patch * xx).sum() / patch.sum())))
    return found


def structures_from_heatmaps(heat: np.ndarray, image: sitk.Image, threshold: float) -> tuple[pd.DataFrame, list[str]]:
    """Structure table (source: learned) from per-slice heatmaps, and what makes it doubtful (empty if nothing)."""
    size = heat.shape[-1]
    cols, rows = image.GetSize()[0], image.GetSize()[1]
    spacing = image.GetSpacing()
    sx, sy = size / cols, size / rows
    min_px = max(1, int(round(12.0 / (spacing[1] / sy))))  # peaks closer than 12 mm are one structure
    problems: list[str] = []
    found: dict[str, list[np.ndarray]] = {}
    # The mid-sagittal slab: the slice that responds most, and two on each side (lateral slices see pedicles and
    # facets that can look like bodies).
    peak_per_slice = heat[:, 0].reshape(len(heat), -1).max(axis=1)
    centre = int(np.rint((peak_per_slice * np.arange(len(heat))).sum() / max(peak_per_slice.sum(), 1e-6)))
    lo, hi = max(centre - 2, 0), min(centre + 3, len(heat))
    for channel, kind in enumerate(CHANNELS[: heat.shape[1]]):
        stack = heat[lo:hi, channel]
        points = []
        projection = stack.max(axis=0)
        for y, x in _peaks(projection, threshold, min_px):
            profile = stack[:, int(round(y)), int(round(x))]
            k0 = int(np.argmax(profile))
            ks = np.arange(max(k0 - 1, 0), min(k0 + 2, len(profile)))
            k = lo + float((profile[ks] * ks).sum() / profile[ks].sum())
            points.append(np.array([(x + 0.5) / sx - 0.5, (y + 0.5) / sy - 0.5, k,
                                    projection[int(round(y)), int(round(x))]]))
        found[kind] = points
    bodies = found["vertebra"]
    if len(bodies) < 2:
        return pd.DataFrame(columns=COLUMNS), [f"localisation failed: {len(bodies)} vertebral bodies found"]
    bodies_arr = np.array(bodies)
    world = index_to_world(image, bodies_arr[:, :3])
    order = np.argsort(world @ np.array([0.0, 0.0, -1.0]))  # top to bottom
    disc_arr = np.array(found["disc"]) if found["disc"] else np.zeros((0, 4))
    disc_points, disc_score = disc_arr[:, :3], disc_arr[:, 3]
    disc_world = index_to_world(image, disc_points) if len(disc_points) else np.zeros((0, 3))
    anchors = [a for a in found.get(ANCHOR, []) if a[3] >= CONFIDENT]
    chain = _chain_from_anchor(world, index_to_world(image, max(anchors, key=lambda a: a[3])[None, :3])[0],
                               slice_normal(image)) if anchors else None
    if chain is not None:
        order = np.array(chain[::-1])
    else:
        # S1 is the lowest body with a confident disc between it and the body above (the sacral segments below
        # have at most a faint rudimentary one).
        confident = disc_world[disc_score >= CONFIDENT]
        has_disc_above = [False] + [_disc_between(world[a], world[b], confident) is not None
                                    for a, b in zip(order[:-1], order[1:])]
        lowest = max((n for n, ok in enumerate(has_disc_above) if ok), default=len(order) - 1)
        order = order[: lowest + 1]  # body-like peaks below S1 (the sacral segments) are not levels
    if len(order) > len(levels.VERTEBRAE):  # T11 and above: count up from S1 and keep seven
        order = order[-len(levels.VERTEBRAE):]
    names = levels.VERTEBRAE[len(levels.VERTEBRAE) - len(order):]
    body_index = bodies_arr[order, :3]
    body_world = world[order]
    gaps = np.linalg.norm(np.diff(body_world, axis=0), axis=1)
    spacing_mm = float(np.median(gaps)) if len(gaps) else 35.0
    rows_out = []
    normal = slice_normal(image)
    axes, ap = in_plane_axes(body_world, normal)
    for name, idx, c, a, p in zip(names, body_index, body_world, axes, ap):
        rows_out.append(_row("vertebra", name, idx, c, a, p, *(f * spacing_mm for f in EXTENT_FACTORS["vertebra"])))
    for upper in range(len(names) - 1):
        best = _disc_between(body_world[upper], body_world[upper + 1], disc_world)
        if best is None:
            continue
        a = body_world[upper + 1] - body_world[upper]
        a -= (a @ normal) * normal
        a /= np.linalg.norm(a)
        p = np.cross(a, normal)
        p *= -1.0 if p @ np.array([0.0, -1.0, 0.0]) < 0 else 1.0
        rows_out.append(_row("disc", f"{names[upper]}-{names[upper + 1]}", disc_points[best], disc_world[best], a, p,
                             *(f * spacing_mm for f in EXTENT_FACTORS["disc"])))
    return pd.DataFrame(rows_out, columns=COLUMNS), problems


def _chain_from_anchor(bodies: np.ndarray, anchor: np.ndarray, normal: np.ndarray | None = None) -> list[int] | None:
    """Indices of the bodies S1, L5, L4, ... (world centres ``bodies``) counted from the L5-S1 disc at ``anchor``:
    S1 and L5 are the nearest bodies below and above it, then each next body is the one nearest to where the last
    step predicts it (the first: twice the way from the disc to L5), within STEP_TOLERANCE of that step. Distances
    are taken within the slice plane (``normal``: the slice normal), where the centres are precise; across slices
    they are as coarse as the slice spacing. None when the anchor has no body on either side."""
    if normal is not None:
        bodies = bodies - np.outer(bodies @ normal, normal)
        anchor = anchor - (anchor @ normal) * normal
    down = bodies @ np.array([0.0, 0.0, -1.0]) - anchor @ np.array([0.0, 0.0, -1.0])
    distance = np.linalg.norm(bodies - anchor, axis=1)
    below, above = np.flatnonzero(down > 0), np.flatnonzero(down <= 0)
    if not len(below) or not len(above):
        return None
    chain = [int(below[np.argmin(distance[below])]), int(above[np.argmin(distance[above])])]
    # The first step up is twice the way from the disc to L5: along L5's own axis (the sacrum below is angled
    # against the lumbar spine, so S1 -> L5 would point the walk off the spine).
    step = 2 * (bodies[chain[1]] - anchor)
    if not 10.0 <= np.linalg.norm(step) <= 80.0:  # mm: no two neighbouring lumbar bodies are that close or far
        return None
    while len(chain) < len(levels.VERTEBRAE):
        expected = bodies[chain[-1]] + step
        miss = np.linalg.norm(bodies - expected, axis=1)
        miss[chain] = np.inf
        best = int(np.argmin(miss))
        if miss[best] > STEP_TOLERANCE * np.linalg.norm(step):
            break
        step = bodies[best] - bodies[chain[-1]]
        chain.append(best)
    return chain


def _disc_between(upper: np.ndarray, lower: np.ndarray, discs: np.ndarray) -> int | None:
    """Index of the disc peak nearest the midpoint of two bodies, if it lies within 40% of their distance."""
    if not len(discs):
        return None
    d = np.linalg.norm(discs - (upper + lower) / 2, axis=1)
    best = int(np.argmin(d))
    return best if d[best] <= 0.4 * np.linalg.norm(lower - upper) else None


def _row(kind: str, level: str, index: np.ndarray, world: np.ndarray, axis: np.ndarray, ap: np.ndarray,
         height: float, depth: float, width: float) -> dict[str, Any]:
    label = (levels.VERTEBRA_LABELS if kind == "vertebra" else levels.DISC_LABELS)[level]
    return {"kind": kind, "level": level, "label": label, "x": world[0], "y": world[1], "z": world[2],
            "i": index[0], "j": index[1], "k": index[2], "axis_x": axis[0], "axis_y": axis[1], "axis_z": axis[2],
            "ap_x": ap[0], "ap_y": ap[1], "ap_z": ap[2], "height_mm": height, "depth_mm": depth, "width_mm": width,
            "n_voxels": 0}


def compare(predicted: pd.DataFrame, truth: pd.DataFrame, normal: np.ndarray) -> pd.DataFrame:
    """Per true structure: the distance (mm) to the prediction of the same level (NaN if none), the same within the
    slice plane, and whether the nearest prediction of the same kind carries the right level."""
    rows = []
    for t in truth.itertuples():
        same_kind = predicted[predicted.kind == t.kind]
        c = np.array([t.x, t.y, t.z])
        match = same_kind[same_kind.level == t.level]
        diff = match[["x", "y", "z"]].to_numpy(float)[0] - c if len(match) else np.full(3, np.nan)
        error = float(np.linalg.norm(diff))
        in_plane = float(np.linalg.norm(diff - (diff @ normal) * normal))
        if len(same_kind):
            nearest = same_kind.iloc[int(np.argmin(np.linalg.norm(same_kind[["x", "y", "z"]].to_numpy(float) - c,
                                                                  axis=1)))]
            correct = nearest.level == t.level
        else:
            correct = False
        rows.append({"kind": t.kind, "level": t.level, "error_mm": error, "in_plane_error_mm": in_plane,
                     "level_correct": bool(correct)})
    return pd.DataFrame(rows)
