"""Pretraining throughput of the momentum-encoder family (issue 22): moco, byol, longitudinal_nce and mlsscl (and moco
and mlsscl on the 3D ResNet-18 backbone) beside
the Siamese network, the reference, with the workflow's own harness on the synthetic store of bench_pretrain (mlsscl:
one lumbar region per study of that store, 80 x 40 x 20 voxels as the demo's at 3 mm, four clips of 9 x 64 x 64 each
sample).

Each method trains 2 epochs on the CPU at the demo size (9 x 64 x 64 volumes, width 0.125, batch 32, 2 threads;
the demo's section values: heads 512 -> 128, queue 256); the second epoch's volumes per second (a Siamese sample is a
pair of volumes, a momentum method's one volume seen in two views, mlsscl's one region cut into four clips: the clips
are counted) and its share of time waiting for data are printed, with the ratio of each method's volumes/s to the
Siamese network's. On a GPU (when PyTorch sees one) the same at the paper's size (9 x 224 x 224, full width, bf16).
Run ``python -m benchmarks momentum``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_pretrain import OUT, open_store, write_store
from stages.core.levels import REGION_LEVEL
from stages.training.config import PretrainConfig
from stages.training.harness import Outputs, train
from stages.training.protocol import configured
from stages.training.registry import METHODS
from stages.training.store import VolumeStore

DEMO_SECTION = {"momentum": 0.99, "hidden_dim": 512, "projection_dim": 128, "batch_norm": True, "batch_size": 32,
                "learning_rate": 0.03, "max_epochs": 2}
QUEUE = {"queue_size": 256}


REGION = (80, 40, 20)   # the demo's lumbar regions: 240 x 120 x 60 mm at 3 mm


def region_store(root: Path) -> VolumeStore:
    """A lumbar region (random values) for each study of the bench_pretrain store at ``root``, listed as the
    lumbar_regions stage lists them."""
    if not (root / "regions.npy").exists():
        bodies = pd.read_parquet(root / "splits" / "volumes.parquet")
        scans = bodies.iloc[::7][["subject_id", "ssl_part", "downstream_part"]].reset_index(drop=True)
        rng = np.random.default_rng(0)
        np.save(root / "regions.npy", rng.random((len(scans), *REGION), dtype=np.float32).astype(np.float16))
        scans.assign(row=np.arange(len(scans)), kind="region", level=REGION_LEVEL).to_parquet(
            root / "regions.parquet", index=False)
    return VolumeStore(None, root / "regions.parquet", root / "regions.npy", structure="region")


def measure(method: str, cfg: PretrainConfig, shape: tuple[int, int, int], n_subjects: int, label: str,
            backbone: str = "trunk") -> float:
    """Volumes per second of ``method``'s second epoch (on ``backbone``: the Siamese trunk or the ResNet-18)."""
    root = write_store(OUT / f"pretrain_{'x'.join(map(str, shape))}_{n_subjects}", shape, n_subjects)
    build = METHODS[method]
    section = {**DEMO_SECTION, **(QUEUE if method in ("moco", "longitudinal_nce", "mlsscl") else {})}
    if method != "siamese":
        section["backbone"] = backbone
    if method == "mlsscl":
        section.update(clip_slices=shape[0], clip_size=list(shape[1:]))
    run_cfg = configured(build, cfg, {getattr(build, "section", None) or method: section})
    store = region_store(root) if method == "mlsscl" else open_store(root)
    started = time.perf_counter()
    metrics = train(build, run_cfg, store, Outputs.under(OUT / f"momentum_run_{label}_{method}_{backbone}"))
    last = metrics[metrics.split == "train"].iloc[-1]
    volumes = last.samples_per_s * {"siamese": 2, "mlsscl": 4}.get(method, 1)
    name = method if backbone == "trunk" else f"{method} ({backbone})"
    print(f"{label}, {name}: {volumes:.1f} volumes/s ({last.samples_per_s:.1f} {build.unit}/s), data wait "
          f"{100 * last.data_wait_share:.2f}% of step time; total {time.perf_counter() - started:.0f} s", flush=True)
    return float(volumes)


def compare(label: str, cfg: PretrainConfig, shape: tuple[int, int, int], n_subjects: int) -> None:
    reference = measure("siamese", cfg, shape, n_subjects, label)
    for method, backbone in (("moco", "trunk"), ("byol", "trunk"), ("longitudinal_nce", "trunk"), ("mlsscl", "trunk"),
                             ("moco", "resnet18"), ("mlsscl", "resnet18")):
        volumes = measure(method, cfg, shape, n_subjects, label, backbone)
        name = method if backbone == "trunk" else f"{method} ({backbone})"
        print(f"{label}, {name}: {volumes / reference:.2f} x the Siamese network's volumes/s (the reference)",
              flush=True)


def main() -> None:
    torch.manual_seed(0)
    common = dict(batch_size=32, max_epochs=2, lr_drops=10, plateau_patience=100, checkpoint_every=10_000,
                  dropout=0.0, prefetch=4, eval_batch_size=64)
    compare("CPU, demo size 9x64x64, width 0.125", PretrainConfig(**common, device="cpu", threads=2, width=0.125),
            (9, 64, 64), n_subjects=48)
    if not torch.cuda.is_available():
        print("GPU: PyTorch sees no GPU here; run `python -m benchmarks momentum` on a GPU machine for the paper size")
        return
    compare(f"GPU {torch.cuda.get_device_name()}, paper size 9x224x224, width 1.0, bf16",
            PretrainConfig(**common, device="cuda", bf16=True, threads=8, width=1.0), (9, 224, 224), n_subjects=96)


if __name__ == "__main__":
    main()
