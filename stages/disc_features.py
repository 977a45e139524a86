"""Stage disc_features: the frozen convolutional features of every disc volume, once per encoder, for the disc probes.

The disc classifier (stages/nets/disc_cnn.py; Jamaludin et al. 2017, section 4.2) takes an encoder's Conv1-Conv5 and
trains new FC6-FC8 on the disc volume. With the convolutions frozen, FC6's input never changes, so it is computed here
once and every probe job of the encoder trains on it:

- ``maps.npy`` ``(n_discs, views, D)`` float16: FC6's input (Conv5's pooled maps, flattened) of each disc volume, view
  0 as extracted and views 1 .. ``augment_views`` - 1 augmented once each with the ``probe_training`` ranges (a seeded
  draw per disc and view), so the transfer heads see augmented discs without recomputing the trunk every epoch;
- ``pooled.npy`` ``(n_discs, 2C)`` float32: Conv5's maps of view 0 averaged and maximised over positions, the input of
  the linear and MLP probes;
- ``trunk.npz``: the disc classifier's spec and Conv1-Conv5 (for Grad-CAM on the classifier's own input).

Encoders: a pretrained one (``--encoder``), the supervised one, or the random one (``--random``: the pretraining
network's initial convolutions of ``--seed``; Conv1-Conv5 draw their weights before any layer whose size depends on
the input, so they are the same whatever the crop size). Every disc is processed, whatever its part: a frozen encoder
only reads; the probe stage decides and checks who may be trained on.

Run:
    python -m stages.disc_features --encoder results/pretrain/siamese/encoder.pt --discs results/extract/discs.npy \\
        --out-maps results/probes/features/siamese/disc_maps.npy \\
        --out-pooled results/probes/features/siamese/disc_pooled.npy \\
        --out-trunk results/probes/features/siamese/disc_trunk.npz --out-meta results/probes/features/siamese/disc.json
    (the random encoder: ``--random --encoder-seed 0 --width 0.125 --embedding-dim 1024`` instead of ``--encoder``)
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

from stages.core import cli, seeds
from stages.core.runtime import select_device
from stages.evaluation.probe_data import ProbeConfig
from stages.nets.disc_cnn import (
    DiscClassifier,
    disc_spec,
    pooled_features,
    save_classifier,
)
from stages.nets.encoders import load_encoder, random_encoder
from stages.training.augment import augment_volumes
from stages.training.classify import classification_ranges, volume_params

log = logging.getLogger("disc_features")


def classifier_of(discs_shape: tuple[int, int, int], encoder_path: Path | None, seed: int, width: float,
                  embedding_dim: int) -> tuple[DiscClassifier, dict[str, Any]]:
    """The disc classifier with the encoder's Conv1-Conv5 (``encoder_path``, or the random encoder of ``seed`` at
    ``width`` and ``embedding_dim``) for disc volumes of ``discs_shape``; and what the encoder is."""
    if encoder_path is None:
        encoder = random_encoder(discs_shape, seed, width, embedding_dim)
        source: dict[str, Any] = {"encoder": "random", "seed": seed}
    else:
        encoder, saved = load_encoder(encoder_path)
        source = {"encoder": saved.get("method", "?"), "path": str(encoder_path)}
    net = DiscClassifier(disc_spec(encoder.spec, discs_shape), n_classes=2, dropout=0.0)
    net.load_trunk(encoder.state_dict(), str(encoder_path or "the random encoder"))
    return net.eval(), source


@torch.no_grad()
def compute(net: DiscClassifier, discs: np.ndarray, views: int, ranges: Any, seed: int, maps_file: Path,
            pooled_file: Path, batch_size: int = 64,
            device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write ``maps_file`` ``(n, views, D)`` and ``pooled_file`` ``(n, 2C)`` for every volume of ``discs``; a batch's
    views are drawn from one generator in batch order, so the same seed gives the same views."""
    generator = seeds.generator(seeds.cached_views(seed))
    n = len(discs)
    device = device or torch.device("cpu")
    net.to(device)
    x0 = torch.zeros(1, *discs.shape[1:], device=device)
    dim, pooled_dim = net.conv_features(x0).shape[1], pooled_features(net.feature_maps(x0)).shape[1]
    tmp = [maps_file.with_name(maps_file.name + ".tmp.npy"), pooled_file.with_name(pooled_file.name + ".tmp.npy")]
    maps = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.float16, shape=(n, views, dim))
    pooled = np.lib.format.open_memmap(tmp[1], mode="w+", dtype=np.float32, shape=(n, pooled_dim))
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(discs[start:start + batch_size], dtype=np.float32)).to(device)
        fmaps = net.feature_maps(x)
        pooled[start:start + len(x)] = pooled_features(fmaps).float().cpu().numpy()
        maps[start:start + len(x), 0] = net.encoder.pool(fmaps).float().cpu().numpy()
        for view in range(1, views):
            augmented = augment_volumes(x, volume_params(len(x), ranges, generator, x.device))
            maps[start:start + len(x), view] = net.conv_features(augmented).float().cpu().numpy()
    for array, name in ((maps, "maps"), (pooled, "pooled")):
        if not np.isfinite(array).all():
            raise FloatingPointError(f"the encoder produced non-finite {name} (float16 overflow of the maps?)")
        array.flush()
    del maps, pooled
    os.replace(tmp[0], maps_file)
    os.replace(tmp[1], pooled_file)
    return np.load(maps_file, mmap_mode="r"), np.load(pooled_file, mmap_mode="r")


