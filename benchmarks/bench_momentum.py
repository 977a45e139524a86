"""Pretraining throughput of the momentum-encoder family (issue 22): moco, byol and longitudinal_nce beside the
Siamese network, the reference, with the workflow's own harness on the synthetic store of bench_pretrain.

Each method trains 2 epochs on the CPU at the demo size (9 x 64 x 64 volumes, width 0.125, batch 32, 2 threads;
the demo's section values: heads 512 -> 128, queue 256); the second epoch's volumes per second (a Siamese sample is a
pair of volumes, a momentum method's one volume seen in two views) and its share of time waiting for data are
printed, with the ratio of each method's volumes/s to the Siamese network's. On a GPU (when PyTorch sees one) the
same at the paper's size (9 x 224 x 224, full width, bf16). Run ``python -m benchmarks momentum``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.bench_pretrain import OUT, open_store, write_store
from stages.training.config import PretrainConfig
from stages.training.harness import Outputs, train
from stages.training.protocol import configured
from stages.training.registry import METHODS

DEMO_SECTION = {"momentum": 0.99, "hidden_dim": 512, "projection_dim": 128, "batch_norm": True, "batch_size": 32,
                "learning_rate": 0.03, "max_epochs": 2}
QUEUE = {"queue_size": 256}


def measure(method: str, cfg: PretrainConfig, shape: tuple[int, int, int], n_subjects: int, label: str) -> float:
    """Volumes per second of ``method``'s second epoch."""
    root = write_store(OUT / f"pretrain_{'x'.join(map(str, shape))}_{n_subjects}", shape, n_subjects)
    build = METHODS[method]
    section = {**DEMO_SECTION, **(QUEUE if method in ("moco", "longitudinal_nce") else {})}
    run_cfg = configured(build, cfg, {method: section})
    started = time.perf_counter()
    metrics = train(build, run_cfg, open_store(root), Outputs.under(OUT / f"momentum_run_{label}_{method}"))
    last = metrics[metrics.split == "train"].iloc[-1]
    volumes = last.samples_per_s * (2 if method == "siamese" else 1)
    print(f"{label}, {method}: {volumes:.1f} volumes/s ({last.samples_per_s:.1f} {build.unit}/s), data wait "
          f"{100 * last.data_wait_share:.2f}% of step time; total {time.perf_counter() - started:.0f} s", flush=True)
    return float(volumes)


def compare(label: str, cfg: PretrainConfig, shape: tuple[int, int, int], n_subjects: int) -> None:
    reference = measure("siamese", cfg, shape, n_subjects, label)
    for method in ("moco", "byol", "longitudinal_nce"):
        volumes = measure(method, cfg, shape, n_subjects, label)
        print(f"{label}, {method}: {volumes / reference:.2f} x the Siamese network's volumes/s (the reference)",
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
