"""Stage demo_cohort: a synthetic archive of lumbar spine MRI studies, written as real DICOM, with its ground truth.

It stands in for a hospital archive such as TwinsUK: families of twins and singletons, a baseline study at one field
strength and, for some subjects, follow-ups 8-12 years later at another, with disc degeneration progressing. Every
study has a 3-plane localizer, a sagittal T1, a sagittal T2 and an axial T2 (one series of angled blocks of 3 to 5
thin slices, a block through each lumbar disc, T12-L1 to L5-S1, so every herniation has axial coverage), one file
per slice in nested folders with opaque names. Patient name, ID, birth date, accession number and dates are fake but
look real: they are the identity that later stages must never leak.

Run (as the workflow lays the cohort out in results/demo_cohort):
    python -m stages.demo_cohort --n-subjects 60 --threads 2 --out-dicom C/dicom --out-labels C/truth/labels \\
        --out-subjects C/truth/subjects.csv --out-studies C/truth/studies.csv --out-gradings C/truth/gradings.csv \\
        --out-landmarks C/truth/landmarks.csv --out-planted C/truth/planted_files.csv --out-key C/pseudonym.key

Writes:
    --out-dicom      the archive: {patient}/{study}/{series}/IM00001 ...
    --out-labels     {series}.nii.gz, the label map of each sagittal T2 series, in its geometry (stages.demo.phantom)
    --out-subjects   patient_id, name, birth date, sex, family, twin, age at baseline, graded
    --out-studies    one row per study: UIDs, date, years from baseline, field strength, vendor, series folders and
                     label map (paths relative to the cohort folder, the one that holds the archive), and the disc
                     each axial slice was planned through (axial_t2_levels, by InstanceNumber, ";"-separated)
    --out-gradings   patient_id, study_uid, level, Pfirrmann grade (1-5), herniation (0/1)
    --out-landmarks  centre, size and axes of every labelled body and disc of every sagittal T2 series
    --out-planted    the deliberately bad files: path (relative to the cohort folder), kind, detail
    --out-key        the demo's own pseudonymisation key, for the ingest stage
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy.special import expit
from tqdm import tqdm

from stages.archive import pseudonym as pn
from stages.core import cli
from stages.core.config import section_config
from stages.core.pool import worker_pool
from stages.demo import genome
from stages.demo import phantom as ph
from stages.demo import synth_dicom as sd

log = logging.getLogger("demo_cohort")

VENDORS: dict[str, dict[str, Any]] = {
    "philips": {"Manufacturer": "Philips Medical Systems", "ManufacturerModelName": "Intera",
                "series": {"loc": "Survey", "t1": "T1W_TSE_SAG", "t2": "T2W_TSE_SAG", "ax": "T2W_TSE_TRA"}},
    "siemens": {"Manufacturer": "SIEMENS", "ManufacturerModelName": "Avanto",
                "series": {"loc": "localizer", "t1": "t1_tse_sag", "t2": "t2_tse_sag", "ax": "t2_tse_tra"}},
    "ge": {"Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "Signa HDxt",
           "series": {"loc": "3-pl loc", "t1": "Sag T1 FSE", "t2": "Sag T2 FSE", "ax": "Ax T2 FSE"}},
}
SURNAMES = ("SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES", "ROBINSON", "WRIGHT",
            "THOMPSON", "EVANS", "WALKER", "WHITE", "ROBERTS", "GREEN", "HALL", "WOOD", "JACKSON", "CLARKE",
            "PATEL", "KHAN", "LEWIS", "HARRIS", "MARTIN", "COOPER", "KING", "LEE", "BAKER", "MORGAN")
FEMALE_NAMES = ("MARGARET", "SUSAN", "PATRICIA", "ELIZABETH", "JANET", "CAROL", "LINDA", "GILLIAN", "PAULINE",
                "ANNE", "HELEN", "JACQUELINE", "CHRISTINE", "BARBARA", "SANDRA", "MAUREEN", "VALERIE", "JEAN")
MALE_NAMES = ("DAVID", "JOHN", "MICHAEL", "PETER", "ROBERT", "ANTHONY", "RICHARD", "STEPHEN", "ALAN", "PAUL")
LEVEL_EFFECT = np.array([-0.6, -0.4, -0.1, 0.2, 0.7, 0.8])  # per LABELLED_DISCS: worse at L4-L5, L5-S1
HERNIATION_LEVEL = np.array([-1.0, -0.6, -0.2, 0.3, 1.0, 1.0])
AXIAL_DISCS = ph.LABELLED_DISCS  # an angled axial block through every lumbar disc (Hou et al. 2023's slices)
AXIAL_SLICES = (3, 5)  # slices per block, drawn per study (Hou et al.: 3 to 5 through a disc)
AXIAL_SPACING_MM, AXIAL_THICKNESS_MM = 3.3, 3.0
AXIAL_FOV_MM = 160.0  # the axial field of view: a smaller matrix at the same pixel size as a 200 mm field would have
AXIAL_MAX_TILT_DEG = 30.0  # how far a block can be angled from the body axis


@dataclass(frozen=True)
class DemoConfig:
    """The ``demo`` section of the config; meaning, range and default of each key are in the config schema."""

    seed: int
    n_subjects: int
    twin_fraction: float
    twin_trait_share: float
    mz_fraction: float
    snps: int
    planted_snps: int
    planted_snp_share: float
    polygenic_share: float
    shared_env_share: float
    degeneration_sd: float
    followup_fraction: float
    second_followup_fraction: float
    followup_years: tuple[float, float]
    baseline_field_t: float
    followup_field_t: float
    age_range: tuple[float, float]
    female_fraction: float
    unlabelled_fraction: float
    matrix: int
    fov_mm: float
    slices: int
    slice_thickness_mm: float
    slice_gap_mm: float
    bad_files: bool
    montage_subjects: int

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> DemoConfig:
        """Validate a (partial) ``demo`` section against the schema, fill its defaults, and build the config."""
        return section_config(cls, "demo", section)

    def __post_init__(self) -> None:
        for name in ("followup_years", "age_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be [min, max] with min <= max, got {[lo, hi]}")


@dataclass(frozen=True)
class DemoOutputs:
    """Where the cohort goes: the archive and the label maps (folders), the truth tables and the key."""

    dicom: Path
    labels: Path
    subjects: Path
    studies: Path
    gradings: Path
    landmarks: Path
    planted: Path
    key: Path
    genotypes: Path
    genetics: Path

    @classmethod
    def in_folder(cls, folder: Path) -> DemoOutputs:
        """The cohort laid out in one folder as the workflow lays out results/demo_cohort."""
        truth = folder / "truth"
        return cls(dicom=folder / "dicom", labels=truth / "labels", subjects=truth / "subjects.csv",
                   studies=truth / "studies.csv", gradings=truth / "gradings.csv", landmarks=truth / "landmarks.csv",
                   planted=truth / "planted_files.csv", key=folder / "pseudonym.key",
                   genotypes=truth / "genotypes.csv", genetics=truth / "genetics.json")

    @property
    def cohort(self) -> Path:
        """The cohort folder, which holds the archive: the truth tables name files relative to it."""
        return self.dicom.parent

    def relative(self, path: Path) -> str:
        """``path`` relative to the cohort folder, as the truth tables name it."""
        return os.path.relpath(path, self.cohort)


OUTPUTS = {
    "dicom": "Folder of the archive (must be empty or absent).",
    "labels": "Folder of the label maps (must be empty or absent).",
    "subjects": "Truth: one row per subject (CSV).",
    "studies": "Truth: one row per study (CSV).",
    "gradings": "Truth: one row per graded disc (CSV).",
    "landmarks": "Truth: every labelled body and disc of every sagittal T2 series (CSV).",
    "planted": "Truth: the deliberately bad files (CSV).",
    "key": "The demo's pseudonymisation key.",
    "genotypes": "The cohort's genotype table: patient_id and one allele dosage (0/1/2) column per SNP (CSV).",
    "genetics": "Truth: the planted heritability of disc degeneration and the planted SNPs (JSON).",
}


@dataclass(frozen=True)
class StudyPlan:
    visit: int
    years: float
    date: dt.date
    time: str
    field_t: float
    vendor: str
    grades: np.ndarray
    herniation: np.ndarray
    accession: str
    folder: str


@dataclass(frozen=True)
class SubjectPlan:
    index: int
    family: int
    twin: bool
    zygosity: str  # MZ, DZ, or empty for a singleton
    genotype: np.ndarray  # allele dosage per SNP of the model (stages.demo.genome)
    female: bool
    patient_id: str
    name: str
    birth_date: dt.date
    age: float  # at baseline
    graded: bool
    folder: str
    studies: tuple[StudyPlan, ...]


def _hex(rng: np.random.Generator, n: int = 8) -> str:
    return "".join(rng.choice(list("0123456789ABCDEF"), n))


def _grades(rng: np.random.Generator, age: float | np.ndarray, subject_effect: float | np.ndarray) -> np.ndarray:
    """Pfirrmann grades per LABELLED_DISCS; with arrays of ages and effects (n x 1), one row per subject."""
    shape = np.broadcast_shapes(np.shape(age), np.shape(subject_effect), LEVEL_EFFECT.shape)
    latent = 1.8 + 0.045 * (np.asarray(age) - 50) + LEVEL_EFFECT + subject_effect + rng.normal(0, 0.6, shape)
    return np.clip(np.rint(latent), 1, 5).astype(int)


def _herniation(rng: np.random.Generator, grades: np.ndarray, before: np.ndarray | None) -> np.ndarray:
    p_new = expit(-4.2 + 0.7 * (grades - 1) + HERNIATION_LEVEL)
    new = rng.random(6) < p_new
    if before is None:
        return new
    return np.where(before, rng.random(6) < 0.8, new)


def genetic_model(cfg: DemoConfig) -> genome.GeneticModel:
    return genome.genetic_model(np.random.default_rng([cfg.seed, 10]), cfg.snps, cfg.planted_snps,
                                cfg.planted_snp_share, cfg.polygenic_share, cfg.shared_env_share)


def plan_cohort(cfg: DemoConfig) -> list[SubjectPlan]:
    """Who is in the cohort, when they were scanned, on what, and the state of their discs. Deterministic."""
    model = genetic_model(cfg)
    rng = np.random.default_rng([cfg.seed, 0])
    n_pairs = int(round(cfg.n_subjects * cfg.twin_fraction / 2))
    sizes = [2] * n_pairs + [1] * (cfg.n_subjects - 2 * n_pairs)
    rng.shuffle(sizes)
    n_fu = int(round(len(sizes) * cfg.followup_fraction))
    has_fu = np.zeros(len(sizes), bool)
    has_fu[rng.permutation(len(sizes))[:n_fu]] = True
    n_unlab = int(round(cfg.n_subjects * cfg.unlabelled_fraction))
    unlabelled = set(rng.permutation(cfg.n_subjects)[:n_unlab].tolist())
    used_ids: set[str] = set()
    subjects: list[SubjectPlan] = []
    epoch = dt.date(1996, 1, 1)
    for family, size in enumerate(sizes):
        frng = np.random.default_rng([cfg.seed, 1, family])
        female = bool(frng.random() < cfg.female_fraction)
        age = float(frng.uniform(*cfg.age_range))
        baseline = epoch + dt.timedelta(days=int(frng.integers(0, 6 * 365)))
        birth = baseline - dt.timedelta(days=int(age * 365.25))
        surname = str(frng.choice(SURNAMES))
        shared_env = float(frng.normal())
        n_fu_here = (1 + int(frng.random() < cfg.second_followup_fraction)) if has_fu[family] else 0
        years = np.sort(frng.uniform(*cfg.followup_years, n_fu_here))
        if n_fu_here == 2 and years[1] - years[0] < 0.5:
            years[1] = years[0] + 0.5
        grng = np.random.default_rng([cfg.seed, 9, family])
        zygosity = ("MZ" if grng.random() < cfg.mz_fraction else "DZ") if size == 2 else ""
        genotypes, inherited = genome.family_liabilities(model, grng, [zygosity or "single"] * size, shared_env)
        for member in range(size):
            index = len(subjects)
            srng = np.random.default_rng([cfg.seed, 2, index])
            while True:
                pid = f"TW{srng.integers(1_000_000, 9_999_999)}"
                if pid not in used_ids:
                    used_ids.add(pid)
                    break
            given = str(srng.choice(FEMALE_NAMES if female else MALE_NAMES))
            effect = cfg.degeneration_sd * (inherited[member] + np.sqrt(model.unique) * float(srng.normal()))
            studies = []
            grades = _grades(srng, age, effect)
            hern = _herniation(srng, grades, None)
            for visit, yrs in enumerate([0.0, *years]):
                if visit:
                    progress = srng.poisson(0.05 * yrs * (1 + 0.5 * np.clip(LEVEL_EFFECT, 0, None)))
                    grades = np.minimum(grades + progress, 5)
                    hern = _herniation(srng, grades, hern)
                field_t = cfg.baseline_field_t if visit == 0 else cfg.followup_field_t
                vendor = "philips" if visit == 0 else str(srng.choice(["siemens", "ge"]))
                date = baseline + dt.timedelta(days=int(round(yrs * 365.25)))
                studies.append(StudyPlan(
                    visit=visit, years=float(yrs), date=date,
                    time=f"{srng.integers(8, 18):02d}{srng.integers(0, 60):02d}{srng.integers(0, 60):02d}",
                    field_t=field_t, vendor=vendor, grades=grades.copy(), herniation=hern.copy(),
                    accession=f"{srng.integers(10_000_000, 99_999_999)}", folder=_hex(srng)))
            subjects.append(SubjectPlan(
                index=index, family=family, twin=size == 2, zygosity=zygosity, genotype=genotypes[member],
                female=female, patient_id=pid,
                name=f"{surname}^{given}", birth_date=birth, age=age, graded=index not in unlabelled,
                folder=_hex(srng), studies=tuple(studies)))
    return subjects


def expected_heritability(cfg: DemoConfig, model: genome.GeneticModel, pairs: int = 4000) -> dict[str, float]:
    """What the observed disc trait (a subject's mean baseline Pfirrmann grade, adjusted for age) shows of the planted
    liability: its MZ and DZ twin correlations in ``pairs`` simulated pairs of each kind (the same liability, ages and
    grading as the cohort; no images), and Falconer's h2 and c2 from them. Lower than the liability's h2: each disc's
    own noise, the rounding to grades and their floor and ceiling are unique to the subject."""
    rng = np.random.default_rng([cfg.seed, 12])
    values = {}
    for kind in ("MZ", "DZ"):
        inherited = np.array([genome.family_liabilities(model, rng, [kind, kind], float(rng.normal()))[1]
                              for _ in range(pairs)])
        effect = cfg.degeneration_sd * (inherited + np.sqrt(model.unique) * rng.normal(size=inherited.shape))
        age = np.repeat(rng.uniform(*cfg.age_range, pairs)[:, None], 2, axis=1)
        trait = _grades(rng, age.reshape(-1, 1), effect.reshape(-1, 1)).mean(axis=1)
        values[kind] = (trait, age.reshape(-1))
    trait = np.concatenate([values[k][0] for k in values])
    age = np.concatenate([values[k][1] for k in values])
    design = np.column_stack([np.ones_like(age), age])
    resid = trait - design @ np.linalg.lstsq(design, trait, rcond=None)[0]
    # the twins' correlations (pairs in both orders: the intraclass correlation), then Falconer's estimates
    r = {kind: float(np.corrcoef(np.r_[p[:, 0], p[:, 1]], np.r_[p[:, 1], p[:, 0]])[0, 1])
         for kind, p in (("mz", resid[:2 * pairs].reshape(-1, 2)), ("dz", resid[2 * pairs:].reshape(-1, 2)))}
    moments = {"r_mz": r["mz"], "r_dz": r["dz"], "h2": 2 * (r["mz"] - r["dz"]), "c2": 2 * r["dz"] - r["mz"],
               "e2": 1 - r["mz"]}
    return {"trait": "mean baseline Pfirrmann grade, adjusted for age", "simulated_pairs_each": pairs,
            **{k: round(float(v), 4) for k, v in moments.items()}}


def subject_traits(cfg: DemoConfig, subject: SubjectPlan) -> ph.SubjectTraits:
    # twins share identity traits as they share genes: MZ twins all of twin_trait_share, DZ twins half of it
    share = cfg.twin_trait_share * {"MZ": 1.0, "DZ": 0.5}.get(subject.zygosity, 0.0)
    return ph.sample_traits(np.random.default_rng([cfg.seed, 5, subject.family]),
                            np.random.default_rng([cfg.seed, 6, subject.index]), share, subject.female)


def study_state(cfg: DemoConfig, subject: SubjectPlan, study: StudyPlan) -> ph.StudyState:
    """Posture and position in the scanner differ a little at every study."""
    rng = np.random.default_rng([cfg.seed, 7, subject.index, study.visit])
    side_rng = np.random.default_rng([cfg.seed, 8, subject.index])  # where a disc herniates is the subject's own
    return ph.StudyState(
        grades=study.grades, herniation=study.herniation, lordosis_delta_deg=float(rng.normal(0, 3)),
        rotation=ph.rotation(*rng.normal(0, 1.5, 3)),
        position=np.array([rng.normal(0, 3), 20 + rng.normal(0, 6), -5 + rng.normal(0, 10)]),
        herniation_side=side_rng.normal(0, 4, 6))


def _da(date: dt.date) -> str:
    return date.strftime("%Y%m%d")


def _render_stack(slices: list[sd.SliceGeometry], traits: ph.SubjectTraits, state: ph.StudyState,
                  contrasts: tuple[ph.Contrast, ...], seed: int, samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render every slice, averaging ``samples`` positions across the slice thickness (partial volume)."""
    thick = slices[0].thickness
    offsets = [0.0] if samples == 1 else list(np.linspace(-thick / 3, thick / 3, samples))
    pts = np.concatenate([g.points(o) for o in offsets for g in slices])
    images, labels = ph.render(pts, traits, state, contrasts, texture_seed=seed)
    shape = (len(offsets), len(slices), slices[0].rows, slices[0].cols)
    centre = offsets.index(min(offsets, key=abs))
    return ({k: v.reshape(shape).mean(axis=0) for k, v in images.items()}, labels.reshape(shape)[centre])


def _limit_tilt(normal: np.ndarray, max_deg: float) -> np.ndarray:
    """Tilt a slice normal back toward the body axis (+z) so the stack is angled at most ``max_deg``, as a technologist
    can angle an axial block only so far."""
    n = normal / np.linalg.norm(normal)
    z = np.array([0.0, 0.0, 1.0])
    angle = np.arccos(np.clip(n @ z, -1, 1))
    if angle <= np.deg2rad(max_deg):
        return n
    across = n - (n @ z) * z
    return np.cos(np.deg2rad(max_deg)) * z + np.sin(np.deg2rad(max_deg)) * across / np.linalg.norm(across)


def _series_header(base: dict[str, Any], study: StudyPlan, number: int, description: str, series_uid: str,
                   te: float, tr: float, image_type: list[str], spacing: float) -> dict[str, Any]:
    return {**base, "SeriesInstanceUID": series_uid, "SeriesNumber": number, "SeriesDescription": description,
            "ProtocolName": description, "SeriesDate": _da(study.date), "SeriesTime": study.time,
            "AcquisitionDate": _da(study.date), "ContentDate": _da(study.date), "EchoTime": f"{te:.1f}",
            "RepetitionTime": f"{tr:.0f}", "ImageType": image_type, "SpacingBetweenSlices": f"{spacing:.2f}"}


def write_subject(cfg: DemoConfig, subject: SubjectPlan, out: DemoOutputs) -> dict[str, list[dict[str, Any]]]:
    """Render and write every study of one subject; return its rows of the truth tables."""
    traits = subject_traits(cfg, subject)
    rows: dict[str, list[dict[str, Any]]] = {"studies": [], "gradings": [], "landmarks": []}
    for study in subject.studies:
        rng = np.random.default_rng([cfg.seed, 9, subject.index, study.visit])
        state = study_state(cfg, subject, study)
        vendor = VENDORS[study.vendor]
        study_uid = sd.uid(cfg.seed, subject.index, study.visit, "study")
        frame_uid = sd.uid(cfg.seed, subject.index, study.visit, "frame")
        age = (study.date - subject.birth_date).days / 365.25
        base = {
            "PatientName": subject.name, "PatientID": subject.patient_id, "PatientBirthDate": _da(subject.birth_date),
            "PatientSex": "F" if subject.female else "M", "PatientAge": f"{int(age):03d}Y",
            "AccessionNumber": study.accession, "InstitutionName": "RIVERSIDE GENERAL HOSPITAL",
            "ReferringPhysicianName": "HOLLOWAY^GRACE", "StudyInstanceUID": study_uid, "StudyID": study.accession[-4:],
            "StudyDate": _da(study.date), "StudyTime": study.time, "StudyDescription": "LUMBAR SPINE",
            "FrameOfReferenceUID": frame_uid, "Manufacturer": vendor["Manufacturer"],
            "ManufacturerModelName": vendor["ManufacturerModelName"], "MagneticFieldStrength": f"{study.field_t:g}",
            "ScanningSequence": "SE", "SequenceVariant": "SK", "MRAcquisitionType": "2D", "BodyPartExamined": "LSPINE",
            "PatientPosition": "HFS",
        }
        acq = ph.Acquisition.for_field(study.field_t, rng)
        study_dir = out.dicom / subject.folder / study.folder
        layout = ph.build_layout(traits, state)
        series_uids = {key: sd.uid(cfg.seed, subject.index, study.visit, key) for key in ("loc", "t1", "t2", "ax")}
        folders = {key: _hex(rng) for key in series_uids}

        # Sagittal T1 and T2: the same slices, slightly oblique, centred on the spine.
        pixel = cfg.fov_mm / cfg.matrix
        spacing = cfg.slice_thickness_mm + cfg.slice_gap_mm
        oblique = ph.rotation(0.0, *rng.normal(0, 1.5, 2))
        row, col = oblique @ np.array([0.0, 1.0, 0.0]), oblique @ np.array([0.0, 0.0, -1.0])
        centre = np.array([state.position[0] + rng.normal(0, 1.5), rng.normal(0, 4), rng.normal(0, 6)])
        sag = sd.stack(centre, row, col, cfg.slices, spacing, pixel, cfg.matrix, cfg.slice_thickness_mm)
        images, labels = _render_stack(sag, traits, state, (ph.T2, ph.T1), rng.integers(2**31), samples=3)
        order = np.arange(cfg.slices) if rng.random() < 0.5 else np.arange(cfg.slices)[::-1]
        timing = {"t2": (rng.uniform(95, 115), rng.uniform(3000, 4500)), "t1": (rng.uniform(9, 14), rng.uniform(450, 650))}
        for number, (key, contrast) in enumerate((("t1", "T1"), ("t2", "T2")), start=2):
            header = _series_header(base, study, number, vendor["series"][key], series_uids[key], *timing[key],
                                    ["ORIGINAL", "PRIMARY", "M", "NORM"], spacing)
            pixels = ph.acquire(images[contrast].ravel(), np.concatenate([g.points() for g in sag]), traits, state, acq, rng)
            pixels = pixels.reshape(cfg.slices, cfg.matrix, cfg.matrix)
            for instance, k in enumerate(order, start=1):
                sop = sd.uid(cfg.seed, subject.index, study.visit, key, instance)
                sd.write(sd.mr_dataset(header, sag[k], instance, sop, pixels[k]), study_dir / folders[key] / f"IM{instance:05d}")

        # Ground truth of the sagittal T2: label map and landmarks in its geometry.
        direction = np.column_stack([row, col, np.cross(row, col)])
        label_img = sitk.GetImageFromArray(labels.astype(np.int16))
        label_img.SetOrigin(tuple(float(x) for x in sag[0].position))
        label_img.SetSpacing((pixel, pixel, spacing))
        label_img.SetDirection(tuple(float(x) for x in direction.ravel()))
        label_path = out.labels / f"{series_uids['t2']}.nii.gz"
        label_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(label_img, str(label_path), useCompression=True)
        for kind, names, intervals, labelmap in (("vertebra", ph.VERTEBRAE, layout.body, ph.VERTEBRA_LABELS),
                                                 ("disc", ph.DISCS, layout.disc, ph.DISC_LABELS)):
            for i, name in enumerate(names):
                if name not in labelmap:
                    continue
                world, axis, anterior = ph.structure_centre(layout, state, float(intervals[i].mean()))
                index = direction.T @ (world - sag[0].position) / np.array([pixel, pixel, spacing])
                if kind == "vertebra":
                    depth, width = traits.body_depth[i], traits.body_width[i]
                else:
                    depth = (traits.body_depth[i] + traits.body_depth[i + 1]) / 2
                    width = (traits.body_width[i] + traits.body_width[i + 1]) / 2
                rows["landmarks"].append({
                    "patient_id": subject.patient_id, "study_uid": study_uid, "series_uid": series_uids["t2"],
                    "structure": kind, "level": name, "label": labelmap[name],
                    "x": world[0], "y": world[1], "z": world[2], "i": index[0], "j": index[1], "k": index[2],
                    "height_mm": float(intervals[i, 1] - intervals[i, 0]), "depth_mm": float(depth), "width_mm": float(width),
                    "axis_x": axis[0], "axis_y": axis[1], "axis_z": axis[2],
                    "anterior_x": anterior[0], "anterior_y": anterior[1], "anterior_z": anterior[2]})

        # Axial T2: one angled block of thin slices through each lumbar disc, in one series (as a technologist plans
        # them on the sagittal), the block's angle limited; the same pixel size as a 200 mm field on the full matrix.
        ax_slices: list[sd.SliceGeometry] = []
        ax_levels: list[str] = []
        ax_matrix = max(16, int(round(cfg.matrix * AXIAL_FOV_MM / 200.0 / 2)) * 2)
        n_ax = int(rng.integers(AXIAL_SLICES[0], AXIAL_SLICES[1] + 1))
        for name in AXIAL_DISCS:
            world, axis, _ = ph.structure_centre(layout, state, float(layout.disc[ph.DISCS.index(name)].mean()))
            a_row, a_col = sd.plane_frame(_limit_tilt(-axis, AXIAL_MAX_TILT_DEG), np.array([1.0, 0.0, 0.0]))
            ax_slices += sd.stack(world, a_row, a_col, n_ax, AXIAL_SPACING_MM, AXIAL_FOV_MM / ax_matrix, ax_matrix,
                                  AXIAL_THICKNESS_MM)
            ax_levels += [name] * n_ax
        ax_images, _ = _render_stack(ax_slices, traits, state, (ph.T2,), rng.integers(2**31), samples=1)
        header = _series_header(base, study, 4, vendor["series"]["ax"], series_uids["ax"], *timing["t2"],
                                ["ORIGINAL", "PRIMARY", "M", "NORM"], AXIAL_SPACING_MM)
        pixels = ph.acquire(ax_images["T2"].ravel(), np.concatenate([g.points() for g in ax_slices]), traits, state, acq, rng)
        pixels = pixels.reshape(len(ax_slices), ax_matrix, ax_matrix)
        for instance, geom in enumerate(ax_slices, start=1):
            sop = sd.uid(cfg.seed, subject.index, study.visit, "ax", instance)
            sd.write(sd.mr_dataset(header, geom, instance, sop, pixels[instance - 1]), study_dir / folders["ax"] / f"IM{instance:05d}")

        # 3-plane localizer: one sagittal, one coronal, one axial image in one series.
        loc_pixel = 400.0 / cfg.matrix
        loc_centre = np.array([state.position[0], 0.0, 0.0])
        loc = [sd.stack(loc_centre, np.array(r), np.array(c), 1, 0, loc_pixel, cfg.matrix, 8.0)[0]
               for r, c in (((0, 1, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, -1)), ((1, 0, 0), (0, 1, 0)))]
        loc_images, _ = _render_stack(loc, traits, state, (ph.T1,), rng.integers(2**31), samples=1)
        header = _series_header(base, study, 1, vendor["series"]["loc"], series_uids["loc"], 5.0, 15.0,
                                ["ORIGINAL", "PRIMARY", "LOCALIZER"], 8.0)
        pixels = ph.acquire(loc_images["T1"].ravel(), np.concatenate([g.points() for g in loc]), traits, state, acq, rng)
        pixels = pixels.reshape(3, cfg.matrix, cfg.matrix)
        for instance, geom in enumerate(loc, start=1):
            sop = sd.uid(cfg.seed, subject.index, study.visit, "loc", instance)
            sd.write(sd.mr_dataset(header, geom, instance, sop, pixels[instance - 1]), study_dir / folders["loc"] / f"IM{instance:05d}")

        rel = lambda key: out.relative(study_dir / folders[key])  # noqa: E731
        rows["studies"].append({
            "patient_id": subject.patient_id, "study_uid": study_uid, "accession_number": study.accession,
            "study_date": study.date.isoformat(), "visit": study.visit, "years_from_baseline": round(study.years, 3),
            "age": round(age, 2), "field_strength_t": study.field_t, "manufacturer": vendor["Manufacturer"],
            "model": vendor["ManufacturerModelName"], "sag_t2_series_uid": series_uids["t2"], "sag_t2_dir": rel("t2"),
            "sag_t1_series_uid": series_uids["t1"], "sag_t1_dir": rel("t1"), "axial_t2_series_uid": series_uids["ax"],
            "axial_t2_dir": rel("ax"), "axial_t2_levels": ";".join(ax_levels), "localizer_series_uid": series_uids["loc"], "localizer_dir": rel("loc"),
            "label_map": out.relative(label_path)})
        if subject.graded:
            for k, level in enumerate(ph.LABELLED_DISCS):
                rows["gradings"].append({"patient_id": subject.patient_id, "study_uid": study_uid, "level": level,
                                         "pfirrmann": int(study.grades[k]), "herniation": int(study.herniation[k])})
    return rows


def plant_bad_files(cfg: DemoConfig, out: Path, studies: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Add a truncated DICOM, a non-DICOM file, a DICOM without pixel data and a duplicate file, in four studies
    (``out``: the cohort folder, which the studies' paths are relative to)."""
    rng = np.random.default_rng([cfg.seed, 10])
    picks = [studies[i] for i in rng.permutation(len(studies))[:4]]
    while len(picks) < 4:
        picks.append(picks[-1])
    planted = []
    # 1. Truncated: a sagittal T1 slice cut off in its pixel data.
    t1_files = sorted((out / picks[0]["sag_t1_dir"]).iterdir())
    victim = t1_files[len(t1_files) // 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.6)])
    planted.append({"path": str(victim.relative_to(out)), "kind": "truncated", "detail": "cut to 60% of its bytes"})
    # 2. Not DICOM: a viewer's lock file inside a study folder.
    junk = out / Path(picks[1]["sag_t2_dir"]).parent / "LOCKFILE"
    junk.write_text("locked by workstation RAD-07\n")
    planted.append({"path": str(junk.relative_to(out)), "kind": "not_dicom", "detail": "plain text"})
    # 3. DICOM without pixel data: a vendor report object in a series of its own.
    src = sorted((out / picks[2]["sag_t2_dir"]).iterdir())[0]
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.SeriesInstanceUID = sd.uid(cfg.seed, "report", picks[2]["study_uid"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sd.uid(cfg.seed, "report-sop", picks[2]["study_uid"])
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = 99, "PhoenixZIPReport", 1
    report = out / Path(picks[2]["sag_t2_dir"]).parent / _hex(rng) / "IM00001"
    sd.write(ds, report)
    planted.append({"path": str(report.relative_to(out)), "kind": "no_pixel_data", "detail": "MR object without PixelData"})
    # 4. Duplicate: a byte copy of a sagittal T2 slice under another name in the same folder.
    original = sorted((out / picks[3]["sag_t2_dir"]).iterdir())[0]
    copy = original.with_name(original.name + "_1")
    shutil.copyfile(original, copy)
    planted.append({"path": str(copy.relative_to(out)), "kind": "duplicate", "detail": str(original.relative_to(out))})
    return planted


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or (list(rows[0]) if rows else [])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_subject_job(job: tuple[DemoConfig, SubjectPlan, DemoOutputs]) -> dict[str, list[dict[str, Any]]]:
    return write_subject(*job)


def generate(cfg: DemoConfig, out: DemoOutputs, workers: int = 1) -> dict[str, int]:
    """Write the whole cohort into ``out`` (which must not hold an older cohort); return counts."""
    if out.key.exists():
        raise FileExistsError(f"{out.key} exists: {out.cohort} already holds a cohort; remove it first")
    for folder in (out.dicom, out.labels):
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; remove it first (the generator never mixes two cohorts)")
    subjects = plan_cohort(cfg)
    log.info("planned %d subjects in %d families, %d studies", len(subjects), len({s.family for s in subjects}),
             sum(len(s.studies) for s in subjects))
    jobs = [(cfg, s, out) for s in subjects]
    if workers > 1:
        with worker_pool(workers) as pool:
            results = list(tqdm(pool.map(_write_subject_job, jobs), total=len(jobs), desc="subjects", mininterval=5))
    else:
        results = [_write_subject_job(j) for j in tqdm(jobs, desc="subjects", mininterval=5)]
    tables: dict[str, list[dict[str, Any]]] = {"studies": [], "gradings": [], "landmarks": []}
    for result in results:
        for key in tables:
            tables[key].extend(result[key])
    _write_csv(out.subjects, [{
        "patient_id": s.patient_id, "patient_name": s.name, "birth_date": s.birth_date.isoformat(),
        "sex": "F" if s.female else "M", "family_id": f"F{s.family:05d}", "twin": int(s.twin), "zygosity": s.zygosity,
        "age_at_baseline": round(s.age, 2), "n_studies": len(s.studies), "graded": int(s.graded)} for s in subjects])
    model = genetic_model(cfg)
    _write_csv(out.genotypes, [{"patient_id": s.patient_id, **dict(zip(model.snps, s.genotype.tolist()))}
                               for s in subjects])
    genome.write_truth(out.genetics, model, cfg.degeneration_sd, expected_heritability(cfg, model))
    _write_csv(out.studies, tables["studies"])
    _write_csv(out.gradings, tables["gradings"], ["patient_id", "study_uid", "level", "pfirrmann", "herniation"])
    _write_csv(out.landmarks, tables["landmarks"])
    # The demo's own pseudonymisation key (a real archive's key comes from the user, never from the repository).
    pn.write_key(out.key, hashlib.sha256(f"spine-ssl demo key {cfg.seed}".encode()).hexdigest().encode())
    planted = plant_bad_files(cfg, out.cohort, tables["studies"]) if cfg.bad_files else []
    _write_csv(out.planted, planted, ["path", "kind", "detail"])
    n_files = sum(len(files) for _, _, files in os.walk(out.dicom))
    counts = {"subjects": len(subjects), "studies": len(tables["studies"]), "files": n_files, "planted": len(planted)}
    log.info("wrote %(subjects)d subjects, %(studies)d studies, %(files)d files (%(planted)d planted bad files)", counts)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.demo_cohort", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (one subject per task; default: 1).")
    cli.add_section_options(parser, "demo")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = DemoConfig.from_config(cli.section_from_args(args, "demo", parser))
    out = DemoOutputs(**cli.outputs_from_args(args, parser, OUTPUTS))
    cli.setup_logging(args.log, "demo_cohort")
    generate(cfg, out, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
