"""Stage localiser_builtin: train the shipped localiser weights on domain-randomised phantom slices.

Every scene is a new phantom subject and study (stages.demo.randomised), seen through a new random field of view and
under ``--contrasts`` random contrasts, so nothing of the demo cohort (or of any real scan) is learned. The network,
its training loop and its augmentation are the learned localiser's (stages.anatomy.localiser). The same options and
seed give the same weights on the CPU, whatever ``--threads``.

Run (``make localiser-weights`` runs this with the shipped recipe, the defaults, then measures the weights on the real
SPIDER slices with stages.localiser_slices):
    python -m stages.localiser_builtin --threads 2 --out-model stages/anatomy/weights/builtin_localiser.pt \\
        --out-card stages/anatomy/weights/builtin_localiser.json

Writes ``--out-model`` (weights and the config they were trained with, read by ``localise.model: builtin``) and
``--out-card`` (JSON: the recipe, the loss per epoch, training time, the weights' size and SHA-256).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.anatomy.localiser import LocaliseConfig, heatmap_targets, save_localiser, train
from stages.core import cli
from stages.core.pool import worker_pool
from stages.demo.randomised import render_stacks

log = logging.getLogger("localiser_builtin")


@dataclass(frozen=True)
class Recipe:
    """What the shipped weights were trained with (the defaults)."""

    scenes: int = 1000
    contrasts: int = 3  # random contrasts per scene: samples = scenes x contrasts
    epochs: int = 14
    image_size: int = 96
    width: int = 16
    batch_size: int = 16
    learning_rate: float = 0.002
    heatmap_sigma_mm: float = 5.0
    peak_threshold: float = 0.3
    seed: int = 0

    def localise_config(self) -> LocaliseConfig:
        return LocaliseConfig.from_config({
            "seed": self.seed, "epochs": self.epochs, "image_size": self.image_size, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "heatmap_sigma_mm": self.heatmap_sigma_mm,
            "peak_threshold": self.peak_threshold, "width": self.width, "model": "builtin"})


def scene_samples(job: tuple[Recipe, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input stack, heatmap targets) of every contrast of scene ``index``; its own random stream."""
    recipe, index = job
    rng = np.random.default_rng([recipe.seed, index])
    stacks, centres, plane = render_stacks(rng, recipe.image_size, recipe.contrasts)
    table = pd.DataFrame([{"kind": kind, "level": name, "i": col, "j": row} for kind, name, row, col in centres])
    size = recipe.image_size
    pixel_mm = (float(np.linalg.norm(plane.right)), float(np.linalg.norm(plane.down)))
    target = heatmap_targets(table, (size, size), pixel_mm, size, recipe.heatmap_sigma_mm)
    return [(stack, target) for stack in stacks]


def training_set(recipe: Recipe, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every scene's samples, in scene order, as (1, 3, S, S) inputs and (1, 2, S, S) targets."""
    with worker_pool(workers) as pool:
        scenes = list(pool.map(scene_samples, [(recipe, n) for n in range(recipe.scenes)], chunksize=8))
    return [(torch.from_numpy(x)[None], torch.from_numpy(y)[None]) for samples in scenes for x, y in samples]


def run(recipe: Recipe, out_model: Path, out_card: Path, workers: int) -> dict[str, Any]:
    """Render, train, write the weights and their card."""
    start = time.perf_counter()
    samples = training_set(recipe, workers)
    rendered = time.perf_counter() - start
    log.info("rendered %d samples from %d scenes in %.0f s", len(samples), recipe.scenes, rendered)
    cfg = recipe.localise_config()
    model, history = train(samples, cfg)
    trained = time.perf_counter() - start - rendered
    save_localiser(model, cfg, out_model)
    data = out_model.read_bytes()
    card = {"recipe": dataclasses.asdict(recipe), "samples": len(samples), "render_s": round(rendered, 1),
            "train_s": round(trained, 1), "threads": torch.get_num_threads(), "workers": workers,
            "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "loss": history}
    out_card.parent.mkdir(parents=True, exist_ok=True)
    out_card.write_text(json.dumps(card, indent=2) + "\n")
    log.info("final loss %.5f after %.0f s of training; wrote %s (%d bytes)", history[-1]["loss"], trained, out_model,
             len(data))
    return card


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localiser_builtin", description=__doc__.split("\n\n")[0])
    recipe = parser.add_argument_group("the recipe (defaults: the shipped weights')")
    for field in dataclasses.fields(Recipe):
        kind = float if field.type == "float" else int if field.name == "seed" else cli.positive_int
        recipe.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                            metavar="X" if kind is float else "N", help=f"(default: {field.default})")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="PyTorch threads for training and worker processes for rendering (default: 1).")
    cli.add_output_options(parser, {"model": "The weights (PyTorch).", "card": "The recipe and the figures (JSON)."})
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    if recipe.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8, got {recipe.image_size}")
    out = cli.outputs_from_args(args, parser, {"model": "", "card": ""})
    cli.setup_logging(args.log, "localiser_builtin")
    torch.set_num_threads(args.threads)
    run(recipe, out["model"], out["card"], args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
