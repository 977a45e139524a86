"""Stage pretext_eval: how well a pretrained network does its own pretext task on the held-out self-supervision test
part, against the same network at its initial weights (the floor it must clear).

The method that trained the checkpoint (stages/training/registry.py) does the evaluation: ``siamese`` scores the L2
distance of the two FC7 embeddings of every test pair as the score for "different subject" (ROC AUC of same-subject
detection; the paper, on vertebral bodies: 94.6% on TwinsUK) and FC8's level accuracy over the test volumes (the
paper, on vertebral bodies: 97.8%), over the levels of the structure the checkpoint was pretrained on.

The volumes are those of the checkpoint's structure (``pretrain.structure``, recorded in it; a checkpoint written
before pretraining could read discs is of vertebral bodies): ``--array`` is the extract stage's array of it
(vertebrae.npy or discs.npy; ``--vertebrae`` is its older name, for vertebral bodies only), and ``--structure``, when
given, must name the same structure.

Run:
    python -m stages.pretext_eval --checkpoint results/pretrain/siamese/checkpoint.pt \\
        --pairs results/splits/pairs.parquet --volumes results/splits/volumes.parquet --structure vertebra \\
        --array results/extract/vertebrae.npy --evaluation results/pretrain/siamese/pretext/evaluation.json \\
        --scores results/pretrain/siamese/pretext/distances.parquet \\
        --scores-csv results/pretrain/siamese/pretext/distances.csv

Writes ``--scores`` / ``--scores-csv`` (one row per test item; siamese: a, b, level, positive, hard, years, distance,
untrained_distance) and ``--evaluation`` (the method, the structure, the test part's size and the method's figures).
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
from stages.training.store import (
    STRUCTURES,
    VolumeStore,
    add_array_options,
    array_from_args,
)

log = logging.getLogger("pretext_eval")


def checkpoint_structure(ckpt: dict[str, Any]) -> str:
    """The structure a pretraining checkpoint was trained on (``vertebra`` for one written before it was recorded)."""
    return ckpt["identity"]["config"].get("structure", "vertebra")


def run(checkpoint: Path, pairs: Path, volumes: Path, array: Path, evaluation: Path, scores: Path,
        scores_csv: Path, threads: int = 2, structure: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test part of ``pairs`` over ``array``, the extract stage's array of the
    checkpoint's structure; ``structure``, when given, must be that structure. Returns the summary it writes."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    identity = ckpt["identity"]
    if identity["method"] not in METHODS:
        raise ValueError(f"{checkpoint} was written by method {identity['method']!r}, which is not among the "
                         f"methods {sorted(METHODS)}")
    trained_on = checkpoint_structure(ckpt)
    if structure is not None and structure != trained_on:
        raise ValueError(f"{checkpoint} was pretrained on {trained_on} volumes, not on {structure} volumes "
                         f"(--structure {structure}): evaluate it with --structure {trained_on} and the "
                         f"{STRUCTURES[trained_on].array} array")
    uses_pairs = getattr(METHODS[identity["method"]], "uses_pairs", True)
    store = VolumeStore(pairs if uses_pairs else None, volumes, array, structure=trained_on, allowed_parts=("test",))
    torch.set_num_threads(threads)
    batch = int(identity["config"].get("eval_batch_size", 64))
    table, figures = METHODS[identity["method"]].pretext(ckpt, store, batch)
    readable = store.table[store.allowed[store.table.index]]
    sizes = {"test_volumes": int(store.allowed.sum()), "test_subjects": int(readable.subject_id.nunique())}
    if trained_on == "vertebra":
        sizes = {"test_bodies": sizes["test_volumes"], **sizes}   # the name it had before discs could be read
    summary = {"method": identity["method"], "structure": trained_on, **sizes, **figures}
    for path in (evaluation, scores, scores_csv):
        path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(scores, index=False)
    table.to_csv(scores_csv, index=False)
    evaluation.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s on %d test %s of %d subjects: wrote %s", identity["method"], summary["test_volumes"], store.noun,
             summary["test_subjects"], evaluation)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.pretext_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=cli.existing_file, required=True,
                        help="checkpoint.pt of a pretraining run.")
    parser.add_argument("--pairs", type=cli.existing_file, required=True, help="pairs.parquet of the splits stage.")
    parser.add_argument("--volumes", type=cli.existing_file, required=True,
                        help="volumes.parquet of the splits stage.")
    parser.add_argument("--structure", choices=tuple(STRUCTURES), default=None,
                        help="The structure the checkpoint was pretrained on (pretrain.structure; default: the one "
                             "the checkpoint records, vertebra for an older one); another one is an error.")
    add_array_options(parser)
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
    structure = args.structure
    if structure is None and args.vertebrae is not None:
        structure = "vertebra"   # --vertebrae names the vertebral bodies' array
    array = array_from_args(args, parser, structure or "vertebra")
    run(args.checkpoint, args.pairs, args.volumes, array, args.evaluation, args.scores, args.scores_csv,
        args.threads, structure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
