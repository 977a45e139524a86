"""Batched 3D augmentation of volume pairs, run on the training device (Jamaludin et al. 2017, section 2.4).

Each volume of a pair gets its own rotation (in the sagittal plane), in-plane scaling, translation in x, y and z and
intensity gain; the slice-wise flip (a mirror across the mid-sagittal plane) is drawn once per pair and applied to both
volumes, so a pair stays comparable. Everything is one ``affine_grid`` / ``grid_sample`` call over the whole batch;
nothing is done per sample in Python.

Volumes are tensors of shape ``(N, S, H, W)``: slices (left-right), rows (superior-inferior, y), columns
(anterior-posterior, x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    """Ranges of the random transforms; zero everywhere (and ``flip`` False) gives the identity.

    ``shift_fraction`` is the largest translation as a share of the volume's (width, height): the paper's 48 and 24
    pixels of a 224-pixel crop are (0.214, 0.107), so the same config works at any crop size.
    """

    rotation_deg: float = 15.0
    shift_fraction: tuple[float, float] = (48 / 224, 24 / 224)
    shift_slices: int = 2
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.2
    flip: bool = True

    def __post_init__(self) -> None:
        if self.rotation_deg < 0 or self.shift_slices < 0 or self.intensity < 0 or min(self.shift_fraction) < 0:
            raise ValueError(f"augmentation ranges must be >= 0, got {self}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {self.scale}")

    @classmethod
    def identity(cls) -> AugmentRanges:
        return cls(rotation_deg=0.0, shift_fraction=(0.0, 0.0), shift_slices=0, scale=(1.0, 1.0), intensity=0.0,
                   flip=False)


@dataclass(frozen=True)
class PairParams:
    """Drawn parameters for ``n`` pairs: per-volume tensors have length ``2n`` (the ``a`` volumes, then the ``b``
    volumes); ``flip`` has length ``n`` (one per pair)."""

    angle_deg: torch.Tensor
    scale: torch.Tensor
    shift_x: torch.Tensor   # share of the width
    shift_y: torch.Tensor   # share of the height
    shift_z: torch.Tensor   # whole slices
    gain: torch.Tensor
    flip: torch.Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _draw(m: int, n_flips: int, ranges: AugmentRanges, generator: torch.Generator) -> PairParams:
    """``m`` per-volume transforms and ``n_flips`` flips, drawn in this order on the generator's device."""
    device = generator.device
    return PairParams(
        angle_deg=_uniform(m, -ranges.rotation_deg, ranges.rotation_deg, generator, device),
        scale=_uniform(m, ranges.scale[0], ranges.scale[1], generator, device),
        shift_x=_uniform(m, -ranges.shift_fraction[0], ranges.shift_fraction[0], generator, device),
        shift_y=_uniform(m, -ranges.shift_fraction[1], ranges.shift_fraction[1], generator, device),
        shift_z=torch.randint(-ranges.shift_slices, ranges.shift_slices + 1, (m,), generator=generator,
                              device=device),
        gain=_uniform(m, 1 - ranges.intensity, 1 + ranges.intensity, generator, device),
        flip=(torch.rand(n_flips, generator=generator, device=device) < 0.5) if ranges.flip
        else torch.zeros(n_flips, dtype=torch.bool, device=device),
    )


def sample_pair_params(n_pairs: int, ranges: AugmentRanges, generator: torch.Generator) -> PairParams:
    """Draw the transforms of ``n_pairs`` pairs on the generator's device (a flip per pair)."""
    return _draw(2 * n_pairs, n_pairs, ranges, generator)


