"""Domain-randomised sagittal slices of the phantom spine, with the centres of its bodies and discs.

The built-in localiser learns from these and nothing else, so everything a scanner or a patient varies is drawn at
random for every slice, in the spirit of domain randomisation for segmentation (SynthSeg: Billot et al., Medical
Image Analysis 86, 102789, 2023): the anatomy (the phantom's traits, grades, herniations, lordosis, scoliosis, tilt),
the tissue intensities (T1-, T2- and STIR-like contrasts with every tissue jittered, and fully random ones), the
field of view and its aspect, where the spine sits in it, the rest of the sacrum below the phantom's S2, the slice's
distance from the mid-sagittal plane, the slice thickness and spacing (partial volume, and the neighbouring slices
of a 3-slice stack), a smooth bias field, the contrast curve, texture, blur (resolution), Rician noise and 8-bit
quantisation. A share of the stacks repeat one slice three times, as a single 2D image is fed to the localiser.

A slice is rendered directly on the localiser's square input grid (``size`` x ``size`` points spanning the field of
view), which is what resizing a scan to that grid gives; centres are returned in that grid's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter, zoom
from scipy.special import expit

from stages.demo import phantom as ph

# A fat-suppressed, fluid-bright contrast beside the phantom's T1 and T2 (relative to CSF = 1).
STIR = ph.Contrast("STIR", air=0.0, fat=0.06, muscle=0.16, marrow_scale=0.45, cortex=0.04, annulus=0.22,
                   nucleus=ph.NUCLEUS_T2.copy(), csf=1.0, cord=0.40, ligament=0.06, abdomen=0.25, fluid=0.90,
                   vessel=0.05)
_BASES = (ph.T1, ph.T2, STIR)
_SCALAR_TISSUES = ("fat", "muscle", "marrow_scale", "cortex", "annulus", "csf", "cord", "ligament", "abdomen", "fluid",
                   "vessel")
# Rendered structures whose centres are targets: the bodies T11..S1 and the discs T11-T12..L5-S1 (S2 and the
# rudimentary S1-S2 disc are not levels).
BODIES = ph.VERTEBRAE[:-1]
DISCS = ph.DISCS[:-1]


@dataclass(frozen=True)
class Randomisation:
    """Ranges of what is drawn per slice (see the module docstring); the defaults are the shipped recipe's."""

    fov_mm: tuple[float, float] = (200.0, 420.0)  # height of the field of view
    aspect: tuple[float, float] = (0.55, 1.3)  # width / height
    lateral_mm: float = 3.0  # s.d. of the slice's distance from the spine's mid-plane
    thickness_mm: tuple[float, float] = (2.5, 6.0)
    single_slice_share: float = 0.25  # stacks that repeat one slice (a 2D input)
    random_contrast_share: float = 0.2  # contrasts with every tissue drawn uniformly instead of jittered
    jitter: float = 0.3  # s.d. of the log of each tissue's multiplier
    bias: float = 0.5  # largest s.d. of the log bias field
    noise: tuple[float, float] = (0.003, 0.07)  # Rician sigma, relative to the 99th percentile
    blur_px: float = 1.2  # largest Gaussian blur (resolution)
    quantise_share: float = 0.5  # stacks stored as 8 bits


def random_contrast(rng: np.random.Generator, name: str, cfg: Randomisation) -> ph.Contrast:
    """A contrast: T1, T2 or STIR with every tissue jittered, or (``random_contrast_share``) every tissue uniform."""
    if rng.random() < cfg.random_contrast_share:
        values = {t: float(rng.uniform(0.02, 1.0)) for t in _SCALAR_TISSUES}
        nucleus = np.sort(rng.uniform(0.02, 1.0, 5))[:: 1 if rng.random() < 0.5 else -1]
        return ph.Contrast(name, air=0.0, nucleus=nucleus, **values)
    base = _BASES[rng.integers(len(_BASES))]
    values = {t: float(getattr(base, t) * np.exp(rng.normal(0, cfg.jitter))) for t in _SCALAR_TISSUES}
    return replace(base, name=name, nucleus=base.nucleus * np.exp(rng.normal(0, cfg.jitter)), **values)


