"""The two views of an axial slice in Hou et al. 2023's SimCLR (their eqs. 9-15), drawn for a whole batch on the
device.

In their order, for an image of W x H pixels:

1. An operation centre O = s o [W, H], s ~ N([0.5, 0.5], sigma^2 I) clipped to [0, 1], shared by the two views of an
   image (sigma is not in the paper: ``centre_sigma``).
2. A rotation by phi ~ U(-theta, theta) about O (theta = 18 degrees).
3. A crop whose upper-left corner is drawn uniformly up-left of O and whose lower-right corner down-right of it, with
   an aspect ratio (width / height) in [3/4, 4/3], an area of at least p_crop = 0.1 of the image's, and no corner
   outside the rotated image (so no zero padding enters the view). Up to 100 tries; when none passes, the view has
   neither rotation nor crop.
4. The crop resized back to W x H (bilinear).
5. A horizontal flip with p = 0.5.
6. Brightness kappa I and contrast (I - mean(I)) kappa + mean(I), kappa ~ U(0.6, 1.4) each.
7. A Gaussian blur with a kernel of 0.05 W x 0.05 H pixels (rounded to an odd size, at least 3) and
   sigma ~ U(0.1, 2) pixels.

Rotation, crop, resize and flip are one affine resampling (``grid_sample``). Coordinates are continuous pixel
coordinates: the image spans [0, W] x [0, H].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewRanges:
    """The draws' ranges (their Table 1's values by default; ``centre_sigma`` is ours)."""

    centre_sigma: float = 0.1
    rotation_deg: float = 18.0
    crop_min_area: float = 0.1
    crop_aspect: tuple[float, float] = (0.75, 4 / 3)
    crop_tries: int = 100
    flip_p: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.centre_sigma < 0 or self.rotation_deg < 0:
            raise ValueError(f"centre_sigma and rotation_deg must be >= 0, got {self.centre_sigma} and "
                             f"{self.rotation_deg}")
        if not 0 < self.crop_min_area <= 1:
            raise ValueError(f"crop_min_area must be in (0, 1], got {self.crop_min_area}")
        if not 0 < self.crop_aspect[0] <= self.crop_aspect[1]:
            raise ValueError(f"crop_aspect must be 0 < min <= max, got {self.crop_aspect}")
        if self.crop_tries < 1:
            raise ValueError(f"crop_tries must be >= 1, got {self.crop_tries}")
        for name in ("brightness", "contrast", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be 0 < min <= max, got {(low, high)}")


@dataclass(frozen=True)
class ViewParams:
    """One batch's draw for n images: per image (n, ...): ``centre`` O in pixels; per view (2n, ...: the n first
    views, then the n second views): ``angle`` (radians, 0 where the crop fell back), ``box`` (x0, y0, x1, y1) in
    pixels (the whole image where it fell back), ``fallback``, ``flip``, ``brightness``, ``contrast``, ``sigma``."""

    centre: torch.Tensor
    angle: torch.Tensor
    box: torch.Tensor
    fallback: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    sigma: torch.Tensor

    def take(self, mine: slice) -> ViewParams:
        """The share of a global batch's draw one process keeps: its images' centres and both of their views."""
        n = len(self.centre)

        def share(values: torch.Tensor) -> torch.Tensor:
            if len(values) == n:
                return values[mine]
            return torch.cat([values[:n][mine], values[n:][mine]])

        return ViewParams(**{f.name: share(getattr(self, f.name)) for f in dataclasses.fields(self)})


def rotate_about(points: torch.Tensor, centre: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``points`` (..., 2) rotated by ``angle`` (radians, broadcast over the leading axes) about ``centre``."""
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    d = points - centre
    return centre + torch.cat([c * d[..., :1] - s * d[..., 1:], s * d[..., :1] + c * d[..., 1:]], dim=-1)


def inside_rotated(points: torch.Tensor, centre: torch.Tensor, angle: torch.Tensor, size: tuple[int, int],
                   eps: float = 1e-4) -> torch.Tensor:
    """Whether ``points`` (..., 2) lie in the image of ``size`` (W, H) rotated by ``angle`` about ``centre``: a point
    of the rotated image comes from the original image's point rotated back."""
    source = rotate_about(points, centre, -angle)
    w, h = size
    return ((source[..., 0] >= -eps) & (source[..., 0] <= w + eps) & (source[..., 1] >= -eps)
            & (source[..., 1] <= h + eps))


