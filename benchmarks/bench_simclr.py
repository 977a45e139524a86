"""SimCLR pretraining throughput (issue 21, Hou et al. 2023) and the share of step time spent waiting for data.

Trains the simclr method with the workflow's own harness on a synthetic axial-slice store written to benchmarks/out/
(the splits' volumes.parquet and an axial array of 3 slices per disc), for 2 epochs, and reports the second epoch's
figures (samples = slices, two views each):

- on the CPU at the demo size (48 x 48 slices, ResNet depth 10 at a quarter of the channels, batch 32, 2 threads);
- on a GPU, when PyTorch sees one, at the paper's size (224 x 224 slices, ResNet-50, batch 32, bf16 autocast).

Target: data waiting under 10% of step time; printed with its ratio to the target. Needs MONAI beside PyTorch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core.levels import DISCS
from stages.training.config import PretrainConfig
from stages.training.harness import Outputs, train
from stages.training.methods.simclr import SimclrConfig, SimclrMethod
from stages.training.protocol import configured
from stages.training.store import VolumeStore

OUT = Path(__file__).resolve().parent / "out"
TARGET_WAIT = 0.10


def write_store(root: Path, size: int, n_subjects: int, seed: int = 0) -> Path:
    """Subjects with one study of 6 discs, 3 axial slices each; 90% self-supervision train, 10% val."""
    if (root / "extract" / "axial.npy").exists():
        return root
    rng = np.random.default_rng(seed)
    n = n_subjects * len(DISCS)
    (root / "extract").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(root / "extract" / "axial.npy", mode="w+", dtype=np.float16,
                                      shape=(n, 3, size, size))
    rows = []
    for s in range(n_subjects):
        for level in DISCS:
            row = len(rows)
            array[row] = rng.random((3, size, size), dtype=np.float32).astype(np.float16)
            rows.append({"row": row, "subject_id": f"sub-{s:05d}", "kind": "disc", "level": level,
                         "ssl_part": "val" if s % 10 == 9 else "train", "downstream_part": "none"})
    array.flush()
    pd.DataFrame(rows).to_parquet(root / "splits" / "volumes.parquet", index=False)
    return root


def run(label: str, cfg: PretrainConfig, size: int, n_subjects: int) -> dict:
    root = write_store(OUT / f"simclr_{size}_{n_subjects}", size, n_subjects)
    store = VolumeStore(None, root / "splits" / "volumes.parquet", root / "extract" / "axial.npy", structure="axial")
    started = time.perf_counter()
    metrics = train(SimclrMethod, cfg, store, Outputs.under(OUT / f"simclr_run_{size}"))
    wall = time.perf_counter() - started
    last = metrics[metrics.split == "train"].iloc[-1]
    wait = float(last.data_wait_share)
    print(f"{label}: {last.samples_per_s:.1f} slices/s ({2 * last.samples_per_s:.1f} views/s), data wait "
          f"{100 * wait:.2f}% of step time (target < {100 * TARGET_WAIT:.0f}%: ratio {wait / TARGET_WAIT:.2f}); "
          f"{int(last.samples)} slices in epoch 2; total {wall:.0f} s", flush=True)
    return {"slices_per_s": float(last.samples_per_s), "wait": wait}


def main() -> None:
    common = dict(checkpoint_every=10_000, prefetch=4)
    demo = SimclrConfig(depth=10, widen_factor=0.25, batch_size=32, max_epochs=2, patience=100)
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in demo.__dict__.items()}
    cpu = configured(SimclrMethod, PretrainConfig(**common, device="cpu", threads=2), {"simclr": section})
    run("CPU, demo size 48x48, ResNet-10 x 0.25", cpu, 48, n_subjects=60)
    if not torch.cuda.is_available():
        print("GPU: PyTorch sees no GPU here; run `python -m benchmarks simclr` on a GPU machine for the paper size "
              "(224x224, ResNet-50, bf16)")
        return
    paper = {**section, "depth": 50, "widen_factor": 1.0}
    gpu = configured(SimclrMethod, PretrainConfig(**common, device="cuda", bf16=True, threads=8), {"simclr": paper})
    run(f"GPU {torch.cuda.get_device_name()}, paper size 224x224, ResNet-50, bf16", gpu, 224, n_subjects=120)


if __name__ == "__main__":
    main()
