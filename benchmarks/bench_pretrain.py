"""Pretraining throughput and the share of step time spent waiting for data (issue 6).

Trains the Siamese network with the workflow's own harness (``stages.training.harness.train``) on a synthetic pair store
written to benchmarks/out/ (same layout as the splits and extract stages), for 2 epochs, and reports the second
epoch's figures from the harness's metrics (samples = pairs; the first epoch includes warm-up):

- on the CPU at the demo size (9 x 64 x 64 volumes, width 0.125, batch 32, 2 threads);
- on a GPU, when PyTorch sees one, at the paper's size (9 x 224 x 224, full VGG-M width, batch 32, bf16 autocast),
  with the model FLOPs utilisation: FLOPs of a training step (forward and backward, counted by PyTorch's
  FlopCounterMode) times steps per second, over the GPU's dense bf16 peak.

Target: data waiting under 10% of step time on both; printed with its ratio to the target.
Needs only PyTorch, numpy, pandas, pyarrow, PyYAML and tqdm (all on the GPU machines): run it there with
``python -m benchmarks pretrain``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core.levels import VERTEBRAE
from stages.training.config import PretrainConfig
from stages.training.harness import Outputs, train
from stages.training.methods.siamese import SiameseMethod
from stages.training.store import VolumeStore

OUT = Path(__file__).resolve().parent / "out"
TARGET_WAIT = 0.10
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def write_store(root: Path, shape: tuple[int, int, int], n_subjects: int, seed: int = 0) -> Path:
    """Subjects with two studies each, 7 vertebral bodies per study; 90% self-supervision train, 10% val; every
    positive pair (same subject and level) and as many negatives (another subject, same level)."""
    if (root / "extract" / "vertebrae.npy").exists():
        return root
    rng = np.random.default_rng(seed)
    n = n_subjects * 2 * len(VERTEBRAE)
    (root / "extract").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(root / "extract" / "vertebrae.npy", mode="w+", dtype=np.float16,
                                      shape=(n, *shape))
    rows = []
    for s in range(n_subjects):
        part = "val" if s % 10 == 9 else "train"
        for visit in range(2):
            for level in VERTEBRAE:
                row = len(rows)
                array[row] = rng.random(shape, dtype=np.float32).astype(np.float16)
                rows.append({"row": row, "subject_id": f"sub-{s:05d}", "kind": "vertebra", "level": level,
                             "ssl_part": part, "downstream_part": "none"})
    array.flush()
    volumes = pd.DataFrame(rows)
    pairs = []
    for (subject, level), g in volumes.groupby(["subject_id", "level"]):
        a, b = g.row.to_numpy()
        part = g.ssl_part.iloc[0]
        pairs.append({"part": part, "a": a, "b": b, "level": level, "positive": True, "hard": False, "years": 10.0})
        others = volumes[(volumes.level == level) & (volumes.ssl_part == part) & (volumes.subject_id != subject)]
        pairs.append({"part": part, "a": a, "b": int(others.row.iloc[rng.integers(len(others))]), "level": level,
                      "positive": False, "hard": False, "years": np.nan})
    volumes.to_parquet(root / "splits" / "volumes.parquet", index=False)
    pd.DataFrame(pairs).to_parquet(root / "splits" / "pairs.parquet", index=False)
    return root


def open_store(root: Path) -> VolumeStore:
    return VolumeStore(root / "splits" / "pairs.parquet", root / "splits" / "volumes.parquet",
                       root / "extract" / "vertebrae.npy")


def step_flops(cfg: PretrainConfig, root: Path, device: torch.device) -> float:
    """FLOPs of one training step on a global batch (forward and backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode
    method = SiameseMethod(cfg, open_store(root))
    method.model.to(device)
    batch = {k: v.to(device) for k, v in method.load("train", np.arange(cfg.batch_size)).items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = method.loss(method.model, batch, None)
        loss.backward()
    return float(counter.get_total_flops())


def run(label: str, cfg: PretrainConfig, shape: tuple[int, int, int], n_subjects: int) -> dict:
    root = write_store(OUT / f"pretrain_{'x'.join(map(str, shape))}_{n_subjects}", shape, n_subjects)
    started = time.perf_counter()
    metrics = train(SiameseMethod, cfg, open_store(root), Outputs.under(OUT / f"pretrain_run_{label}"))
    wall = time.perf_counter() - started
    last = metrics[metrics.split == "train"].iloc[-1]
    wait = float(last.data_wait_share)
    print(f"{label}: {last.samples_per_s:.1f} pairs/s ({2 * last.samples_per_s:.1f} volumes/s), "
          f"data wait {100 * wait:.2f}% of step time (target < {100 * TARGET_WAIT:.0f}%: ratio "
          f"{wait / TARGET_WAIT:.2f}); {int(last.samples)} pairs in epoch 2; total {wall:.0f} s", flush=True)
    return {"pairs_per_s": float(last.samples_per_s), "wait": wait, "root": root}


def main() -> None:
    torch.manual_seed(0)
    common = dict(batch_size=32, max_epochs=2, lr_drops=10, plateau_patience=100, checkpoint_every=10_000,
                  dropout=0.0, prefetch=4, eval_batch_size=64)
    cpu = PretrainConfig(**common, device="cpu", threads=2, width=0.125)
    run("CPU, demo size 9x64x64, width 0.125", cpu, (9, 64, 64), n_subjects=48)
    if not torch.cuda.is_available():
        print("GPU: PyTorch sees no GPU here; run `python -m benchmarks pretrain` on a GPU machine for the paper "
              "size (9x224x224) and the model FLOPs utilisation")
        return
    name = torch.cuda.get_device_name()
    gpu = PretrainConfig(**common, device="cuda", bf16=True, threads=8, width=1.0)
    result = run(f"GPU {name}, paper size 9x224x224, width 1.0, bf16", gpu, (9, 224, 224), n_subjects=96)
    flops = step_flops(gpu, result["root"], torch.device("cuda"))
    achieved = flops / gpu.batch_size * result["pairs_per_s"]
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    share = f"{100 * achieved / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "peak unknown"
    print(f"GPU model FLOPs: {flops / 1e9:.1f} GFLOP per step of {gpu.batch_size} pairs; achieved "
          f"{achieved / 1e12:.2f} TFLOP/s = {share} (MFU)")


if __name__ == "__main__":
    main()