def run(discs_file: Path, out: dict[str, Path], encoder_path: Path | None, seed: int, width: float,
        embedding_dim: int, cfg: ProbeConfig) -> dict[str, Any]:
    """Compute and write the disc features of one encoder (see the module's doc); ``out`` names maps, pooled,
    trunk and meta."""
    torch.set_num_threads(cfg.threads)
    discs = np.load(discs_file, mmap_mode="r")
    if discs.ndim != 4 or len(discs) == 0:
        raise ValueError(f"{discs_file} holds no disc volumes (shape {discs.shape}): nothing to embed")
    net, source = classifier_of(tuple(discs.shape[1:]), encoder_path, seed, width, embedding_dim)
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = select_device(cfg.device, "probe_training.device")
    maps, pooled = compute(net, discs, cfg.augment_views, classification_ranges(cfg), cfg.seed, out["maps"],
                           out["pooled"], device=device)
    net.cpu()
    with open(out["trunk"], "wb") as handle:
        np.savez(handle, **{k: v for k, v in save_classifier(net, "trunk").items() if not k.startswith("trunk/head.")})
    meta = {**source, "spec": net.spec.to_dict(), "rows": len(maps), "views": int(maps.shape[1]),
            "dim": int(maps.shape[2]), "pooled_dim": int(pooled.shape[1]),
            "seconds": round(time.perf_counter() - started, 2)}
    out["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    log.info("disc features of %d discs x %d views (%d-d; pooled %d-d) with the %s encoder in %.1f s", len(maps),
             meta["views"], meta["dim"], meta["pooled_dim"], source["encoder"], meta["seconds"])
    return meta


OUTPUTS = {
    "maps": "disc_maps.npy: FC6's input of every disc and view (float16).",
    "pooled": "disc_pooled.npy: pooled Conv5 features of every disc (float32).",
    "trunk": "disc_trunk.npz: the classifier's spec and Conv1-Conv5.",
    "meta": "JSON: the encoder, the sizes, the time.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.disc_features", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", type=cli.existing_file, help="encoder.pt of a pretrained encoder.")
    which.add_argument("--random", action="store_true", help="The random encoder (the floor).")
    parser.add_argument("--discs", type=cli.existing_file, required=True, help="discs.npy of the extract stage.")
    parser.add_argument("--encoder-seed", type=int, default=0,
                        help="--random: the initial weights' seed (pretrain.seed).")
    cli.add_encoder_size_options(parser, "--random: ")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_section_options(parser, "probe_training")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = ProbeConfig.from_config(cli.section_from_args(args, "probe_training", parser))
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    cli.setup_logging(args.log, "disc_features")
    run(args.discs, out, args.encoder, args.encoder_seed, args.width, args.embedding_dim, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