def random_scene(rng: np.random.Generator) -> tuple[ph.SubjectTraits, ph.StudyState]:
    """A subject and a study: the phantom's population of traits, grades and herniations, and a wide posture range."""
    traits = ph.sample_traits(np.random.default_rng(rng.integers(2**63)), np.random.default_rng(rng.integers(2**63)),
                              0.0, bool(rng.random() < 0.5))
    state = ph.StudyState(grades=rng.integers(1, 6, 6), herniation=rng.random(6) < 0.15,
                          lordosis_delta_deg=float(rng.normal(0, 10)),
                          rotation=ph.rotation(rng.normal(0, 7), rng.normal(0, 2), rng.normal(0, 3)),
                          position=np.zeros(3), herniation_side=rng.normal(0, 4, 6))
    return traits, state


@dataclass(frozen=True)
class Plane:
    """The square sampling grid of one slice: its corner, the directions and lengths of a pixel step."""

    corner: np.ndarray  # (3,) world position of pixel (0, 0)
    right: np.ndarray  # (3,) one column step (mm vector), anterior -> posterior
    down: np.ndarray  # (3,) one row step (mm vector), head -> feet
    normal: np.ndarray  # (3,) unit
    size: int

    def points(self, offset_mm: float) -> np.ndarray:
        r, c = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        return (self.corner + offset_mm * self.normal + r.reshape(-1, 1) * self.down
                + c.reshape(-1, 1) * self.right)

    def pixel(self, world: np.ndarray) -> tuple[float, float, float]:
        """(row, column, distance from the plane in mm) of a world point."""
        d = world - self.corner
        return (float(d @ self.down / (self.down @ self.down)), float(d @ self.right / (self.right @ self.right)),
                float(d @ self.normal))


def random_plane(rng: np.random.Generator, layout: ph.Layout, state: ph.StudyState, size: int,
                 cfg: Randomisation) -> Plane:
    """A sagittal field of view around the lumbar spine, slightly oblique, the spine anywhere in its middle part."""
    l3 = ph.structure_centre(layout, state, float(layout.body[ph.VERTEBRAE.index("L3")].mean()))[0]
    height = rng.uniform(*cfg.fov_mm)
    width = height * rng.uniform(*cfg.aspect)
    oblique = ph.rotation(0.0, rng.normal(0, 2), rng.normal(0, 2))
    right, down = oblique @ np.array([0.0, 1.0, 0.0]), oblique @ np.array([0.0, 0.0, -1.0])
    normal = np.cross(right, down)
    centre = l3 + rng.normal(0, cfg.lateral_mm) * normal
    # L3 at 35-75 % of the width from the anterior edge and 30-70 % of the height from the top.
    corner = centre - rng.uniform(0.35, 0.75) * width * right - rng.uniform(0.3, 0.7) * height * down
    return Plane(corner, right * width / size, down * height / size, normal, size)


def centres(layout: ph.Layout, state: ph.StudyState, plane: Plane) -> list[tuple[str, str, float, float]]:
    """(kind, name, row, column) of every targeted body and disc centre, in the plane's pixels."""
    out = []
    for kind, names, spans in (("vertebra", BODIES, layout.body), ("disc", DISCS, layout.disc)):
        for name, span in zip(names, spans):
            row, col, _ = plane.pixel(ph.structure_centre(layout, state, float(span.mean()))[0])
            out.append((kind, name, row, col))
    return out


