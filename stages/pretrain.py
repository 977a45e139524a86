"""Stage pretrain: self-supervised pretraining of the 3D encoder, one model per method, on a CPU or GPUs.

The harness (stages/training/harness.py: device, data, optimiser, plateau schedule, checkpoints, DDP, metrics) knows
no method; a method (a module in stages/training/methods/, by name in stages/training/registry.py) brings its model,
how it loads and augments a batch of its samples, its loss and the statistics it logs. Methods: ``siamese`` (Jamaludin
et al. 2017: longitudinal pairs of vertebral bodies, or of discs, contrastive + class-balanced level loss;
stages/training/methods/siamese.py), ``simclr`` (Hou et al. 2023, on the axial slices through each disc;
stages/training/methods/simclr.py), ``moco`` and ``byol`` (MoCo v2 and BYOL on the volumes of ``--structure``;
stages/training/methods/momentum.py). A method with a config section of its own takes its keys as
``--SECTION-KEY`` options (``--moco-queue-size``).

Data: the self-supervision train and validation parts of ``--pairs`` (the splits stage's pairs.parquet) over
``--array``, the extract stage's array of the structure ``--structure`` (``pretrain.structure``): vertebrae.npy for
``vertebra`` (the paper's vertebral bodies, the default), discs.npy for ``disc``; read as a memory map, batches read
ahead by a background thread. ``--vertebrae`` is the older name of ``--array``, for the vertebral bodies only. Every
volume row the run may read is checked against ``--volumes`` (the splits stage's volumes.parquet) when the data are
opened: a row that is not a volume of the structure, or of a self-supervision test subject, or of a downstream
validation or test subject stops the run (:class:`stages.core.errors.LeakageError`).

Run (one process; CUDA with bf16 autocast when there is a GPU, else the CPU):
    python -m stages.pretrain --method siamese --pairs results/splits/pairs.parquet \\
        --volumes results/splits/volumes.parquet --structure vertebra --array results/extract/vertebrae.npy \\
        --encoder results/pretrain/siamese/encoder.pt --checkpoint results/pretrain/siamese/checkpoint.pt \\
        --metrics results/pretrain/siamese/metrics.csv --run-config results/pretrain/siamese/run_config.yaml
On discs: ``--structure disc --array results/extract/discs.npy`` (with the pairs the splits stage drew on discs).
Several GPUs or processes (DistributedDataParallel; gloo on the CPU, NCCL on GPUs; the global batch is split among
the processes, cut to a multiple of their number, and equals one process's exactly when dropout is 0, since each
process draws its own dropout masks):
    torchrun --standalone --nproc-per-node 2 -m stages.pretrain --method siamese ...

Writes ``--encoder`` (the encoder's weights from the epoch with the lowest validation loss, the spec to rebuild it
and the structure it was trained on), ``--checkpoint`` (the final full checkpoint, with those best weights beside the
last ones), ``--metrics`` (one row per epoch and split: the method's figures, samples, timings), ``--run-config`` (the
config it ran with, the device, the data, the epoch whose weights were kept). While training, ``resume/last.pt``
beside ``--checkpoint`` holds the latest checkpoint; a run started again with the same config and data continues from
it and ends with the same numbers as an uninterrupted run (exactly, on the CPU with the same number of threads). It is
not a declared output of the workflow, so Snakemake leaves it in place when a job fails or is killed; it is removed
when the run completes.

A curriculum step (``pretrain.curricula``): ``--init-encoder`` starts the method's encoder (and a momentum method's
target encoder) from the previous step's encoder.pt; ``--lr-candidates`` first runs ``--search-epochs`` epochs at each
candidate learning rate from that start (in ``lr_search/`` beside ``--checkpoint``), writes the search to
``--search-table`` and trains with the rate whose validation loss is lowest (stages/training/harness.py,
``search_learning_rate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from stages.training.config import PretrainConfig
from stages.training.harness import SEARCH_COLUMNS, Outputs, World, search_learning_rate, train
from stages.training.protocol import configured
from stages.training.registry import METHODS
from stages.training.store import VolumeStore, add_array_options, array_from_args

log = logging.getLogger("pretrain")


def method_sections() -> list[str]:
    """The config sections of the methods that have one of their own (``simclr``), as --SECTION-KEY options."""
    return sorted({s for s in (getattr(m, "section", None) for m in METHODS.values()) if s})


def build_parser() -> argparse.ArgumentParser:
    # stages.core.cli (and jsonschema behind it) is imported here, not at the top: the GPU benchmark imports the
    # harness on machines that have PyTorch but not the workflow's other packages
    from stages.core import cli
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS),
                        help="Pretraining method (or a step of an ordered curriculum: --ordering).")
    parser.add_argument("--pairs", type=cli.existing_file, required=True, help="pairs.parquet of the splits stage.")
    parser.add_argument("--volumes", type=cli.existing_file, required=True,
                        help="volumes.parquet of the splits stage.")
    add_array_options(parser)
    parser.add_argument("--encoder", type=Path, required=True, help="Output: the handed-on encoder (encoder.pt).")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="Output: the final checkpoint (checkpoint.pt); the rolling one goes to resume/ beside it.")
    parser.add_argument("--metrics", type=Path, required=True, help="Output: metrics per epoch and split (csv).")
    parser.add_argument("--run-config", type=Path, required=True, help="Output: the run's config (yaml).")
    parser.add_argument("--max-steps", type=cli.positive_int, default=None,
                        help="Stop after this many optimiser steps (a smoke test of a config; default: the "
                             "plateau rule or max_epochs).")
    step = parser.add_argument_group("a curriculum step")
    step.add_argument("--init-encoder", type=cli.existing_file, default=None,
                      help="Start from this encoder.pt (the previous step's; default: the seed's initial weights).")
    step.add_argument("--ordering", type=cli.existing_file, default=None,
                      help="A step of an ordered curriculum: the curriculum_order stage's orderings.json, whose "
                           "--ordering-name list names the method of step --step (instead of --method).")
    step.add_argument("--ordering-name", default=None, help="--ordering: C, AC or MC.")
    step.add_argument("--step", type=cli.positive_int, default=None, help="--ordering: the step (1 = the first).")
    step.add_argument("--lr-candidates", type=cli.positive_float, nargs="+", default=None,
                      help="Search these learning rates first (curricula.lr_candidates); needs --search-table.")
    step.add_argument("--search-epochs", type=cli.positive_int, default=2,
                      help="Epochs of each search run (curricula.search_epochs; default: %(default)s).")
    step.add_argument("--search-table", type=Path, default=None,
                      help="Output: the search (csv; without --lr-candidates, one row: the section's rate).")
    cli.add_section_options(parser, "pretrain")
    for section in method_sections():
        cli.add_section_options(parser, section, prefix=section)
    cli.add_log_option(parser)
    return parser


def ordered_method(path: Path, name: str | None, step: int | None, parser: argparse.ArgumentParser) -> str:
    """The method of step ``step`` of ordering ``name`` in the curriculum_order stage's ``path``."""
    orders = json.loads(path.read_text())
    if name not in orders or not isinstance(orders[name], list):
        names = [k for k, v in orders.items() if isinstance(v, list)]
        parser.error(f"{path} has no ordering {name!r} (it has {names})")
    if step is None or not 1 <= step <= len(orders[name]):
        parser.error(f"--step must be 1 ... {len(orders[name])} for ordering {name}, got {step}")
    method = orders[name][step - 1]
    if method not in METHODS:
        parser.error(f"{path}: ordering {name} names {method!r}, not a pretraining method")
    log.info("ordering %s, step %d: %s", name, step, method)
    return method


