"""MLSSCL's clips (Cao et al. 2022): stacks of C parallel slices cut from a lumbar region ``(SI, AP, LR)`` (isotropic,
stages/anatomy/regions.py) in one of three orientations, all through one centre point.

- axial: slices across the superior-inferior axis (each an AP x LR plane), ``stride`` voxels apart;
- coronal: across the anterior-posterior axis (SI x LR planes);
- sagittal: across the left-right axis (SI x AP planes).

Slice j of a clip of C slices lies at ``centre + (j - (C - 1) // 2) * stride`` along its axis (the centre is slice
``(C - 1) // 2``). Each slice is resized (bilinear) to ``size`` = (H, W), so that a clip is ``(C, H, W)``: the shape
of the volumes the backbone reads downstream (the Siamese trunk's slices, rows, columns). A centre is drawn uniformly
among the voxels where every clip of the sample fits inside the region along its axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


@dataclass(frozen=True)
class ClipSpec:
    """Slices per clip, the long and short strides (voxels), and each slice's size after resizing."""

    slices: int
    long_stride: int
    short_stride: int
    size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.slices < 1 or self.short_stride < 1 or self.long_stride < 1:
            raise ValueError(f"clips need slices and strides >= 1, got {self}")

    def offsets(self, stride: int) -> torch.Tensor:
        """The slices' offsets (voxels) from the centre along the clip's axis."""
        return (torch.arange(self.slices) - (self.slices - 1) // 2) * stride

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        """ValueError unless a long clip fits in a region of ``shape`` along every axis."""
        span = (self.slices - 1) * self.long_stride + 1
        if min(shape) < span:
            raise ValueError(f"a clip of {self.slices} slices {self.long_stride} voxels apart spans {span} voxels, "
                             f"more than the lumbar region's {min(shape)} along its shortest axis (regions "
                             f"{'x'.join(map(str, shape))}): take fewer slices, a shorter stride, or a larger "
                             "region (regions.size_mm) or finer voxels (regions.spacing_mm)")


def draw_centres(n: int, shape: tuple[int, int, int], spec: ClipSpec, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` centres (SI, AP, LR voxel indices) at which a long clip fits along every axis (and so a short one)."""
    low = -spec.offsets(spec.long_stride).min()
    high = torch.tensor(shape) - 1 - spec.offsets(spec.long_stride).max()
    u = torch.rand((n, 3), generator=generator, device=generator.device).cpu()
    return (low + (u * (high - low + 1)).floor().clamp(max=high - low)).long()


def cut_clips(regions: torch.Tensor, centres: torch.Tensor, view: str, stride: int, spec: ClipSpec,
              mode: str = "bilinear") -> torch.Tensor:
    """``(n, C, H, W)`` clips of ``view`` (axial, coronal, sagittal) from ``regions`` ``(n, SI, AP, LR)``, slices
    ``stride`` voxels apart around ``centres`` ``(n, 3)``, each resized to ``spec.size`` (``mode``: bilinear; nearest
    for label maps)."""
    if view not in AXES:
        raise ValueError(f"view must be one of {sorted(AXES)}, got {view!r}")
    axis = AXES[view]
    n = len(regions)
    index = (centres[:, axis:axis + 1].to(regions.device) + spec.offsets(stride).to(regions.device))  # (n, C)
    moved = regions.movedim(axis + 1, 1)                           # (n, along, plane rows, plane columns)
    rows = torch.arange(n, device=regions.device).view(-1, 1)
    planes = moved[rows, index]                                   # (n, C, h, w)
    h, w = planes.shape[-2:]
    resized = F.interpolate(planes.reshape(n * spec.slices, 1, h, w).float(), size=spec.size, mode=mode,
                            **({"align_corners": False} if mode == "bilinear" else {}))
    return resized.view(n, spec.slices, *spec.size)


def mlsscl_clips(regions: torch.Tensor, centres: torch.Tensor, spec: ClipSpec) -> dict[str, torch.Tensor]:
    """The four clips of each region through its centre: ``axial``, ``coronal``, ``sagittal`` (long stride) and
    ``short`` (axial, short stride)."""
    clips = {view: cut_clips(regions, centres, view, spec.long_stride, spec) for view in AXES}
    clips["short"] = cut_clips(regions, centres, "axial", spec.short_stride, spec)
    return clips
