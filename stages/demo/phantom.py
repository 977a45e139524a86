"""A synthetic lumbar spine: anatomy, identity traits, disc disease and MR contrast, evaluated at arbitrary points.

The spine is built in a *straightened* frame that follows a curved centreline through the vertebral bodies:
``s`` is the arc length down the spine (mm, 0 at the top of T11), ``v`` the distance anterior of the centreline
and ``w`` the distance to the patient's right. Every structure (bodies, discs, canal, cord, posterior elements,
muscle, fat, abdomen) is a shape in (s, v, w), so endplates are planes normal to the centreline, discs are the
wedges between them, and the whole anatomy bends with the subject's lordosis and scoliosis.

:func:`render` maps points in patient coordinates (DICOM LPS, mm) to an MR intensity and a label, so any series
(sagittal, axial, localizer) is just a grid of points. Labels follow the VerSe numbering for vertebrae
(T12 = 19, L1..L5 = 20..24, S1 = 26) and 100 + the upper vertebra's label for discs (T12-L1 = 119 ... L5-S1 = 124),
as defined in :mod:`stages.core.levels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import expit

from stages.core import levels

# Rendered vertebrae, top to bottom; T11 and S2 frame the field of view and carry no label.
VERTEBRAE: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2")
DISCS: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]))
LABELLED_VERTEBRAE, LABELLED_DISCS = levels.VERTEBRAE, levels.DISCS
VERTEBRA_LABELS, DISC_LABELS, LABEL_NAMES = levels.VERTEBRA_LABELS, levels.DISC_LABELS, levels.LABEL_NAMES

# Population means (mm) per vertebra / disc, from adult lumbar morphometry (rounded).
_BODY_HEIGHT = np.array([23.0, 24.0, 25.0, 26.5, 27.0, 27.0, 26.0, 28.0, 22.0])
_BODY_DEPTH = np.array([28.0, 29.0, 31.0, 33.0, 34.0, 35.0, 35.0, 36.0, 26.0])
_BODY_WIDTH = np.array([38.0, 40.0, 43.0, 45.0, 48.0, 50.0, 52.0, 50.0, 40.0])
_DISC_HEIGHT = np.array([6.0, 7.0, 8.5, 9.5, 10.5, 11.5, 10.5, 2.0])

# Pfirrmann grade 1..5 -> appearance of the nucleus and disc height (index 0 is grade 1).
NUCLEUS_T2 = np.array([0.95, 0.80, 0.52, 0.30, 0.13])
NUCLEUS_SIZE = np.array([1.0, 0.95, 0.80, 0.62, 0.45])
DISC_HEIGHT_FACTOR = np.array([1.0, 0.97, 0.86, 0.70, 0.50])

N_WAVES = 12  # sinusoids per marrow texture component


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    """Rotation matrix R = Rx @ Ry @ Rz from angles in degrees."""
    a, b, c = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


@dataclass(frozen=True)
class Texture:
    """A smooth random field: sum of sinusoids amp * cos(k . x + phase), plus Gaussian focal spots."""

    k: np.ndarray  # (K, 3) wave vectors, rad/mm
    phase: np.ndarray  # (K,)
    amp: np.ndarray  # (K,)
    spots: np.ndarray  # (M, 5): centre in units of the half-sizes (3), radius mm, intensity change

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.cos(x @ self.k.T.astype(x.dtype) + self.phase.astype(x.dtype)) @ self.amp.astype(x.dtype)


def random_texture(rng: np.random.Generator, wavelength_mm: tuple[float, float], scale: float,
                   spot_probability: float = 0.0) -> Texture:
    lam = rng.uniform(*wavelength_mm, N_WAVES)
    k = _unit(rng.normal(size=(N_WAVES, 3))) * (2 * np.pi / lam)[:, None]
    n_spots = int(rng.random() < spot_probability) + int(rng.random() < spot_probability / 3)
    spots = np.column_stack([
        rng.uniform(-0.55, 0.55, (n_spots, 3)),
        rng.uniform(2.5, 5.5, n_spots),
        rng.uniform(0.2, 0.4, n_spots),
    ]) if n_spots else np.zeros((0, 5))
    return Texture(k=k, phase=rng.uniform(0, 2 * np.pi, N_WAVES), amp=rng.uniform(0.3, 1.0, N_WAVES) * scale / np.sqrt(N_WAVES),
                   spots=spots)


@dataclass(frozen=True)
class SubjectTraits:
    """What makes a spine this person's: persists across all of the subject's studies."""

    body_height: np.ndarray  # (9,) mm, per VERTEBRAE
    body_depth: np.ndarray  # (9,) mm, antero-posterior
    body_width: np.ndarray  # (9,) mm, left-right
    concavity: np.ndarray  # (9,) mm, endplate concavity depth
    disc_height: np.ndarray  # (8,) mm, healthy height per DISCS
    lordosis_deg: float
    top_tilt_deg: float
    scoliosis_mm: float
    scoliosis_phase: float
    canal_ap: float
    canal_width: float
    fat_mm: float
    muscle_mm: float
    marrow_level: float
    marrow_family: tuple[Texture, ...]  # per vertebra, shared with a twin
    marrow_own: tuple[Texture, ...]  # per vertebra, the subject's own
    family_weight: float  # weight of the shared texture component

    def marrow(self, index: int, x: np.ndarray) -> np.ndarray:
        fam, own = self.marrow_family[index], self.marrow_own[index]
        return np.sqrt(self.family_weight) * fam(x) + np.sqrt(1 - self.family_weight) * own(x)


def sample_traits(family_rng: np.random.Generator, own_rng: np.random.Generator, share: float,
                  female: bool) -> SubjectTraits:
    """Draw a subject's traits as ``sqrt(share) * family + sqrt(1 - share) * own`` standard normal draws.

    ``family_rng`` yields the same numbers for both twins of a family, so twins share part of each trait;
    for a singleton it is simply another independent stream.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")

    def z(n: int | None = None) -> np.ndarray:
        return np.sqrt(share) * family_rng.normal(size=n) + np.sqrt(1 - share) * own_rng.normal(size=n)

    size = (0.95 if female else 1.0) * (1 + 0.06 * z())
    nv, nd = len(VERTEBRAE), len(DISCS)
    body_height = _BODY_HEIGHT * size * (1 + 0.035 * z(nv))
    body_depth = _BODY_DEPTH * size * (1 + 0.04 * z(nv))
    body_width = _BODY_WIDTH * size * (1 + 0.04 * z(nv))
    concavity = np.clip(1.6 + 0.5 * z(nv), 0.6, 3.0)
    disc_height = _DISC_HEIGHT * size * (1 + 0.06 * z(nd))
    lordosis = float(46 + 7 * z())
    top_tilt = float(8 + 4 * z())
    scoliosis = float(abs(3.0 * z()))
    phase = float(np.pi * (0.5 + 0.3 * z()))
    canal_ap = float(15 + 1.5 * z())
    canal_width = float(22 + 2 * z())
    fat = float(np.clip(16 + 7 * z(), 5, 40))
    muscle = float(np.clip(44 + 6 * z(), 28, 60))
    marrow_level = float(0.47 + 0.04 * z())
    marrow_family = tuple(random_texture(family_rng, (3.0, 12.0), 0.09, 0.35) for _ in VERTEBRAE)
    marrow_own = tuple(random_texture(own_rng, (3.0, 12.0), 0.09, 0.35) for _ in VERTEBRAE)
    return SubjectTraits(body_height, body_depth, body_width, concavity, disc_height, lordosis, top_tilt, scoliosis,
                         phase, canal_ap, canal_width, fat, muscle, marrow_level, marrow_family, marrow_own, share)


