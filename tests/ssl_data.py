"""A small synthetic self-supervision data set in the layout of the splits and extract stages, for the pretraining
tests: subjects (some twins, some with follow-ups) whose vertebral bodies carry a subject-specific texture and a
level-specific bar, split and paired by the splits stage's own functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import levels
from stages.splits import SplitConfig, assign_parts, make_pairs, volume_labels

SHAPE = (5, 48, 48)   # slices, rows, columns: the smallest the Siamese network takes


def _blocks(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """A random field of ``cells`` x ``cells`` constant blocks per slice."""
    field = rng.normal(size=(shape[0], cells, cells))
    return np.kron(field, np.ones((1, shape[1] // cells + 1, shape[2] // cells + 1)))[:, :shape[1], :shape[2]]


def write_ssl_data(root: Path, n_subjects: int = 40, seed: int = 0, shape: tuple[int, int, int] = SHAPE,
                   nuisance: float = 0.0) -> Path:
    """Write ``root/splits/{volumes,pairs,subjects}.parquet`` and ``root/extract/vertebrae.npy``; returns ``root``.

    ``nuisance``: amplitude of a coarse random field drawn anew for every volume (scanner shading, say) that hides
    the finer subject texture from an untrained network's distances; a trained network learns to ignore it."""
    rng = np.random.default_rng(seed)
    subjects, index, arrays = [], [], []
    family = 0
    while len(subjects) < n_subjects:
        size = 2 if rng.random() < 0.4 else 1
        scans = 2 if rng.random() < 0.7 else 1
        for _ in range(size):
            sid = f"sub-{len(subjects):04d}"
            subjects.append({"subject_id": sid, "family_id": f"fam-{family:04d}", "n_scans": scans,
                             "has_followup": scans > 1, "graded": bool(rng.random() < 0.5)})
            texture = _blocks(rng, shape, 6)
            for visit in range(scans):
                for k, level in enumerate(levels.VERTEBRAE):
                    volume = 0.5 * texture + 0.3 * rng.normal(size=shape) + nuisance * _blocks(rng, shape, 2)
                    bar = 4 + 5 * k
                    volume[:, bar:bar + 4, :] += 2.0
                    arrays.append(volume.astype(np.float16))
                    index.append({"array": "vertebrae", "row": len(index), "scan_id": f"scan-{sid}-{visit}",
                                  "subject_id": sid, "study_id": f"ses-{sid}-{visit}",
                                  "days_since_first_study": 3650.0 * visit, "kind": "vertebra", "level": level})
        family += 1
    cfg = SplitConfig.from_config({"downstream_counts": [20, 4, 6]})
    parts = assign_parts(pd.DataFrame(subjects), cfg)
    gradings = pd.DataFrame(columns=["subject_id", "study_id", "level", "pfirrmann", "herniation"])
    volumes = volume_labels(pd.DataFrame(index), gradings, parts)
    pairs = make_pairs(volumes, cfg)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "extract").mkdir(parents=True, exist_ok=True)
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    pairs.to_parquet(root / "splits" / "pairs.parquet", index=False)
    parts.to_parquet(root / "splits" / "subjects.parquet", index=False)
    np.save(root / "extract" / "vertebrae.npy", np.stack(arrays))
    return root


def store_files(root: Path) -> dict[str, Path]:
    """The files pretraining reads from a data set written by :func:`write_ssl_data`, by option name."""
    return {"pairs": root / "splits" / "pairs.parquet", "volumes": root / "splits" / "volumes.parquet",
            "vertebrae": root / "extract" / "vertebrae.npy"}
