"""Stage axial_features: the frozen features of every disc's axial slices under a simclr encoder, for the disc probes.

Hou et al. 2023's herniation head reads the three central axial slices of a disc through the frozen extractor and
concatenates their features (3 x 256: the first FC block's output of each slice) before one fully connected layer
with a sigmoid. This stage computes that concatenation once per encoder for every disc row of the axial array (the
extract stage's slices resliced from the sagittal scan, rows aligned with discs.npy):

- ``disc_pooled.npy`` ``(n_discs, K x fc_units)`` float32: the input of the linear and MLP probes (the linear probe,
  a logistic regression, is their one FC layer with a sigmoid; stages/probe.py);
- ``disc_features.json``: the encoder (its trained weights, or with ``--initial-weights`` those pretraining started
  from: the random-frozen baseline), its spec, the sizes, the discs whose slices are blank (a crop-table cohort's).

Every disc is processed, whatever its part: a frozen encoder only reads; the probe stage decides who may be trained on.

Run:
    python -m stages.axial_features --encoder results/pretrain/simclr/encoder.pt --axial results/extract/axial.npy \\
        --out-pooled results/probes/features/simclr/disc_pooled.npy \\
        --out-meta results/probes/features/simclr/disc_features.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import cli
from stages.core.runtime import select_device
from stages.nets.simclr import SimclrEncoder, disc_features, initial_encoder, load_simclr_encoder

log = logging.getLogger("axial_features")


@torch.no_grad()
def compute(encoder: SimclrEncoder, axial: np.ndarray, pooled_file: Path, batch_size: int = 64,
            device: torch.device | None = None) -> np.ndarray:
    """Write ``pooled_file`` ``(n, K x fc_units)``, the concatenated slice features of every disc of ``axial``
    ``(n, K, H, W)``, and return it."""
    device = device or torch.device("cpu")
    encoder.to(device).eval()
    n, k = axial.shape[:2]
    tmp = pooled_file.with_name(pooled_file.name + ".tmp.npy")
    pooled = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k * encoder.spec.fc_units))
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(axial[start:start + batch_size], dtype=np.float32)).to(device)
        pooled[start:start + len(x)] = disc_features(encoder, x).float().cpu().numpy()
    if not np.isfinite(pooled).all():
        raise FloatingPointError("the encoder produced non-finite features")
    pooled.flush()
    del pooled
    os.replace(tmp, pooled_file)
    return np.load(pooled_file, mmap_mode="r")


def run(axial_file: Path, encoder_path: Path, out: dict[str, Path], threads: int = 1, device: str = "auto",
        initial_seed: int | None = None) -> dict[str, Any]:
    """Compute and write the axial features of one simclr encoder (see the module's doc); with ``initial_seed``, of
    its architecture at pretraining's initial weights for that seed (the random-frozen baseline)."""
    torch.set_num_threads(threads)
    axial = np.load(axial_file, mmap_mode="r")
    if axial.ndim != 4 or len(axial) == 0:
        raise ValueError(f"{axial_file} holds no axial slices (shape {axial.shape}): nothing to embed")
    encoder, saved = load_simclr_encoder(encoder_path)
    if initial_seed is not None:
        encoder = initial_encoder(encoder.spec, initial_seed).eval()
    if tuple(axial.shape[2:]) != (encoder.spec.height, encoder.spec.width_px):
        raise ValueError(f"{axial_file} holds {axial.shape[2]} x {axial.shape[3]} slices, but the encoder was "
                         f"trained on {encoder.spec.height} x {encoder.spec.width_px}: extract.axial_size changed "
                         "since pretraining")
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pooled = compute(encoder, axial, out["pooled"], device=select_device(device, "probe_training.device"))
    blank = np.flatnonzero(np.asarray(axial).reshape(len(axial), -1).std(1) <= 1e-6)
    meta = {"encoder": saved["method"], "path": str(encoder_path),
            "weights": "trained" if initial_seed is None else f"initial (seed {initial_seed})",
            "spec": encoder.spec.to_dict(),
            "rows": len(pooled), "slices": int(axial.shape[1]), "pooled_dim": int(pooled.shape[1]),
            "blank_rows": len(blank), "seconds": round(time.perf_counter() - started, 2)}
    out["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    log.info("axial features of %d discs x %d slices (%d-d) with the %s encoder in %.1f s (%d discs blank)",
             len(pooled), meta["slices"], meta["pooled_dim"], meta["encoder"], meta["seconds"], len(blank))
    return meta


OUTPUTS = {
    "pooled": "disc_pooled.npy: the concatenated slice features of every disc (float32).",
    "meta": "JSON: the encoder, the sizes, the blank discs, the time.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.axial_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=cli.existing_file, required=True,
                        help="encoder.pt of a simclr pretraining run.")
    parser.add_argument("--axial", type=cli.existing_file, required=True,
                        help="The axial slices through each disc (the extract stage's axial.npy).")
    parser.add_argument("--initial-weights", action="store_true",
                        help="The encoder's architecture at pretraining's initial weights (--encoder-seed), not its "
                             "trained weights: the random-frozen baseline METHOD-random.")
    parser.add_argument("--encoder-seed", type=int, default=0, help="--initial-weights: pretrain.seed (default: 0).")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="CPU threads (default: 1).")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when there is a GPU (default).")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    cli.setup_logging(args.log, "axial_features")
    run(args.axial, args.encoder, out, args.threads, args.device,
        args.encoder_seed if args.initial_weights else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