@dataclass(frozen=True)
class Contrast:
    """Tissue intensities of one MR weighting (relative to CSF on T2 = 1)."""

    name: str
    air: float
    fat: float
    muscle: float
    marrow_scale: float  # multiplies the subject's marrow level
    cortex: float
    annulus: float
    nucleus: np.ndarray  # (5,) by Pfirrmann grade
    csf: float
    cord: float
    ligament: float
    abdomen: float
    fluid: float
    vessel: float


T2 = Contrast("T2", air=0.0, fat=0.72, muscle=0.20, marrow_scale=1.0, cortex=0.06, annulus=0.22, nucleus=NUCLEUS_T2,
              csf=1.0, cord=0.42, ligament=0.08, abdomen=0.30, fluid=0.85, vessel=0.04)
T1 = Contrast("T1", air=0.0, fat=0.92, muscle=0.30, marrow_scale=1.35, cortex=0.06, annulus=0.28,
              nucleus=np.array([0.40, 0.38, 0.35, 0.32, 0.28]), csf=0.12, cord=0.42, ligament=0.08, abdomen=0.38,
              fluid=0.15, vessel=0.05)
CONTRASTS: dict[str, Contrast] = {"T1": T1, "T2": T2}


@dataclass(frozen=True)
class Acquisition:
    """Scanner-dependent appearance: noise, contrast curve and coil sensitivity."""

    field_t: float
    noise: float  # Rician noise sigma, relative to CSF = 1
    gamma: float  # intensity ** gamma
    coil_decay_mm: float  # signal decays with distance from the spine coil under the back
    scale: float  # stored value of intensity 1.0

    @staticmethod
    def for_field(field_t: float, rng: np.random.Generator) -> Acquisition:
        snr_gain = np.sqrt(field_t / 1.5)
        return Acquisition(field_t=field_t, noise=float(0.024 / snr_gain * rng.uniform(0.9, 1.1)),
                           gamma=float(1.10 - 0.10 * min(field_t, 3.0) / 1.5 + rng.uniform(-0.03, 0.03)),
                           coil_decay_mm=float(70 + 40 * min(field_t, 3.0) / 1.5 + rng.uniform(-10, 10)),
                           scale=float(rng.uniform(900, 1400)))