def sample_volume_params(n: int, ranges: AugmentRanges, generator: torch.Generator) -> PairParams:
    """Draw the transforms of ``n`` single volumes (a classifier's inputs): each its own transform and its own flip,
    for :func:`augment_volumes`. The stream is that of a pair batch of ``n`` pairs (whose first ``n`` transforms are
    kept) followed by ``n`` flips: the draws the classifiers were first measured with."""
    pairs = _draw(2 * n, n, ranges, generator)
    flip = _draw(0, n, ranges, generator).flip
    return PairParams(pairs.angle_deg[:n], pairs.scale[:n], pairs.shift_x[:n], pairs.shift_y[:n], pairs.shift_z[:n],
                      pairs.gain[:n], flip)


def affine_matrices(params: PairParams, shape: tuple[int, int, int]) -> torch.Tensor:
    """``(2n, 3, 4)`` matrices for ``F.affine_grid``: output voxel -> input voxel in normalised coordinates (x = columns,
    y = rows, z = slices), rotating and scaling about the centre in physical pixels (so non-square crops rotate
    rigidly) and translating by the drawn shifts."""
    slices, height, width = shape
    m = params.angle_deg.shape[0]
    theta = torch.deg2rad(params.angle_deg.float())
    cos, sin = torch.cos(theta) / params.scale, torch.sin(theta) / params.scale
    half_w, half_h = width / 2, height / 2
    mats = torch.zeros(m, 3, 4, device=params.angle_deg.device)
    # pixel-space rotation R/s conjugated into normalised space: D^-1 (R/s) D with D = diag(W/2, H/2)
    mats[:, 0, 0] = cos
    mats[:, 0, 1] = -sin * half_h / half_w
    mats[:, 1, 0] = sin * half_w / half_h
    mats[:, 1, 1] = cos
    mats[:, 2, 2] = 1.0
    mats[:, 0, 3] = -2.0 * params.shift_x
    mats[:, 1, 3] = -2.0 * params.shift_y
    mats[:, 2, 3] = -2.0 * params.shift_z.float() / slices
    return mats


def augment_pairs(a: torch.Tensor, b: torch.Tensor, params: PairParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``params`` to the pair batches ``a`` and ``b`` (each ``(n, S, H, W)``); returns two tensors of the same
    shape. Voxels moved in from outside the volume are zero."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b must both be (n, S, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    with torch.autocast(a.device.type, enabled=False):   # the sampling grid in float32 also inside a bf16 step
        return _augment(a, b, params)


def _augment(a: torch.Tensor, b: torch.Tensor, params: PairParams) -> tuple[torch.Tensor, torch.Tensor]:
    out = _warp(torch.cat([a, b]), params.flip.repeat(2), params)   # one flip per pair, on both volumes
    return out[:len(a)], out[len(a):]


def _warp(volumes: torch.Tensor, flip: torch.Tensor, params: PairParams) -> torch.Tensor:
    """``volumes`` ``(m, S, H, W)`` mirrored where ``flip``, then rotated, scaled, shifted and scaled in intensity by
    the ``m`` transforms of ``params``."""
    vol = volumes.unsqueeze(1).float()                                 # (m, 1, S, H, W)
    vol = torch.where(flip.view(-1, 1, 1, 1, 1), vol.flip(2), vol)
    grid = F.affine_grid(affine_matrices(params, tuple(volumes.shape[1:])), list(vol.shape), align_corners=False)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1) * params.gain.view(-1, 1, 1, 1)


def augment_volumes(x: torch.Tensor, params: PairParams) -> torch.Tensor:
    """Apply ``params`` (from :func:`sample_volume_params`) to the batch ``x`` ``(n, S, H, W)``, one transform per
    volume (rotation, scaling, shifts, intensity gain and the mid-sagittal flip)."""
    if x.dim() != 4 or params.angle_deg.shape[0] != x.shape[0] or params.flip.shape[0] != x.shape[0]:
        raise ValueError(f"expected (n, S, H, W) volumes and n transforms, got {tuple(x.shape)} and "
                         f"{params.angle_deg.shape[0]} transforms")
    with torch.autocast(x.device.type, enabled=False):
        return _warp(x, params.flip, params)