def paint_sacrum(images: dict[str, np.ndarray], points: np.ndarray, traits: ph.SubjectTraits, state: ph.StudyState,
                 layout: ph.Layout, contrasts: tuple[ph.Contrast, ...], rng: np.random.Generator) -> None:
    """Paint the sacral segments below the phantom's S2 (S3 to S5, then the coccyx) into ``images`` (per contrast,
    in place): smaller and smaller bodies along the centreline, which curves on backwards, fused through thin dark
    rudimentary discs. The phantom ends at S2; a real sagittal scan shows the whole sacrum, and a localiser that
    learned the spine to end two bodies below L5-S1 would count real scans from the wrong place."""
    s, v, w = ph.spine_coordinates(points, layout, state).T
    top = layout.body[-1, 1]
    depth, width = traits.body_depth[-1], traits.body_width[-1]
    column = np.zeros(len(points))
    marrow = np.zeros(len(points))
    for n, scale in enumerate((0.8, 0.65, 0.5, 0.35)):
        height = traits.body_height[-1] * scale * rng.uniform(0.85, 1.15)
        start, end = top + rng.uniform(1.0, 2.5), top + height
        radial = np.sqrt((v / (depth * scale / 2)) ** 2 + (w / (width * scale / 2)) ** 2) - 1
        sdf = np.maximum.reduce([start - s, s - end, radial * depth * scale / 2])
        column = np.maximum(column, expit(-(sdf - 1.0) / 0.6))  # the cortex, and the dark gaps between segments
        marrow = np.maximum(marrow, expit(-(sdf + 1.3) / 0.6))
        top = end
    texture = 1 + 0.1 * np.cos(0.7 * s + rng.uniform(0, 2 * np.pi)) * np.cos(0.5 * v)
    for c in contrasts:
        image = images[c.name]
        image *= 1 - column
        image += column * c.cortex
        image *= 1 - marrow
        image += marrow * traits.marrow_level * c.marrow_scale * texture


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field of unit-ish s.d.: cells x cells Gaussian values, cubic-interpolated to size x size."""
    return zoom(rng.normal(size=(cells, cells)), size / cells, order=3)[:size, :size]


def acquire(rng: np.random.Generator, stack: np.ndarray, cfg: Randomisation) -> np.ndarray:
    """The scanner and the export on a (slices, size, size) noise-free stack: contrast curve, bias field, texture, blur,
    Rician noise, normalisation to the 99.5th percentile (as the localiser does) and maybe 8 bits."""
    size = stack.shape[-1]
    image = np.clip(stack, 0, None) ** rng.uniform(0.7, 1.5)
    image = image * np.exp(rng.uniform(0, cfg.bias) * _smooth_field(rng, size, 4))
    image = image * (1 + rng.uniform(0, 0.12) * _smooth_field(rng, size, int(rng.integers(12, 32))))
    sigma = rng.uniform(0, cfg.blur_px, 2)
    image = np.stack([gaussian_filter(s, sigma) for s in image])
    scale = float(np.percentile(image, 99)) or 1.0
    noise = rng.uniform(*cfg.noise) * scale
    image = np.hypot(image + rng.normal(0, noise, image.shape), rng.normal(0, noise, image.shape))
    image = image / (float(np.percentile(image, 99.5)) or 1.0)
    if rng.random() < cfg.quantise_share:
        image = np.round(np.clip(image, 0, 1) * 255) / 255
    return image.astype(np.float32)


def render_stacks(rng: np.random.Generator, size: int, contrasts: int,
                  cfg: Randomisation = Randomisation()) -> tuple[list[np.ndarray], list[tuple[str, str, float, float]],
                                                                Plane]:
    """One scene seen under ``contrasts`` random contrasts: (3, size, size) stacks (slice before, at, after the
    plane; or one slice three times), the structure centres in pixels, and the plane."""
    traits, state = random_scene(rng)
    layout = ph.build_layout(traits, state)
    plane = random_plane(rng, layout, state, size, cfg)
    thickness = rng.uniform(*cfg.thickness_mm)
    gap = thickness * rng.uniform(1.0, 1.3)
    single = rng.random() < cfg.single_slice_share
    slices = (0.0,) if single else (-gap, 0.0, gap)
    offsets = (-thickness / 4, thickness / 4)  # partial volume across the slice thickness
    points = np.concatenate([plane.points(s + o) for s in slices for o in offsets])
    drawn = tuple(random_contrast(rng, f"c{n}", cfg) for n in range(contrasts))
    images, _ = ph.render(points, traits, state, drawn, texture_seed=int(rng.integers(2**31)))
    paint_sacrum(images, points, traits, state, layout, drawn, rng)
    stacks = []
    for c in drawn:
        image = images[c.name].reshape(len(slices), len(offsets), size, size).mean(axis=1)
        stacks.append(np.repeat(acquire(rng, image, cfg), 3 // len(slices), axis=0))  # a 2D image: three times
    return stacks, centres(layout, state, plane), plane
