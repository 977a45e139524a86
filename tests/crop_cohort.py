"""A small crop-table cohort written by the tests: 2D PNG and 3D NPY crops, a spreadsheet with its own column names,
mixed level notations, and a few bad rows (a missing file, an unreadable image, a duplicated row, an unknown level,
a grade out of range).

Bodies are bright blocks whose height grows down the spine (so the level can be learned), with the halves of their
discs at the top and bottom edges; discs are ellipses whose brightness falls with their Pfirrmann grade and which
widen when herniated. Subjects 0-5 have two
acquisitions (T1 and T2, a year apart: the positive pairs), subjects 6-13 one; subjects 12 and 13 are twins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

VERTEBRAE = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
COLUMNS = {"path": "File", "subject": "Patient", "study": "Sequence", "time": "ScanDate", "structure": "Anatomy",
           "level": "Lvl", "family": "Kinship", "pfirrmann": "Pfirrmann Grade", "herniation": "Hernia"}
N_BAD = 5  # bad rows appended after the good ones


def body(level: int, above: int, below: int, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A body whose height grows down the spine, with the halves of the discs above and below (graded ``above``,
    ``below``) at its top and bottom edges, as a body crop with a margin shows them."""
    h, w = shape
    image = rng.normal(20, 5, shape)
    half = int(h * (0.22 + 0.03 * level))
    image[h // 2 - half:h // 2 + half, w // 6:5 * w // 6] += 150 + rng.normal(0, 5)
    edge = max(2, h // 2 - half - 1)
    image[:edge, w // 5:4 * w // 5] += 230 - 40 * above
    image[h - edge:, w // 5:4 * w // 5] += 230 - 40 * below
    return np.clip(image, 0, 255)


def disc(grade: int, herniated: int, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 2.6 + 4 * herniated)) ** 2 <= 1
    image = rng.normal(20, 5, shape)
    image[inside] += 230 - 40 * grade
    return np.clip(image, 0, 255)


def _png(path: Path, image: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.uint8)), str(path))


def write_crop_cohort(root: Path, n_subjects: int = 14, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Write the images and ``crops.csv`` under ``root``; return the table's path and the expected counts."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in range(n_subjects):
        acquisitions = [("T1", "2019-03-01"), ("T2", "2020-03-01")] if subject < 6 else [("T2", "2021-05-05")]
        grades = rng.integers(1, 6, len(DISCS))
        hernias = (rng.random(len(DISCS)) < 0.3).astype(int)
        three_d = subject % 2 == 0
        family = "twins-A" if subject in (12, 13) else f"family-{subject}"
        for sequence, date in acquisitions:
            for kind, names in (("vertebra", VERTEBRAE), ("disc", DISCS)):
                for i, name in enumerate(names):
                    shape = (40, 48) if kind == "vertebra" else (20, 40)
                    around = (grades[i - 1] if i > 0 else 3, grades[i] if i < len(DISCS) else 3)
                    images = [body(i, *around, rng, shape) if kind == "vertebra"
                              else disc(grades[i], hernias[i], rng, shape)
                              for _ in range(5 if three_d else 1)]
                    stem = f"Patient{subject:03d}_{sequence}_{name.replace('-', '')}"
                    if three_d:
                        file = f"images/{stem}.npy"
                        np.save(root / file, np.stack(images).astype(np.float32))
                    else:
                        file = f"images/{stem}.png"
                        _png(root / file, images[0])
                    # mixed notations: L4-L5 / L4/L5 / L4L5 / numbers from the sacrum (with the structure)
                    style = (subject + i) % 4
                    if style == 3:
                        level = str(len(VERTEBRAE) - 1 - i)  # from the sacrum: L5 = 1, S1 = 0; L5-S1 = 1
                    elif kind == "disc":
                        level = [name, name.replace("-", "/"), name.replace("-", "")][style]
                    else:
                        level = name
                    rows.append({"File": file, "Patient": f"Patient{subject:03d}", "Sequence": sequence,
                                 "ScanDate": date, "Anatomy": "VB" if kind == "vertebra" else "IVD", "Lvl": level,
                                 "Kinship": family,
                                 "Pfirrmann Grade": int(grades[i]) if kind == "disc" else "",
                                 "Hernia": int(hernias[i]) if kind == "disc" else ""})
    good = len(rows)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    bad = [
        {**rows[0], "File": "images/not_there.png"},                     # missing file
        {**rows[1], "File": "images/broken.png", "Lvl": "L1", "Sequence": "T9"},  # unreadable image
        dict(rows[2]),                                                   # duplicated row
        {**rows[3], "Lvl": "T11", "Sequence": "T7"},                      # unknown level
        {**rows[len(VERTEBRAE)], "Pfirrmann Grade": 7, "Sequence": "T8"},  # grade out of range
    ]
    assert len(bad) == N_BAD
    table = pd.DataFrame(rows + bad)
    path = root / "crops.csv"
    table.to_csv(path, index=False)
    return path, {"rows": len(table), "good": good, "bad": len(bad)}