@dataclass(frozen=True)
class StudyState:
    """One study of a subject: disease state, posture and position in the scanner."""

    grades: np.ndarray  # (6,) Pfirrmann 1..5 per LABELLED_DISCS
    herniation: np.ndarray  # (6,) bool per LABELLED_DISCS
    lordosis_delta_deg: float
    rotation: np.ndarray  # (3, 3) local -> world
    position: np.ndarray  # (3,) world position (LPS mm) of the centre of L3
    herniation_side: np.ndarray = field(default_factory=lambda: np.zeros(6))  # w offset of each herniation, mm

    def all_grades(self) -> np.ndarray:
        """Grades for every rendered disc (DISCS): unlabelled T11-T12 follows T12-L1, S1-S2 is rudimentary."""
        return np.concatenate([[max(1, self.grades[0] - 1)], self.grades, [5]])


@dataclass(frozen=True)
class Layout:
    """Where each vertebra and disc lies along the centreline, and the centreline itself."""

    body: np.ndarray  # (9, 2) [top, bottom] arc length of each vertebral body
    disc: np.ndarray  # (8, 2) [top, bottom] arc length of each disc
    s: np.ndarray  # (P,) samples of arc length
    centre: np.ndarray  # (P, 3) local coordinates of the centreline
    tangent: np.ndarray  # (P, 3) unit, pointing down the spine
    normal: np.ndarray  # (P, 3) unit, anterior
    binormal: np.ndarray  # (P, 3) unit, patient right


def build_layout(traits: SubjectTraits, state: StudyState, step_mm: float = 0.5) -> Layout:
    """Stack bodies and discs along the arc, then bend the arc with lordosis and scoliosis."""
    disc_h = traits.disc_height * DISC_HEIGHT_FACTOR[state.all_grades() - 1]
    body = np.zeros((len(VERTEBRAE), 2))
    disc = np.zeros((len(DISCS), 2))
    s = 0.0
    for i, h in enumerate(traits.body_height):
        body[i] = s, s + h
        s += h
        if i < len(DISCS):
            disc[i] = s, s + disc_h[i]
            s += disc_h[i]
    s_grid = np.arange(-80.0, s + 80.0, step_mm)
    mid = body.mean(axis=1)
    t12, s1 = mid[VERTEBRAE.index("T12")], mid[VERTEBRAE.index("S1")]
    lordosis = np.deg2rad(traits.lordosis_deg + state.lordosis_delta_deg)
    frac = (s_grid - t12) / (s1 - t12)
    # Angle of the tangent from straight down (positive = heading anterior). The lordosis is concentrated in the
    # lower levels (quadratic in arc length), and beyond S1 the sacrum curves on.
    bend = np.where(frac < 0, 0.0, np.where(frac > 1, 1 + 1.6 * (frac - 1), frac**2))
    theta = np.deg2rad(traits.top_tilt_deg) - lordosis * bend
    lateral_slope = traits.scoliosis_mm * np.pi / s * np.cos(np.pi * s_grid / s + traits.scoliosis_phase)
    direction = np.column_stack([lateral_slope, -np.sin(theta), -np.cos(theta)])
    tangent = _unit(direction)
    centre = np.cumsum(tangent * step_mm, axis=0)
    centre -= np.array([np.interp(mid[VERTEBRAE.index("L3")], s_grid, centre[:, j]) for j in range(3)])
    anterior = np.array([0.0, -1.0, 0.0])
    normal = _unit(anterior - (tangent @ anterior)[:, None] * tangent)
    binormal = np.cross(tangent, normal)
    return Layout(body, disc, s_grid, centre, tangent, normal, binormal)


