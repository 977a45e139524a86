"""The pretraining harness: everything a run does that does not depend on the method (stages/training/protocol.py).

Device (CUDA with bf16 autocast when there is a GPU, else the CPU), processes (DistributedDataParallel: gloo on the
CPU, NCCL on GPUs; the global batch is split among the processes), seeding (stages/core/seeds.py), the loop with its
read-ahead of batches, SGD with the plateau schedule and the stopping rule, the evaluation of the validation part,
metrics, a progress bar and a log line per epoch, and checkpoints that resume exactly.

The rolling checkpoint ``resume/last.pt`` beside the final checkpoint holds model, optimiser, schedule, step, RNG
states and config; it is written every ``checkpoint_every`` steps and after every epoch, and a run started again with
the same config and data continues from it and ends with the same numbers as an uninterrupted run (exactly, on the
CPU with the same number of threads). It is removed when the run completes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from stages.core import runtime, seeds
from stages.training.config import PretrainConfig
from stages.training.protocol import AugmentDraw, Method
from stages.training.store import TRAIN_PARTS, Prefetcher, VolumeStore

log = logging.getLogger("pretrain")
TIMING_COLUMNS = ("seconds", "samples_per_s", "data_wait_share")


@dataclass(frozen=True)
class Outputs:
    """The files a run writes: the handed-on encoder (method, spec, the structure it was trained on, weights), the
    final checkpoint, the metrics and the run's config. The rolling checkpoint lives in ``resume/`` beside the final
    one (the workflow does not declare it)."""

    encoder: Path
    checkpoint: Path
    metrics: Path
    run_config: Path

    @property
    def resume(self) -> Path:
        return self.checkpoint.parent / "resume" / "last.pt"

    @classmethod
    def under(cls, folder: Path) -> Outputs:
        """The workflow's names in ``folder`` (results/pretrain/{method}/)."""
        return cls(folder / "encoder.pt", folder / "checkpoint.pt", folder / "metrics.csv", folder / "run_config.yaml")


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """Read torchrun's environment and join the process group (gloo on the CPU, NCCL on CUDA)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        world = cls(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            # gloo for the CPU tensors (statistics, RNG states), NCCL for the gradients on GPUs
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        return world

    def all_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum ``values`` over the processes; a process may hold none of the keys (an empty evaluation shard)."""
        if self.size == 1:
            return dict(values)
        names: list[Any] = [None] * self.size
        dist.all_gather_object(names, sorted(values))
        keys = sorted(set().union(*names))
        tensor = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
        dist.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist()))


def select_device(requested: str, world: World) -> torch.device:
    """This process's device (stages.core.runtime.select_device): its own GPU among several."""
    return runtime.select_device(requested, "pretrain.device", world.local_rank)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch: int = 0                 # next batch of the epoch
    step: int = 0                  # optimiser steps so far
    drops: int = 0
    done: bool = False
    best_loss: float = float("inf")   # the watched (validation) figure of the best epoch so far, negated when higher
                                      # is better (a method's ``watch`` mode "max")
    best_epoch: int = 0
    sums: dict[str, float] = field(default_factory=dict)   # this epoch's training sums so far
    seconds: float = 0.0
    wait_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every random generator a run draws from: PyTorch's (and the GPU's), numpy's and Python's."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then renamed: a run killed while saving leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of an epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    return torch.randperm(n, generator=seeds.generator(seeds.epoch_order(seed, epoch))).numpy()