def main(argv: list[str] | None = None) -> int:
    from stages.core import cli
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr_candidates is not None and args.search_table is None:
        parser.error("--lr-candidates needs --search-table")
    if (args.method is None) == (args.ordering is None):
        parser.error("give --method, or --ordering with --ordering-name and --step")
    if args.ordering is not None:
        args.method = ordered_method(args.ordering, args.ordering_name, args.step, parser)
    build = METHODS[args.method]
    sections = {section: cli.section_from_args(args, section, parser, prefix=section) for section in method_sections()}
    cfg = configured(build, PretrainConfig.from_config(cli.section_from_args(args, "pretrain", parser)), sections)
    array = array_from_args(args, parser, cfg.structure)
    cli.setup_logging(args.log, "pretrain")
    out = Outputs(encoder=args.encoder, checkpoint=args.checkpoint, metrics=args.metrics, run_config=args.run_config)
    world = World.from_env()
    try:
        pairs = args.pairs if getattr(build, "uses_pairs", True) else None
        store = VolumeStore(pairs, args.volumes, array, structure=cfg.structure)
        if args.lr_candidates:
            lr, table = search_learning_rate(build, cfg, store, out, args.lr_candidates, args.search_epochs, world,
                                             args.init_encoder)
            if world.main:
                args.search_table.parent.mkdir(parents=True, exist_ok=True)
                table.to_csv(args.search_table, index=False)
            cfg = dataclasses.replace(cfg, learning_rate=lr, method_config={**cfg.method_config, "learning_rate": lr})
        elif args.search_table is not None and world.main:   # no search: the section's rate, as a one-row table
            args.search_table.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([{"learning_rate": cfg.learning_rate, "split": "none", "score": float("nan"), "epochs": 0,
                           "chosen": True}], columns=list(SEARCH_COLUMNS)).to_csv(args.search_table, index=False)
        train(build, cfg, store, out, max_steps=args.max_steps, world=world, init=args.init_encoder)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
