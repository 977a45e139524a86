"""Stage pretext_eval: how well a pretrained network does its own pretext task on the held-out self-supervision test
part (Jamaludin et al. 2017, section 4.1 and Fig. 6).

Every vertebral body of the self-supervision test subjects is embedded (FC7); for every test pair (positive: the same
subject years apart; negative: another subject, same level) the L2 distance between the two embeddings is the score
for "different subject", summarised as the ROC AUC of same-subject detection (the paper: 94.6% on TwinsUK); FC8's
level prediction is scored as accuracy over the test bodies (the paper: 97.8%). The same figures for the untrained
network (the same seed's initial weights) are the floor they must clear.

Run:
    python -m stages.pretext_eval --checkpoint results/pretrain/siamese/checkpoint.pt --splits results/splits \\
        --extract results/extract --out results/pretrain/siamese/pretext

Writes ``distances.parquet`` / ``.csv`` (a, b, level, positive, hard, years, distance, untrained_distance) and
``evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from stages.core import cli
from stages.core.levels import VERTEBRAE
from stages.nets.siamese import EncoderSpec, SiameseNet
from stages.training.store import VolumeStore

log = logging.getLogger("pretext_eval")
PAPER = {"cohort": "TwinsUK (Jamaludin et al. 2017, section 4.1)", "auc": 0.946, "level_accuracy": 0.978}


@torch.no_grad()
def embed(model: SiameseNet, store: VolumeStore, rows: np.ndarray, batch_size: int = 64,
          threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """FC7 embeddings ``(n, D)`` and FC8 level predictions ``(n,)`` of the volumes at ``rows``."""
    torch.set_num_threads(threads)
    model.eval()
    embeddings, predictions = [], []
    for start in range(0, len(rows), batch_size):
        x = torch.from_numpy(store.load(rows[start:start + batch_size]))
        e = model.encoder(x)
        embeddings.append(e.numpy())
        predictions.append(model.levels(e).argmax(1).numpy())
    dim = model.encoder.spec.embedding_dim
    return (np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
            np.concatenate(predictions) if predictions else np.zeros(0, np.int64))


def pretext_scores(model: SiameseNet, store: VolumeStore, batch_size: int = 64,
                   threads: int = 2) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Distances of the test pairs and the two headline figures, for one network."""
    pairs = store.pairs["test"]
    rows = np.flatnonzero(store.allowed)
    emb, pred = embed(model, store, rows, batch_size, threads)
    where = {int(r): i for i, r in enumerate(rows)}
    ia = np.array([where[int(r)] for r in pairs.a], dtype=np.int64)
    ib = np.array([where[int(r)] for r in pairs.b], dtype=np.int64)
    distance = np.linalg.norm(emb[ia] - emb[ib], axis=1) if len(pairs) else np.zeros(0)
    truth = store.level[rows]
    positive = pairs.positive.to_numpy(dtype=bool)
    both = positive.any() and (~positive).any()
    figures = {
        "auc": float(roc_auc_score(positive, -distance)) if both else None,
        "level_accuracy": float((pred == truth).mean()) if len(rows) else None,
        "level_accuracy_per_level": {lv: float((pred[truth == k] == k).mean())
                                     for k, lv in enumerate(VERTEBRAE) if (truth == k).any()},
        "mean_distance_positive": float(distance[positive].mean()) if positive.any() else None,
        "mean_distance_negative": float(distance[~positive].mean()) if (~positive).any() else None,
    }
    return pairs.assign(distance=distance), figures


def load_checkpoint(path: Path) -> tuple[SiameseNet, SiameseNet, dict[str, Any]]:
    """The trained network of a pretraining checkpoint, the same network at its initial weights, and the run's
    identity (method, config, data)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = EncoderSpec(**ckpt["encoder_spec"])
    trained = SiameseNet(spec)
    trained.load_state_dict(ckpt.get("best_model") or ckpt["model"])   # the weights the run handed on
    torch.manual_seed(ckpt["identity"]["config"]["seed"])   # as the harness seeds before building the model
    untrained = SiameseNet(spec)
    return trained, untrained, ckpt["identity"]


def run(checkpoint: Path, splits: Path, extract: Path, out: Path, threads: int = 2) -> dict[str, Any]:
    trained, untrained, identity = load_checkpoint(checkpoint)
    store = VolumeStore(splits, extract, allowed_parts=("test",))
    batch = int(identity["config"].get("eval_batch_size", 64))
    distances, figures = pretext_scores(trained, store, batch, threads)
    base_distances, base = pretext_scores(untrained, store, batch, threads)
    distances["untrained_distance"] = base_distances.distance.to_numpy()
    pairs = store.pairs["test"]
    summary = {
        "method": identity["method"], "test_bodies": int(store.allowed.sum()),
        "test_subjects": int(store.bodies[store.allowed[store.bodies.index]].subject_id.nunique()),
        "test_pairs": {"positive": int(pairs.positive.sum()), "negative": int((~pairs.positive).sum())},
        "trained": figures, "untrained": base, "paper": PAPER,
    }
    out.mkdir(parents=True, exist_ok=True)
    distances.to_parquet(out / "distances.parquet", index=False)
    distances.to_csv(out / "distances.csv", index=False)
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s on %d test bodies, %d test pairs: AUC %s (untrained %s), level accuracy %s (untrained %s)",
             identity["method"], summary["test_bodies"], len(pairs), *(_fmt(v) for v in (
                 figures["auc"], base["auc"], figures["level_accuracy"], base["level_accuracy"])))
    if not len(pairs):
        log.warning("the self-supervision test part has no pairs: no AUC (see results/splits/summary.json)")
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.pretext_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=cli.existing_file, required=True, help="checkpoint.pt of a pretraining run.")
    parser.add_argument("--splits", type=cli.existing_folder, required=True, help="Output folder of the splits stage.")
    parser.add_argument("--extract", type=cli.existing_folder, required=True, help="Output folder of the extract stage.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads (default: 2).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log, "pretext_eval")
    run(args.checkpoint, args.splits, args.extract, args.out, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