def batches_of_epoch(n: int, batch_size: int, world: World, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of an epoch. The last incomplete batch is dropped (each epoch drops different samples); a part
    smaller than one batch is one batch. Every batch divides evenly among the processes."""
    size = min(batch_size, n) // world.size * world.size
    if size != min(batch_size, n) and epoch == 0:
        log.warning("the global batch of %d is cut to %d to divide evenly among %d processes",
                    min(batch_size, n), size, world.size)
    if size == 0:
        raise ValueError(f"{n} training samples cannot be shared among {world.size} processes")
    order = epoch_order(n, seed, epoch)
    return [order[i:i + size] for i in range(0, n - size + 1, size)]


def metric_columns(method: Method | type[Method]) -> list[str]:
    """The columns of metrics.csv: where the row stands, the method's figures, the samples and the timings."""
    return ["epoch", "split", "step", "lr", *method.columns, "samples", *TIMING_COLUMNS]


def metrics_row(method: Method, sums: dict[str, float], split: str, epoch: int, step: int, lr: float,
                seconds: float, wait: float) -> dict[str, Any]:
    """One metrics row from summed batch statistics."""
    figures = method.summarise(sums)
    samples = figures["samples"]
    return {"epoch": epoch, "split": split, "step": step, "lr": lr, **{c: figures[c] for c in method.columns},
            "samples": int(samples), "seconds": seconds,
            "samples_per_s": samples / seconds if seconds > 0 else float("nan"),
            "data_wait_share": wait / seconds if seconds > 0 else float("nan")}


@torch.no_grad()
def evaluate(method: Method, part: str, cfg: PretrainConfig, world: World, device: torch.device) -> dict[str, float]:
    """Summed statistics over a whole part, without augmentation, in evaluation mode; shared among processes. A
    batch holds ``eval_batch_size`` volumes."""
    model = method.model
    model.eval()
    n = method.n_samples(part)
    idx = np.arange(world.rank, n, world.size)
    sums: dict[str, float] = {}
    size = max(1, cfg.eval_batch_size // method.volumes_per_sample)
    for start in range(0, len(idx), size):
        batch = {k: v.to(device) for k, v in method.load(part, idx[start:start + size]).items()}
        with autocast(device, cfg):
            _, stats = method.loss(model, batch, None)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    model.train()
    return world.all_sum(sums)


WATCH = ("loss", "min")   # what the plateau rule watches unless a method says otherwise (its ``watch``)


def build_optimiser(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (the Siamese paper's), or Adam with L2 weight decay (``optimiser: adam``,
    set by a method such as simclr)."""
    if cfg.optimiser == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimiser == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimiser must be sgd or adam, got {cfg.optimiser!r}")


def autocast(device: torch.device, cfg: PretrainConfig) -> torch.autocast:
    """bf16 autocast on CUDA when ``bf16`` is set; a no-op on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and cfg.bf16)


# Keys that change how a run is carried out, not what it computes: a checkpoint resumes across them (a requeued job
# on a node with other cores, another method added to the config).
RUNTIME_KEYS = ("methods", "threads", "prefetch", "eval_batch_size", "checkpoint_every")


def run_identity(method_name: str, cfg: PretrainConfig, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its run: the method, the config, the processes and the data."""
    config = cfg.to_dict()
    return {"method": method_name, "config": config, "world_size": world_size, "data": data,
            "maths": {k: v for k, v in config.items() if k not in RUNTIME_KEYS}}


def resumable(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a checkpoint continues this run: same method, processes, data and config but for RUNTIME_KEYS."""
    return all(saved.get(k) == wanted[k] for k in ("method", "world_size", "data", "maths"))


def start_from(method: Method, path: Path) -> str:
    """Put the encoder saved in ``path`` (a previous curriculum step's encoder.pt) into the method's network: its
    encoder and, for a momentum method, its target encoder. Returns the file's digest (part of the run's identity:
    a checkpoint resumes only from the same start)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    mine, theirs = method.encoder_spec(), {"backbone": "trunk", **saved["spec"]}
    differ = [k for k in ("backbone", "slices", "height", "width_px", "width", "embedding_dim")
              if theirs.get(k) != mine.get(k)]
    if differ:
        raise ValueError(f"{path} holds a {theirs.get('backbone')} encoder of {[theirs.get(k) for k in differ]} for "
                         f"{differ}, but {method.name} builds {[mine.get(k) for k in differ]}: a curriculum's steps "
                         "must share one backbone and its size")
    method.model.encoder.load_state_dict(saved["state_dict"])
    target = getattr(method.model, "target_encoder", None)
    if target is not None:
        target.load_state_dict(saved["state_dict"])
    log.info("starting from the %s encoder of %s", saved.get("method", "?"), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train(build: type[Method], cfg: PretrainConfig, store: VolumeStore, out: Outputs, max_steps: int | None = None,
          world: World | None = None, init: Path | None = None) -> pd.DataFrame:
    """Build the method ``build(cfg, store)``, start its encoder from ``init`` (an encoder.pt) if given, train it to
    the stopping rule (or ``max_steps`` optimiser steps) and write ``out``; returns the metrics. ``store`` holds the
    volumes of ``cfg.structure``."""
    if store.structure != cfg.structure:
        raise ValueError(f"pretrain.structure is {cfg.structure!r}, but the array store holds {store.structure} "
                         "volumes")
    world = world or World.from_env()
    device = select_device(cfg.device, world)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    seeds.seed_torch(seeds.initial_weights(cfg.seed))     # the same on every process
    method = build(cfg, store)
    init_digest = start_from(method, init) if init is not None else None
    watched_column = getattr(method, "watch", WATCH)[0]
    if watched_column not in method.columns:
        raise ValueError(f"method {method.name} logs no {watched_column!r} column (its columns: "
                         f"{list(method.columns)}): the plateau rule watches it")
    method.model.to(device)
    if world.size > 1:
        if device.type == "cuda":   # batch statistics over the global batch (a no-op without batch normalisation)
            method.model = nn.SyncBatchNorm.convert_sync_batchnorm(method.model)
        model = nn.parallel.DistributedDataParallel(
            method.model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = method.model
    optimiser = build_optimiser(method.model, cfg)
    watched_column, mode = getattr(method, "watch", WATCH)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode=mode, factor=cfg.lr_factor,
                                                          patience=cfg.plateau_patience)
    identity = run_identity(method.name, cfg, world.size,
                            {"shape": list(store.shape), **{p: method.n_samples(p) for p in TRAIN_PARTS},
                             "digest": store.digest(), **({"init": init_digest} if init_digest else {})})
    state = TrainState()
    best: dict[str, torch.Tensor] = {}   # weights of the epoch with the lowest watched loss: what the run hands on
    resumed = False
    if out.resume.exists():
        saved = torch.load(out.resume, map_location="cpu", weights_only=False)   # RNG states must stay on the CPU
        if resumable(saved["identity"], identity):
            method.model.load_state_dict(saved["model"])
            optimiser.load_state_dict(saved["optimiser"])
            schedule.load_state_dict(saved["schedule"])
            state = TrainState(**saved["state"])
            best = saved["best_model"]
            set_rng_states(saved["rng"][world.rank] if world.rank < len(saved["rng"]) else saved["rng"][0], device)
            resumed = True
            log.info("resuming from %s: epoch %d, batch %d, step %d", out.resume, state.epoch, state.batch,
                     state.step)
        else:
            log.warning("ignoring %s: it was written by a run with another config or data", out.resume)
    if not resumed:
        seeds.seed_torch(seeds.dropout(cfg.seed, world.rank))

    def checkpoint() -> dict[str, Any]:
        rng = [rng_states(device)]
        if world.size > 1:
            gathered: list[Any] = [None] * world.size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        return {"identity": identity, "model": method.model.state_dict(), "optimiser": optimiser.state_dict(),
                "best_model": best, "schedule": schedule.state_dict(), "state": dataclasses.asdict(state), "rng": rng,
                "encoder_spec": method.encoder_spec()}

    def save(path: Path) -> None:
        ckpt = checkpoint()
        if world.main:
            save_atomic(ckpt, path)

    n_train = method.n_samples("train")
    has_val = method.n_samples("val") > 0
    if not has_val:
        log.warning("the self-supervision validation part has no samples: the plateau rule watches the training "
                    "loss")
    log.info("%s on %s (%d process(es)): %d training and %d validation %s (%s, shape %s)", method.name, device,
             world.size, n_train, method.n_samples("val"), method.unit, store.noun, store.shape)
    while not state.done:
        batches = batches_of_epoch(n_train, cfg.batch_size, world, cfg.seed, state.epoch)
        share = len(batches[0]) // world.size
        mine = slice(world.rank * share, (world.rank + 1) * share)
        todo = batches[state.batch:]
        prefetch = Prefetcher(lambda idx, mine=mine: method.load("train", idx[mine]), todo, cfg.prefetch)
        started = time.perf_counter() - state.seconds
        wait0 = state.wait_seconds
        bar = tqdm(total=len(batches), initial=state.batch, desc=f"{method.name} epoch {state.epoch + 1}",
                   file=sys.stderr, disable=not world.main, mininterval=1 if sys.stderr.isatty() else 30,
                   dynamic_ncols=True)
        try:
            for cpu_batch in prefetch:
                batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                generator = seeds.generator(seeds.augmentation(cfg.seed, state.step), device)
                with autocast(device, cfg):
                    loss, stats = method.loss(model, batch, AugmentDraw(generator, share * world.size, mine))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:   # after DDP's all-reduce: every process clips the same gradient
                    nn.utils.clip_grad_norm_(method.model.parameters(), cfg.grad_clip)
                optimiser.step()
                stats = world.all_sum(stats)
                for k, v in stats.items():
                    state.sums[k] = state.sums.get(k, 0.0) + v
                state.batch += 1
                state.step += 1
                state.seconds = time.perf_counter() - started
                state.wait_seconds = wait0 + prefetch.wait_seconds
                bar.update(1)
                samples = method.summarise(state.sums)["samples"]
                bar.set_postfix(**method.progress(stats),
                                samples_per_s=f"{samples / max(state.seconds, 1e-9):.1f}", refresh=False)
                if max_steps is not None and state.step >= max_steps:
                    break
                if state.step % cfg.checkpoint_every == 0 and state.batch < len(batches):
                    save(out.resume)
        finally:
            prefetch.close()   # also when a step raises
        bar.close()
        lr = optimiser.param_groups[0]["lr"]
        train_row = metrics_row(method, state.sums, "train", state.epoch + 1, state.step, lr, state.seconds,
                                state.wait_seconds)
        state.rows.append(train_row)
        start = time.perf_counter()
        if has_val:
            val_sums = evaluate(method, "val", cfg, world, device)
            state.rows.append(metrics_row(method, val_sums, "val", state.epoch + 1, state.step, lr,
                                          time.perf_counter() - start, 0.0))
        watched = state.rows[-1][watched_column]
        score = watched if mode == "min" else -watched   # lower is better
        log.info("epoch %d: train %s%s; %.1f %s/s, data wait %.1f%%", state.epoch + 1, method.describe(train_row),
                 f"; val {method.describe(state.rows[-1])}" if has_val else "", train_row["samples_per_s"],
                 method.unit, 100 * train_row["data_wait_share"])
        if score < state.best_loss:
            state.best_loss, state.best_epoch = score, state.epoch + 1
            best = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
        schedule.step(watched)
        if optimiser.param_groups[0]["lr"] < lr:
            state.drops += 1
            log.info("%s %s plateaued: learning rate %.2g -> %.2g", "validation" if has_val else "training",
                     watched_column, lr, optimiser.param_groups[0]["lr"])
        state.epoch += 1
        state.batch, state.sums, state.seconds, state.wait_seconds = 0, {}, 0.0, 0.0
        state.done = (state.drops > cfg.lr_drops or state.epoch >= cfg.max_epochs
                      or (max_steps is not None and state.step >= max_steps))
        save(out.resume)
    metrics = pd.DataFrame(state.rows, columns=metric_columns(method))
    final = checkpoint()   # every process takes part (it gathers their RNG states)
    if best:
        method.model.load_state_dict(best)
        log.info("handing on the weights of epoch %d (best %s %s %.4f)", state.best_epoch,
                 "validation" if has_val else "training", watched_column, abs(state.best_loss))
    if world.main:
        write_outputs(out, method, final, metrics, identity, device, world, state.best_epoch)
        shutil.rmtree(out.resume.parent, ignore_errors=True)   # its content is in the final checkpoint now
    if world.size > 1:
        dist.barrier()
    return metrics


SEARCH_COLUMNS = ("learning_rate", "split", "score", "epochs", "chosen")


def search_learning_rate(build: type[Method], cfg: PretrainConfig, store: VolumeStore, out: Outputs,
                         candidates: list[float], epochs: int, world: World | None = None,
                         init: Path | None = None) -> tuple[float, pd.DataFrame]:
    """The learning-rate search of a curriculum step (the curricular multi-task study, section 1.2.1: "each training
    step is repeated, using different LR values taken from a pre-defined range, for a limited number of epochs. The LR
    that leads to the highest performance (or lowest loss value) on the training task is used"): a run of ``epochs``
    epochs from the same start (``init``, the same seed) for each candidate, in ``lr_search/`` beside ``out``; its
    score is the method's watched column (its loss) on the self-supervision validation part after the last epoch
    (the training part where there is none). The lowest loss wins (the highest for a method that watches a score to
    maximise); a tie goes to the candidate listed first. Each candidate run resumes as a run does; a search made
    under other settings is discarded. Returns the chosen rate and the table (:data:`SEARCH_COLUMNS`)."""
    if not candidates or epochs < 1:
        raise ValueError(f"need learning-rate candidates and >= 1 epoch, got {candidates} and {epochs}")
    folder = out.checkpoint.parent / "lr_search"
    maths = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS}   # a restart on other cores reuses it
    settings = json.dumps({"config": maths, "world_size": world.size if world else 1,
                           "candidates": list(candidates), "epochs": epochs,
                           "init": hashlib.sha256(init.read_bytes()).hexdigest() if init else None,
                           "method": build.name, "digest": store.digest()}, sort_keys=True, default=str)
    marker = folder / "search.json"
    if (world is None or world.main) and marker.exists() and marker.read_text() != settings:
        log.warning("discarding %s: it was made under other settings", folder)
        shutil.rmtree(folder)
    if world is None or world.main:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(settings)
    if world is not None and world.size > 1:
        dist.barrier()
    _, mode = getattr(build, "watch", WATCH)
    rows = []
    for lr in candidates:
        sub = Outputs.under(folder / f"lr{lr:g}")
        if sub.metrics.exists() and sub.encoder.exists():
            metrics = pd.read_csv(sub.metrics)
            log.info("learning rate %g: searched already (%s)", lr, sub.metrics)
        else:
            log.info("learning rate %g: %d epoch(s)", lr, epochs)
            metrics = train(build, dataclasses.replace(cfg, learning_rate=lr, max_epochs=epochs), store, sub,
                            world=world, init=init)
        watched_column = getattr(build, "watch", WATCH)[0]
        last = metrics[metrics.epoch == metrics.epoch.max()]
        row = last[last.split == "val"] if (last.split == "val").any() else last[last.split == "train"]
        rows.append({"learning_rate": lr, "split": row.split.iloc[0], "score": float(row[watched_column].iloc[0]),
                     "epochs": int(metrics.epoch.max())})
    table = pd.DataFrame(rows)
    scores = table.score.to_numpy() if mode == "min" else -table.score.to_numpy()
    if not np.isfinite(scores).any():
        raise FloatingPointError(f"no learning rate of {list(candidates)} gave a finite {mode} score: see {folder}")
    best = int(np.nanargmin(np.where(np.isfinite(scores), scores, np.nan)))
    table["chosen"] = np.arange(len(table)) == best
    chosen = float(table.learning_rate.iloc[best])
    log.info("learning-rate search: %s; chose %g", ", ".join(f"{r.learning_rate:g} -> {r.score:.4f} ({r.split})"
                                                             for r in table.itertuples()), chosen)
    return chosen, table[list(SEARCH_COLUMNS)]


def write_outputs(out: Outputs, method: Method, ckpt: dict[str, Any], metrics: pd.DataFrame, identity: dict[str, Any],
                  device: torch.device, world: World, best_epoch: int) -> None:
    encoder = method.model.encoder
    save_atomic({"method": method.name, "spec": method.encoder_spec(), "structure": identity["config"]["structure"],
                 "state_dict": encoder.state_dict()}, out.encoder)
    save_atomic(ckpt, out.checkpoint)
    out.metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out.metrics, index=False)
    stopped = metrics.iloc[-1].to_dict() if len(metrics) else {}
    run_config = {"method": method.name, "pretrain": identity["config"], "data": identity["data"],
                  "device": str(device), "processes": world.size, "torch": str(torch.__version__),
                  "epochs": int(stopped.get("epoch", 0)), "steps": int(stopped.get("step", 0)),
                  "weights_of_epoch": best_epoch}
    out.run_config.parent.mkdir(parents=True, exist_ok=True)
    out.run_config.write_text(yaml.safe_dump(run_config, sort_keys=False))
    log.info("wrote %s, %s, %s and %s (%d epochs, %d steps)", out.encoder, out.checkpoint, out.metrics,
             out.run_config, run_config["epochs"], run_config["steps"])