def box_corners(box: torch.Tensor) -> torch.Tensor:
    """The four corners (..., 4, 2) of boxes (..., 4) given as (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box.unbind(-1)
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x0, y1], -1),
                        torch.stack([x1, y1], -1)], -2)


def sample_view_params(n: int, size: tuple[int, int], ranges: ViewRanges, generator: torch.Generator) -> ViewParams:
    """The draw for n images of ``size`` (W, H): every random number comes from ``generator`` in a fixed order, so
    the same generator state gives the same views."""
    device = generator.device
    w, h = size
    wh = torch.tensor([w, h], dtype=torch.float32, device=device)

    def uniform(shape: tuple[int, ...], low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    s = (0.5 + ranges.centre_sigma * torch.randn((n, 2), generator=generator, device=device)).clamp(0, 1)
    centre = s * wh
    views = 2 * n
    o = torch.cat([centre, centre])                                   # each view's O: its image's
    theta = math.radians(ranges.rotation_deg)
    angle = uniform((views,), -theta, theta)
    tries = ranges.crop_tries
    ox, oy = o[:, None, 0], o[:, None, 1]
    x0, y0 = uniform((views, tries), 0.0, 1.0) * ox, uniform((views, tries), 0.0, 1.0) * oy
    x1, y1 = ox + uniform((views, tries), 0.0, 1.0) * (w - ox), oy + uniform((views, tries), 0.0, 1.0) * (h - oy)
    boxes = torch.stack([x0, y0, x1, y1], -1)                          # (views, tries, 4)
    bw, bh = x1 - x0, y1 - y0
    aspect = bw / bh.clamp_min(1e-6)
    ok = (aspect >= ranges.crop_aspect[0]) & (aspect <= ranges.crop_aspect[1]) & (bw * bh >= ranges.crop_min_area * w * h)
    ok &= inside_rotated(box_corners(boxes), o[:, None, None, :], angle[:, None, None], size).all(-1)
    found = ok.any(1)
    first = ok.int().argmax(1)                                        # the first try that passed
    box = boxes[torch.arange(views, device=device), first]
    whole = torch.tensor([0.0, 0.0, w, h], device=device)
    box = torch.where(found[:, None], box, whole)
    angle = torch.where(found, angle, torch.zeros_like(angle))
    flip = torch.rand((views,), generator=generator, device=device) < ranges.flip_p
    brightness = uniform((views,), *ranges.brightness)
    contrast = uniform((views,), *ranges.contrast)
    sigma = uniform((views,), *ranges.blur_sigma)
    return ViewParams(centre=centre, angle=angle, box=box, fallback=~found, flip=flip, brightness=brightness,
                      contrast=contrast, sigma=sigma)


def view_grid(params: ViewParams, size: tuple[int, int]) -> torch.Tensor:
    """The affine maps (2n, 2, 3) from a view's normalised output coordinates to the source image's: flip, the crop
    box resized to the image, and the rotation about O (align_corners=False: [-1, 1] spans [0, W] and [0, H])."""
    w, h = size
    o = torch.cat([params.centre, params.centre])
    box = params.box
    half = torch.stack([(box[:, 2] - box[:, 0]) / 2, (box[:, 3] - box[:, 1]) / 2], -1)    # (views, 2)
    middle = torch.stack([(box[:, 2] + box[:, 0]) / 2, (box[:, 3] + box[:, 1]) / 2], -1)
    c, s = torch.cos(-params.angle), torch.sin(-params.angle)                            # back to the source
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)           # (views, 2, 2)
    mirror = torch.where(params.flip, -1.0, 1.0)
    scale = torch.diag_embed(half * torch.stack([mirror, torch.ones_like(mirror)], -1))  # output -> crop
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h], device=box.device))
    linear = to_norm @ rot @ scale
    source_middle = o + (rot @ (middle - o)[..., None])[..., 0]
    shift = (to_norm @ source_middle[..., None])[..., 0] - 1.0
    return torch.cat([linear, shift[..., None]], -1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Each image of ``x`` (N, 1, H, W) blurred by a separable Gaussian of its own ``sigma`` (pixels) and ``kernel``
    (kx, ky) taps, edges reflected."""
    n = x.shape[0]
    out = x.reshape(1, n, *x.shape[2:])
    for axis, taps in ((1, kernel[0]), (0, kernel[1])):
        offsets = torch.arange(taps, device=x.device, dtype=x.dtype) - (taps - 1) / 2
        weights = torch.exp(-0.5 * (offsets[None] / sigma[:, None].to(x.dtype)) ** 2)
        weights = weights / weights.sum(1, keepdim=True)
        shape = (n, 1, 1, taps) if axis == 1 else (n, 1, taps, 1)
        pad = (taps // 2, taps // 2, 0, 0) if axis == 1 else (0, 0, taps // 2, taps // 2)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weights.reshape(shape), groups=n)
    return out.reshape(x.shape)


def blur_kernel(size: tuple[int, int], fraction: float) -> tuple[int, int]:
    """Their kernel of ``fraction`` x W by ``fraction`` x H pixels, rounded to an odd size of at least 3."""
    return tuple(max(3, int(round(fraction * s)) // 2 * 2 + 1) for s in size)  # type: ignore[return-value]


def make_views(x: torch.Tensor, params: ViewParams, ranges: ViewRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views (n, H, W) each of images ``x`` (n, H, W) under ``params`` (drawn for these n images)."""
    n, h, w = x.shape
    if len(params.centre) != n:
        raise ValueError(f"the draw is for {len(params.centre)} images, the batch has {n}")
    images = torch.cat([x, x]).unsqueeze(1).float()
    grid = F.affine_grid(view_grid(params, (w, h)), list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    views = views * params.brightness[:, None, None, None]
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * params.contrast[:, None, None, None] + mean
    views = gaussian_blur(views, params.sigma, blur_kernel((w, h), ranges.blur_kernel_fraction))
    views = views[:, 0]
    return views[:n], views[n:]
