"""Stage features: the frozen FC7 features of every extracted vertebral body, once per encoder, for every probe.

Encoders: a pretrained one (``--encoder results/pretrain/siamese/encoder.pt``), the supervised-transfer one, or a
randomly initialised one (``--random``: the pretraining network at the initial weights of ``--seed``, exactly the
untrained network of the pretext evaluation). Every body is embedded, whatever its part: a frozen encoder only reads
them; which samples a probe may *train* on is decided and checked by the probe stage.

Run:
    python -m stages.features --encoder results/pretrain/siamese/encoder.pt --vertebrae results/extract/vertebrae.npy \\
        --features results/probes/features/siamese/features.npy --meta results/probes/features/siamese/features.json

Writes ``--features`` (float32, one row per row of ``--vertebrae``, written in batches so a large cohort never sits
in memory) and ``--meta`` (JSON: the encoder, its spec, the feature size).
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
from stages.nets.encoders import Encoder, load_encoder, random_encoder

log = logging.getLogger("features")


@torch.no_grad()
def embed_all(encoder: Encoder, array: np.ndarray, out: Path, batch_size: int = 64) -> np.ndarray:
    """Embed every volume of ``array`` ``(n, S, H, W)`` into the float32 memory map ``out`` ``(n, D)``."""
    encoder.eval()
    tmp = out.with_name(out.name + ".tmp.npy")
    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                         shape=(len(array), encoder.spec.embedding_dim))
    for start in range(0, len(array), batch_size):
        x = torch.from_numpy(np.asarray(array[start:start + batch_size], dtype=np.float32))
        features[start:start + len(x)] = encoder(x).numpy()
    if not np.isfinite(features).all():
        raise FloatingPointError("the encoder produced non-finite features")
    features.flush()
    del features
    os.replace(tmp, out)
    return np.load(out, mmap_mode="r")


def run(vertebrae: Path, features_file: Path, meta_file: Path, encoder_path: Path | None, seed: int, width: float,
        embedding_dim: int, threads: int = 2, batch_size: int = 64) -> dict[str, Any]:
    """Embed every body of ``vertebrae`` (the array store) with a pretrained encoder (``encoder_path``) or the random
    encoder of ``seed``; write ``features_file`` (rows as in the store) and ``meta_file`` (JSON)."""
    torch.set_num_threads(threads)
    array = np.load(vertebrae, mmap_mode="r")
    if encoder_path is None:
        encoder = random_encoder(tuple(array.shape[1:]), seed, width, embedding_dim)
        source: dict[str, Any] = {"encoder": "random", "seed": seed}
    else:
        encoder, saved = load_encoder(encoder_path)
        source = {"encoder": saved.get("method", "?"), "path": str(encoder_path)}
    expected = (encoder.spec.slices, encoder.spec.height, encoder.spec.width_px)
    if tuple(array.shape[1:]) != expected:
        raise ValueError(f"the encoder takes volumes of {expected} (slices, rows, columns) but "
                         f"{vertebrae} holds {tuple(array.shape[1:])}: it was trained on another "
                         "extraction; re-run pretraining")
    features_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    features = embed_all(encoder, array, features_file, batch_size)
    meta = {**source, "spec": encoder.spec.to_dict(), "rows": len(features), "dim": int(features.shape[1]),
            "seconds": round(time.perf_counter() - start, 2)}
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    log.info("embedded %d bodies into %d features with the %s encoder in %.1f s", len(features), meta["dim"],
             source["encoder"], meta["seconds"])
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.features", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", type=cli.existing_file, help="encoder.pt of a pretrained encoder.")
    which.add_argument("--random", action="store_true", help="A randomly initialised encoder (the floor).")
    parser.add_argument("--vertebrae", type=cli.existing_file, required=True,
                        help="vertebrae.npy of the extract stage (the bodies to embed).")
    parser.add_argument("--features", type=Path, required=True, help="Output: features.npy (one row per body).")
    parser.add_argument("--meta", type=Path, required=True, help="Output: features.json (the encoder, the size).")
    parser.add_argument("--seed", type=int, default=0, help="--random: the initial weights' seed (pretrain.seed).")
    cli.add_encoder_size_options(parser, "--random: ")
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads (default: 2).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log, "features")
    run(args.vertebrae, args.features, args.meta, args.encoder, args.seed, args.width, args.embedding_dim, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
