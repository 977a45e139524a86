"""A small synthetic self-supervision data set in the layout of the splits and extract stages, for the pretraining
tests: subjects (some twins, some with follow-ups) whose vertebral bodies (and, for a disc data set, discs) carry a
subject-specific texture and a level-specific bar, split and paired by the splits stage's own functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import levels
from stages.splits import SplitConfig, assign_parts, make_pairs, volume_labels

SHAPE = (5, 48, 48)        # slices, rows, columns of a vertebral body
DISC_SHAPE = (5, 43, 48)   # of a disc: flatter than a body, at the fewest rows the Siamese network takes
ARRAYS = {"vertebra": "vertebrae.npy", "disc": "discs.npy"}


def _blocks(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """A random field of ``cells`` x ``cells`` constant blocks per slice."""
    field = rng.normal(size=(shape[0], cells, cells))
    return np.kron(field, np.ones((1, shape[1] // cells + 1, shape[2] // cells + 1)))[:, :shape[1], :shape[2]]


def _volume(rng: np.random.Generator, texture: np.ndarray, k: int, n_levels: int, nuisance: float) -> np.ndarray:
    """One volume: the subject's texture, noise, the nuisance field and a bright bar whose row gives level ``k``."""
    shape = texture.shape
    volume = 0.5 * texture + 0.3 * rng.normal(size=shape) + nuisance * _blocks(rng, shape, 2)
    bar = 4 + k * ((shape[1] - 8) // n_levels)
    volume[:, bar:bar + 4, :] += 2.0
    return volume.astype(np.float16)


def write_ssl_data(root: Path, n_subjects: int = 40, seed: int = 0, shape: tuple[int, int, int] = SHAPE,
                   nuisance: float = 0.0, structure: str = "vertebra",
                   disc_shape: tuple[int, int, int] = DISC_SHAPE) -> Path:
    """Write ``root/splits/{volumes,pairs,subjects}.parquet`` and ``root/extract/vertebrae.npy``; returns ``root``.

    ``nuisance``: amplitude of a coarse random field drawn anew for every volume (scanner shading, say) that hides
    the finer subject texture from an untrained network's distances; a trained network learns to ignore it.

    ``structure="disc"``: every scan also has its 6 discs (``root/extract/discs.npy``, volumes of ``disc_shape``,
    listed in volumes.parquet with kind ``disc`` beside the bodies, rows numbered within each array, as the extract
    stage numbers them), and the pairs are drawn on the discs."""
    if structure not in ARRAYS:
        raise ValueError(f"structure must be one of {sorted(ARRAYS)}, got {structure!r}")
    rng = np.random.default_rng(seed)
    subjects, index, arrays = [], [], []
    discs, disc_index = [], []
    family = 0
    while len(subjects) < n_subjects:
        size = 2 if rng.random() < 0.4 else 1
        scans = 2 if rng.random() < 0.7 else 1
        for _ in range(size):
            sid = f"sub-{len(subjects):04d}"
            subjects.append({"subject_id": sid, "family_id": f"fam-{family:04d}", "n_scans": scans,
                             "has_followup": scans > 1, "graded": bool(rng.random() < 0.5)})
            texture = _blocks(rng, shape, 6)
            disc_texture = _blocks(rng, disc_shape, 6) if structure == "disc" else None
            for visit in range(scans):
                scan = {"scan_id": f"scan-{sid}-{visit}", "subject_id": sid, "study_id": f"ses-{sid}-{visit}",
                        "days_since_first_study": 3650.0 * visit}
                for k, level in enumerate(levels.VERTEBRAE):
                    arrays.append(_volume(rng, texture, k, len(levels.VERTEBRAE), nuisance))
                    index.append({"array": "vertebrae", "row": len(index), **scan, "kind": "vertebra", "level": level})
                if disc_texture is not None:
                    for k, level in enumerate(levels.DISCS):
                        discs.append(_volume(rng, disc_texture, k, len(levels.DISCS), nuisance))
                        disc_index.append({"array": "discs", "row": len(disc_index), **scan, "kind": "disc",
                                           "level": level})
        family += 1
    cfg = SplitConfig.from_config({"downstream_counts": [20, 4, 6]})
    parts = assign_parts(pd.DataFrame(subjects), cfg)
    gradings = pd.DataFrame(columns=["subject_id", "study_id", "level", "pfirrmann", "herniation"])
    volumes = volume_labels(pd.DataFrame(index + disc_index), gradings, parts)
    if structure == "disc":
        # the splits stage's own rules on the discs: make_pairs pairs the rows listed as vertebrae, so the disc
        # rows are handed to it under that kind (same level, same part, positives years apart, twin negatives)
        pairs = make_pairs(volumes[volumes.kind == "disc"].assign(kind="vertebra"), cfg)
    else:
        pairs = make_pairs(volumes, cfg)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "extract").mkdir(parents=True, exist_ok=True)
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    pairs.to_parquet(root / "splits" / "pairs.parquet", index=False)
    parts.to_parquet(root / "splits" / "subjects.parquet", index=False)
    np.save(root / "extract" / "vertebrae.npy", np.stack(arrays))
    if structure == "disc":
        np.save(root / "extract" / "discs.npy", np.stack(discs))
    return root


def store_files(root: Path, structure: str = "vertebra") -> dict[str, Path]:
    """The files pretraining on ``structure`` reads from a data set written by :func:`write_ssl_data`, by option
    name (and :class:`stages.training.store.VolumeStore` argument)."""
    return {"pairs": root / "splits" / "pairs.parquet", "volumes": root / "splits" / "volumes.parquet",
            "array": root / "extract" / ARRAYS[structure]}
