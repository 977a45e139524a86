"""Stage pretext_eval: how well a pretrained network does its own pretext task on the held-out self-supervision test
part, against the same network at its initial weights (the floor it must clear).

The method that trained the checkpoint (stages/training/registry.py) does the evaluation: ``siamese`` scores the L2
distance of the two FC7 embeddings of every test pair as the score for "different subject" (ROC AUC of same-subject
detection; the paper: 94.6% on TwinsUK) and FC8's level accuracy over the test bodies (the paper: 97.8%).

Run:
    python -m stages.pretext_eval --checkpoint results/pretrain/siamese/checkpoint.pt \\
        --pairs results/splits/pairs.parquet --volumes results/splits/volumes.parquet \\
        --vertebrae results/extract/vertebrae.npy --evaluation results/pretrain/siamese/pretext/evaluation.json \\
        --scores results/pretrain/siamese/pretext/distances.parquet \\
        --scores-csv results/pretrain/siamese/pretext/distances.csv

Writes ``--scores`` / ``--scores-csv`` (one row per test item; siamese: a, b, level, positive, hard, years, distance,
untrained_distance) and ``--evaluation`` (the method, the test part's size and the method's figures).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from stages.core import cli
from stages.training.registry import METHODS
from stages.training.store import VolumeStore

log = logging.getLogger("pretext_eval")


def run(checkpoint: Path, pairs: Path, volumes: Path, vertebrae: Path, evaluation: Path, scores: Path,
        scores_csv: Path, threads: int = 2) -> dict[str, Any]:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    identity = ckpt["identity"]
    if identity["method"] not in METHODS:
        raise ValueError(f"{checkpoint} was written by method {identity['method']!r}, which is not among the "
                         f"methods {sorted(METHODS)}")
    store = VolumeStore(pairs, volumes, vertebrae, allowed_parts=("test",))
    torch.set_num_threads(threads)
    batch = int(identity["config"].get("eval_batch_size", 64))
    table, figures = METHODS[identity["method"]].pretext(ckpt, store, batch)
    summary = {
        "method": identity["method"], "test_bodies": int(store.allowed.sum()),
        "test_subjects": int(store.bodies[store.allowed[store.bodies.index]].subject_id.nunique()),
        **figures,
    }
    for path in (evaluation, scores, scores_csv):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(scores, index=False)
    table.to_csv(scores_csv, index=False)
    evaluation.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s on %d test bodies of %d subjects: wrote %s", identity["method"], summary["test_bodies"],
             summary["test_subjects"], evaluation)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.pretext_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=cli.existing_file, required=True,
                        help="checkpoint.pt of a pretraining run.")
    parser.add_argument("--pairs", type=cli.existing_file, required=True, help="pairs.parquet of the splits stage.")
    parser.add_argument("--volumes", type=cli.existing_file, required=True,
                        help="volumes.parquet of the splits stage.")
    parser.add_argument("--vertebrae", type=cli.existing_file, required=True,
                        help="vertebrae.npy of the extract stage.")
    parser.add_argument("--evaluation", type=Path, required=True, help="Output: the figures (json).")
    parser.add_argument("--scores", type=Path, required=True, help="Output: one row per test item (parquet).")
    parser.add_argument("--scores-csv", type=Path, required=True, help="Output: the same table as csv.")
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads (default: 2).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log, "pretext_eval")
    run(args.checkpoint, args.pairs, args.volumes, args.vertebrae, args.evaluation, args.scores, args.scores_csv,
        args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