def to_local(points: np.ndarray, state: StudyState) -> np.ndarray:
    """World points -> the subject's local frame (LPS axes, origin at the centre of L3, before posture)."""
    return (points - state.position) @ state.rotation


def spine_coordinates(points: np.ndarray, layout: Layout, state: StudyState) -> np.ndarray:
    """(N, 3) world points -> (N, 3) straightened coordinates (s, v, w)."""
    local = to_local(points, state)
    _, idx = cKDTree(layout.centre[::4]).query(local)
    idx = idx * 4
    d = local - layout.centre[idx]
    return np.column_stack([
        layout.s[idx] + np.einsum("ij,ij->i", d, layout.tangent[idx]),
        np.einsum("ij,ij->i", d, layout.normal[idx]),
        np.einsum("ij,ij->i", d, layout.binormal[idx]),
    ])


def structure_centre(layout: Layout, state: StudyState, s_value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World position, tangent and anterior normal of the centreline at arc length ``s_value``."""
    pick = [np.interp(s_value, layout.s, a) for a in (*layout.centre.T, *layout.tangent.T, *layout.normal.T)]
    c, t, n = np.array(pick[:3]), _unit(np.array(pick[3:6])), _unit(np.array(pick[6:9]))
    r = state.rotation
    return r @ c + state.position, r @ t, r @ n


def _inside(sdf: np.ndarray, edge: float = 0.6) -> np.ndarray:
    """Soft occupancy from a signed distance (negative inside), with partial-volume edge width in mm."""
    return expit(-sdf / edge)


def _ellipse_sdf(a: np.ndarray, b: np.ndarray, ra: float | np.ndarray, rb: float | np.ndarray,
                 power: float = 2.0) -> np.ndarray:
    rho = (np.abs(a / ra) ** power + np.abs(b / rb) ** power) ** (1 / power)
    return (rho - 1) * np.minimum(ra, rb)


def _ellipsoid_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, rx: float, ry: float, rz: float) -> np.ndarray:
    rho = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
    return (rho - 1) * min(rx, ry, rz)


def _box_sdf(x: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    return np.maximum(lo - x, x - hi)


class _Canvas:
    """Images of several contrasts painted together (the geometry is computed once) and a label map."""

    def __init__(self, n: int, contrasts: tuple[Contrast, ...]):
        self.contrasts = contrasts
        self.images = {c.name: np.full(n, c.air, dtype=np.float32) for c in contrasts}
        self.label = np.zeros(n, dtype=np.int16)

    def paint(self, occupancy: np.ndarray, value, sel: np.ndarray | None = None) -> None:
        """Blend ``value(contrast)`` (a callable, or a tissue attribute name) in with soft ``occupancy``."""
        for c in self.contrasts:
            val = getattr(c, value) if isinstance(value, str) else value(c)
            img = self.images[c.name]
            if sel is None:
                img *= 1 - occupancy
                img += occupancy * val
            else:
                img[sel] = img[sel] * (1 - occupancy) + occupancy * val

    def set_label(self, occupancy: np.ndarray, label: int, sel: np.ndarray | None = None,
                  only_background: bool = False) -> None:
        target = self.label if sel is None else self.label[sel]
        hit = occupancy > 0.5
        if only_background:
            hit &= target == 0
        target[hit] = label
        if sel is not None:
            self.label[sel] = target


def _band(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Indices of points whose arc length lies in [lo, hi]."""
    return np.flatnonzero((s >= lo) & (s <= hi))


def render(points: np.ndarray, traits: SubjectTraits, state: StudyState, contrasts: tuple[Contrast, ...] = (T2,),
           texture_seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Noise-free MR intensities (one image per contrast) and labels (0 = background) at world points (N, 3), LPS mm."""
    layout = build_layout(traits, state)
    s, v, w = spine_coordinates(points, layout, state).astype(np.float32).T
    canvas = _Canvas(len(points), contrasts)
    paint = canvas.paint
    mid = layout.body.mean(axis=1)
    depth = np.interp(s, mid, traits.body_depth).astype(np.float32)
    half_w = np.interp(s, mid, traits.body_width).astype(np.float32) / 2
    canal_front = -depth / 2 - 1.0
    canal_back = canal_front - traits.canal_ap - 2.5
    lamina_back = canal_back - 6.0
    study_rng = np.random.default_rng(texture_seed)

    # Body outline: the back and belly follow the lordosis only loosely (local frame, not the spine's).
    # Subcutaneous fat inside it, muscle behind and around the spine, abdomen in front.
    local = to_local(points, state).astype(np.float32)
    back_y, front_y = _outline(traits, layout, local[:, 2])
    centre_y, radius_y = (back_y + front_y) / 2, (back_y - front_y) / 2
    paint(_inside(_ellipse_sdf(local[:, 1] - centre_y, local[:, 0], radius_y, 150.0, 3.0), 1.0), "fat")
    inner = _inside(_ellipse_sdf(local[:, 1] - centre_y, local[:, 0], radius_y - traits.fat_mm, 150.0 - traits.fat_mm,
                                 3.0), 1.0)
    muscle_tex = 1 + 0.12 * np.cos(0.9 * s + 0.4 * w) * np.cos(0.35 * v)
    posterior = expit(-(v + depth / 4) / 3.0)
    paint(inner * posterior, lambda c: c.muscle * muscle_tex)
    abdomen_tex = random_texture(study_rng, (20.0, 60.0), 1.0)(local)
    fluid = abdomen_tex > 1.1
    paint(inner * (1 - posterior), lambda c: np.where(fluid, c.fluid, c.abdomen * (1 + 0.3 * abdomen_tex)))
    # Psoas muscles, anterolateral to the bodies, growing down the lumbar spine.
    s_l1 = mid[VERTEBRAE.index("L1")]
    psoas_r = np.clip((s - s_l1) / 6.0, 0, 22)
    for side in (-1, 1):
        paint(_inside(_ellipse_sdf(v - 8, w - side * (half_w + psoas_r * 0.9), psoas_r * 0.8 + 1e-3, psoas_r + 1e-3)),
              lambda c: c.muscle * 1.1)
    # Great vessels: aorta on the left (negative w), down to L4; IVC on the right.
    s_l4 = mid[VERTEBRAE.index("L4")]
    paint(_inside(np.maximum(_ellipse_sdf(v - depth / 2 - 13, w + 12, 10.0, 10.0), s - s_l4)), "vessel")
    paint(_inside(np.maximum(_ellipse_sdf(v - depth / 2 - 14, w - 17, 9.0, 12.0), s - s_l4 - 10)),
          lambda c: c.vessel * 3)

    # Spinal canal: epidural fat, thecal sac (CSF) ending at S2, cord to the conus at L1-L2, cauda below.
    s_s1, s_s2 = mid[VERTEBRAE.index("S1")], mid[VERTEBRAE.index("S2")]
    taper = np.clip((s_s2 - s) / (s_s2 - s_s1), 0.0, 1.0)
    canal = _box_sdf(v, canal_back, canal_front)
    paint(taper * _inside(np.maximum(canal, np.abs(w) - traits.canal_width / 2 - 1)), "fat")
    sac_v = canal_front - 0.5 - traits.canal_ap / 2
    paint(_inside(_ellipse_sdf(v - sac_v, w, traits.canal_ap / 2 * taper + 1e-3, traits.canal_width / 2 * taper + 1e-3)),
          "csf")
    s_conus = layout.disc[DISCS.index("L1-L2")].mean()
    cord_r = np.clip((s_conus - s) / 15.0, 0, 1) ** 0.5
    paint(_inside(_ellipse_sdf(v - sac_v - 1.0, w, 4.0 * cord_r + 1e-3, 5.0 * cord_r + 1e-3)), "cord")
    cauda = (s > s_conus - 5) * taper
    paint(0.55 * cauda * _inside(_ellipse_sdf(v - sac_v + traits.canal_ap * 0.22, w, 2.5, 5.5)), "cord")

    # Posterior elements of each vertebra (pedicles, laminae, spinous process, facets) and interspinous ligaments.
    for i, name in enumerate(VERTEBRAE[:-1]):
        top, bottom = layout.body[i]
        h = bottom - top
        below = layout.disc[i, 1] - layout.disc[i, 0]
        sel = _band(s, top - 3, bottom + below + 0.8 * h + 15)
        ss, vv, ww, cb, lb, cf = s[sel], v[sel], w[sel], canal_back[sel], lamina_back[sel], canal_front[sel]
        half_canal = traits.canal_width / 2
        pedicle = np.maximum.reduce([_box_sdf(ss, top + 0.15 * h, top + 0.6 * h), _box_sdf(vv, cb, cf + 1),
                                     _box_sdf(np.abs(ww), half_canal, half_canal + 8)])
        lamina = np.maximum.reduce([_box_sdf(ss, top + 0.2 * h, bottom + 0.4 * below), _box_sdf(vv, lb, cb),
                                    np.abs(ww) - half_canal - 5])
        facet = np.maximum.reduce([_box_sdf(ss, bottom - 0.25 * h, bottom + below + 0.2 * h), _box_sdf(vv, lb - 2, cb + 4),
                                   _box_sdf(np.abs(ww), half_canal + 3, half_canal + 14)])
        facet = np.maximum(facet, 0.8 - np.abs(ss - (bottom + below / 2)))  # the joint space
        elements = np.minimum.reduce([pedicle, lamina, facet])
        if not name.startswith("S"):
            # Spinous process: an elongated plate sloping down and back from the lamina.
            along = lb + 1 - vv
            sp_centre = top + 0.5 * h + 0.35 * along
            spinous = np.maximum(_ellipse_sdf(ss - sp_centre, along - 15.0, 0.27 * h, 16.0), np.abs(ww) - 3.5)
            elements = np.minimum(elements, spinous)
            ligament = np.maximum.reduce([_box_sdf(vv, lb - 28, lb), np.abs(ww) - 2.0,
                                          _box_sdf(ss, bottom - 0.1 * h, bottom + below + 0.3 * h)])
            paint(0.7 * _inside(ligament), "ligament", sel)
        paint(_inside(elements), "cortex", sel)
        paint(_inside(elements + 1.2), lambda c: traits.marrow_level * c.marrow_scale * 0.9, sel)

    # Vertebral bodies: cortical shell, marrow with the subject's texture and focal spots, concave endplates.
    grades = state.all_grades()
    for i, name in enumerate(VERTEBRAE):
        top, bottom = layout.body[i]
        sel = _band(s, top - 3, bottom + 3)
        ss, vv, ww = s[sel], v[sel], w[sel]
        half_d, half_wd = traits.body_depth[i] / 2, traits.body_width[i] / 2
        rho2 = np.clip((vv / half_d) ** 2 + (ww / half_wd) ** 2, 0, 1)
        dip = traits.concavity[i] * (1 - rho2)
        sdf = np.maximum.reduce([top + dip - ss, ss - (bottom - dip), _ellipse_sdf(vv, ww, half_d, half_wd, 2.3)])
        near = sdf < 3.0
        sel, sdf = sel[near], sdf[near]
        outer, inner = _inside(sdf), _inside(sdf + 1.3)
        local_b = np.column_stack([s[sel] - (top + bottom) / 2, v[sel], w[sel]])
        marrow = 1 + traits.marrow(i, local_b)
        tex = traits.marrow_own[i] if traits.marrow_own[i].spots.size else traits.marrow_family[i]
        for cs, cv, cw, radius, delta in tex.spots:
            centre = np.array([cs * (bottom - top) / 2, cv * half_d, cw * half_wd])
            marrow = marrow + delta * np.exp(-np.sum((local_b - centre) ** 2, axis=1) / (2 * radius**2))
        # Basivertebral vein: a bright notch in the middle of the posterior wall.
        vein = 0.25 * np.exp(-((local_b[:, 0] / 3) ** 2 + ((local_b[:, 1] + half_d) / 3) ** 2 + (local_b[:, 2] / 4) ** 2))
        paint(outer, "cortex", sel)
        paint(inner, lambda c: traits.marrow_level * c.marrow_scale * marrow + vein, sel)
        if name in VERTEBRA_LABELS:
            canvas.set_label(outer, VERTEBRA_LABELS[name], sel)

    # Discs between the endplates: annulus and nucleus, whose signal, size and height fall with the grade.
    for j, name in enumerate(DISCS):
        above, below = j, j + 1
        top, bottom = layout.disc[j]
        sel = _band(s, top - traits.concavity[above] - 3, bottom + traits.concavity[below] + 3)
        ss, vv, ww = s[sel], v[sel], w[sel]
        half_d = (traits.body_depth[above] + traits.body_depth[below]) / 4 + 0.8
        half_wd = (traits.body_width[above] + traits.body_width[below]) / 4 + 0.5
        g = int(grades[j])
        bulge = 1.5 if g >= 4 else 0.0
        rho2 = np.clip((vv / half_d) ** 2 + (ww / half_wd) ** 2, 0, 1)
        dip_up = traits.concavity[above] * (1 - rho2)
        dip_dn = traits.concavity[below] * (1 - rho2)
        sdf = np.maximum.reduce([top - dip_up - ss, ss - (bottom + dip_dn),
                                 _ellipse_sdf(vv, ww, half_d + bulge, half_wd + bulge, 2.3)])
        occupancy = _inside(sdf)
        paint(occupancy, lambda c: c.annulus * (0.6 if g == 5 else 1.0), sel)
        size = NUCLEUS_SIZE[g - 1]
        height = (bottom - top) / 2 + 0.5 * (traits.concavity[above] + traits.concavity[below]) / 2
        centre_s = (top + bottom) / 2
        nuc = _ellipsoid_sdf(ss - centre_s, vv + 0.12 * half_d, ww, 0.75 * height * size, 0.62 * half_d * size,
                             0.62 * half_wd * size)
        cleft = 1 - 0.45 * np.exp(-((ss - centre_s) / 0.9) ** 2) if g == 2 else 1.0  # grade 2: a dark band
        paint(_inside(nuc, 0.6 + 0.5 * (g - 1)), lambda c: c.nucleus[g - 1] * cleft, sel)
        if name in DISC_LABELS:
            canvas.set_label(occupancy, DISC_LABELS[name], sel)
            k = LABELLED_DISCS.index(name)
            if state.herniation[k]:
                hern = _ellipsoid_sdf(ss - centre_s, vv + half_d + 1.0, ww - state.herniation_side[k],
                                      0.5 * (bottom - top) + 1.0, 5.0, 7.0)
                occ = _inside(hern, 0.8)
                paint(occ, lambda c: 0.5 * (c.nucleus[g - 1] + c.annulus) + 0.1, sel)
                canvas.set_label(occ, DISC_LABELS[name], sel, only_background=True)
    return canvas.images, canvas.label


def _outline(traits: SubjectTraits, layout: Layout, z_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local y (posterior positive) of the skin of the back and of the belly at each local z."""
    lumbar = (layout.s >= layout.body[1, 0]) & (layout.s <= layout.body.mean(axis=1)[-2])  # top of T12 to mid S1
    z, y = layout.centre[lumbar, 2], layout.centre[lumbar, 1]
    order = np.argsort(z)
    spine_y = np.interp(z_local, z[order], y[order])
    back = 0.15 * spine_y + traits.body_depth.mean() / 2 + traits.canal_ap + 9.5 + traits.muscle_mm + traits.fat_mm
    return back, 0.3 * spine_y - 165.0


def acquire(image: np.ndarray, points: np.ndarray, traits: SubjectTraits, state: StudyState, acq: Acquisition,
            rng: np.random.Generator) -> np.ndarray:
    """Apply the scanner: contrast curve, coil sensitivity falling off from the back, Rician noise; stored units."""
    local = to_local(points, state)
    back, _ = _outline(traits, build_layout(traits, state), local[:, 2])
    coil = 0.45 + 0.55 * np.exp(-np.clip(back - local[:, 1], 0, None) / acq.coil_decay_mm)
    signal = np.clip(image, 0, None) ** acq.gamma * coil
    noisy = np.hypot(signal + rng.normal(0, acq.noise, signal.shape), rng.normal(0, acq.noise, signal.shape))
    return noisy * acq.scale
