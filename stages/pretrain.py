"""Stage pretrain: self-supervised pretraining of the 3D encoder, one model per method, on a CPU or GPUs.

The harness (device, data, optimiser, plateau schedule, checkpoints, DDP, metrics) is shared by every method; a method
supplies its model, how to load a batch of its samples, and its loss. Methods: ``siamese`` (Jamaludin et al. 2017:
longitudinal pairs of vertebral bodies, contrastive + class-balanced level loss; see stages/nets/siamese.py).

Data: the self-supervision train and validation parts of ``splits/pairs.parquet`` over ``extract/vertebrae.npy``
(read as a memory map; batches are read ahead by a background thread). Every volume row the run may read is checked
against ``splits/volumes.parquet`` when the data are opened: a row of a self-supervision test subject or of a
downstream validation or test subject stops the run (:class:`LeakageError`).

Run (one process; CUDA with bf16 autocast when there is a GPU, else the CPU):
    python -m stages.pretrain --method siamese --splits results/splits --extract results/extract \\
        --out results/pretrain/siamese --threads 2
Several GPUs or processes (DistributedDataParallel; gloo on the CPU, NCCL on GPUs; the global batch is split among
the processes, cut to a multiple of their number, and equals one process's exactly when dropout is 0, since each
process draws its own dropout masks):
    torchrun --standalone --nproc-per-node 2 -m stages.pretrain --method siamese ...

Writes, in --out: ``encoder.pt`` (the encoder's weights from the epoch with the lowest validation loss, and the spec
to rebuild it), ``checkpoint.pt`` (the final full checkpoint, with those best weights beside the last ones),
``metrics.csv`` (one row per epoch and split), ``run_config.yaml`` (the config it ran with, the device, the data,
the epoch whose weights were kept). While training, ``resume/last.pt`` holds the latest checkpoint (model, optimiser, schedule, step, RNG
states, config), written every ``checkpoint_every`` steps and after every epoch; a run started again with the same
config and data continues from it and ends with the same numbers as an uninterrupted run (exactly, on the CPU with
the same number of threads; a different thread count may change the last bits of float sums). It is not a
declared output of the workflow, so Snakemake leaves it in place when a job fails or is killed; it is removed when
the run completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from stages.core import runtime
from stages.core.levels import VERTEBRAE
from stages.nets.siamese import BalancedCrossEntropy, ContrastiveLoss, EncoderSpec, SiameseNet, class_balanced_weights
from stages.training.augment import AugmentRanges, augment_pairs, sample_pair_params
from stages.training.store import TRAIN_PARTS, Prefetcher, VolumeStore

log = logging.getLogger("pretrain")
METRIC_COLUMNS = ["epoch", "split", "step", "lr", "loss", "contrastive", "level_loss", "level_accuracy",
                  "positive_distance", "negative_distance", "samples", "seconds", "samples_per_s", "data_wait_share"]
TIMING_COLUMNS = ("seconds", "samples_per_s", "data_wait_share")


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of the config (see its schema)."""

    methods: tuple[str, ...] = ("siamese",)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    threads: int = 2
    gpus: int = 0
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    grad_clip: float = 0.0
    lr_factor: float = 0.1
    plateau_patience: int = 3
    lr_drops: int = 2
    max_epochs: int = 100
    checkpoint_every: int = 200
    width: float = 1.0
    embedding_dim: int = 1024
    dropout: float = 0.5
    contrastive_margin: float = 1.0
    level_loss_weight: float = 1.0
    rotation_deg: float = 15.0
    shift_fraction: tuple[float, float] = (0.214, 0.107)
    shift_slices: int = 2
    scale_range: tuple[float, float] = (0.9, 1.1)
    intensity: float = 0.2
    flip: bool = True
    prefetch: int = 4
    eval_batch_size: int = 64

    @classmethod
    def from_config(cls, section: dict[str, Any] | None = None) -> PretrainConfig:
        from stages.core.config import section_config
        return section_config(cls, "pretrain", section)

    def augment_ranges(self) -> AugmentRanges:
        return AugmentRanges(rotation_deg=self.rotation_deg, shift_fraction=self.shift_fraction,
                             shift_slices=self.shift_slices, scale=self.scale_range, intensity=self.intensity,
                             flip=self.flip)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# -------------------------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class AugmentDraw:
    """The random draw of one training step: its generator (seeded by the step), the size of the global batch, and
    the share of it this process holds."""

    generator: torch.Generator
    n_global: int
    mine: slice


class Method(Protocol):
    """What the harness needs from a pretraining method."""

    name: str
    model: nn.Module          # has an ``encoder`` attribute: what downstream stages use

    def n_samples(self, part: str) -> int: ...

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]: ...

    def encoder_spec(self) -> dict[str, Any]: ...


class SiameseMethod:
    """Jamaludin et al. 2017: contrastive loss on the FC7 embeddings of a pair plus the class-balanced level loss on
    FC8 for both volumes. A sample is a pair; the augmentation is drawn for the whole global batch on the device and
    each process takes its slice ``sl`` of it (so DDP sees exactly the single-process batch)."""

    name = "siamese"

    def __init__(self, cfg: PretrainConfig, store: VolumeStore):
        self.cfg = cfg
        self.store = store
        slices, height, width_px = store.shape
        self.spec = EncoderSpec(slices=slices, height=height, width_px=width_px, width=cfg.width,
                                embedding_dim=cfg.embedding_dim, dropout=cfg.dropout)
        self.model = SiameseNet(self.spec)
        train = store.pairs["train"]
        train_rows = np.unique(np.concatenate([train.a.to_numpy(), train.b.to_numpy()]))
        if len(train_rows) == 0:
            raise ValueError(f"nothing to pretrain on: the self-supervision training part has no pairs among "
                             f"{len(store.bodies)} extracted vertebral bodies. Pairs need subjects with two or more "
                             "studies (see results/splits/summary.json) and extracted bodies (see "
                             "results/localise/flags.csv for scans that were skipped)")
        alpha = class_balanced_weights(torch.from_numpy(store.level[train_rows]), len(VERTEBRAE))
        self.contrastive = ContrastiveLoss(cfg.contrastive_margin)
        self.level_loss = BalancedCrossEntropy(alpha)
        self.ranges = cfg.augment_ranges()

    def n_samples(self, part: str) -> int:
        return len(self.store.pairs[part])

    def load(self, part: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = self.store.pairs[part].iloc[idx]
        a, b = pairs.a.to_numpy(), pairs.b.to_numpy()
        return {"a": torch.from_numpy(self.store.load(a)), "b": torch.from_numpy(self.store.load(b)),
                "y": torch.from_numpy(pairs.positive.to_numpy(dtype=np.float32)),
                "level": torch.from_numpy(np.concatenate([self.store.level[a], self.store.level[b]]))}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        a, b = batch["a"], batch["b"]
        if draw is not None:   # training: draw for the global batch, keep this process's share
            params = sample_pair_params(draw.n_global, self.ranges, draw.generator)
            params = dataclasses.replace(
                params, **{f.name: _slice_params(getattr(params, f.name), draw.mine, f.name != "flip")
                           for f in dataclasses.fields(params)})
            a, b = augment_pairs(a, b, params)
        ea, eb, logits = model(a, b)
        level = batch["level"]
        contrastive = self.contrastive(ea, eb, batch["y"])
        level_loss = self.level_loss.to(logits.device)(logits, level)
        loss = contrastive + self.cfg.level_loss_weight * level_loss
        with torch.no_grad():
            d = (ea.float() - eb.float()).pow(2).sum(1).sqrt()
            y = batch["y"] > 0.5
            n = len(y)
            stats = {"pairs": n, "loss": float(loss) * n, "contrastive": float(contrastive) * n,
                     "level_loss": float(level_loss) * n, "volumes": 2 * n,
                     "level_correct": float((logits.argmax(1) == level).sum()),
                     "positives": float(y.sum()), "positive_distance": float(d[y].sum()),
                     "negatives": float((~y).sum()), "negative_distance": float(d[~y].sum())}
        return loss, stats

    def encoder_spec(self) -> dict[str, Any]:
        return self.spec.to_dict()


def _slice_params(values: torch.Tensor, sl: slice, per_volume: bool) -> torch.Tensor:
    """This process's share of a global batch's augmentation parameters (per-volume tensors hold a's, then b's)."""
    if not per_volume:
        return values[sl]
    n = len(values) // 2
    return torch.cat([values[:n][sl], values[n:][sl]])


METHODS: dict[str, Callable[[PretrainConfig, VolumeStore], Method]] = {"siamese": SiameseMethod}


# ---------------------------------------------------------------------------------------------------- the harness

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
        t = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))


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
    best_loss: float = float("inf")   # the watched (validation) loss of the best epoch so far
    best_epoch: int = 0
    sums: dict[str, float] = field(default_factory=dict)   # this epoch's training sums so far
    seconds: float = 0.0
    wait_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def _rng_states(device: torch.device) -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of an epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()


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


def summarise(sums: dict[str, float], split: str, epoch: int, step: int, lr: float, seconds: float,
              wait: float) -> dict[str, Any]:
    """One metrics row from summed batch statistics."""
    pairs = max(sums.get("pairs", 0.0), 1.0)

    def ratio(num: str, den: str) -> float:
        return sums.get(num, 0.0) / sums[den] if sums.get(den) else float("nan")

    return {"epoch": epoch, "split": split, "step": step, "lr": lr, "loss": sums.get("loss", 0.0) / pairs,
            "contrastive": sums.get("contrastive", 0.0) / pairs, "level_loss": sums.get("level_loss", 0.0) / pairs,
            "level_accuracy": ratio("level_correct", "volumes"),
            "positive_distance": ratio("positive_distance", "positives"),
            "negative_distance": ratio("negative_distance", "negatives"), "samples": int(sums.get("pairs", 0)),
            "seconds": seconds, "samples_per_s": sums.get("pairs", 0.0) / seconds if seconds > 0 else float("nan"),
            "data_wait_share": wait / seconds if seconds > 0 else float("nan")}


@torch.no_grad()
def evaluate(method: Method, part: str, cfg: PretrainConfig, world: World, device: torch.device) -> dict[str, float]:
    """Summed statistics over a whole part, without augmentation, in evaluation mode; shared among processes."""
    model = method.model
    model.eval()
    n = method.n_samples(part)
    idx = np.arange(world.rank, n, world.size)
    sums: dict[str, float] = {}
    size = max(1, cfg.eval_batch_size // 2)
    for start in range(0, len(idx), size):
        batch = {k: v.to(device) for k, v in method.load(part, idx[start:start + size]).items()}
        with _autocast(device, cfg):
            _, stats = method.loss(model, batch, None)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    model.train()
    return world.all_sum(sums)


def _autocast(device: torch.device, cfg: PretrainConfig) -> torch.autocast:
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


def train(method_name: str, cfg: PretrainConfig, splits: Path, extract: Path, out: Path,
          max_steps: int | None = None, world: World | None = None) -> pd.DataFrame:
    """Train ``method_name`` to the stopping rule (or ``max_steps`` optimiser steps) and write the outputs."""
    world = world or World.from_env()
    device = select_device(cfg.device, world)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    store = VolumeStore(splits, extract)
    torch.manual_seed(cfg.seed)                      # initial weights: the same on every process
    method = METHODS[method_name](cfg, store)
    method.model.to(device)
    model: nn.Module = method.model
    if world.size > 1:
        model = nn.parallel.DistributedDataParallel(
            method.model, device_ids=[device.index] if device.type == "cuda" else None)
    optimiser = torch.optim.SGD(method.model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="min", factor=cfg.lr_factor,
                                                          patience=cfg.plateau_patience)
    identity = run_identity(method_name, cfg, world.size,
                            {"shape": list(store.shape), **{p: method.n_samples(p) for p in TRAIN_PARTS},
                             "digest": store.digest()})
    state = TrainState()
    best: dict[str, torch.Tensor] = {}   # weights of the epoch with the lowest watched loss: what the run hands on
    resume = out / "resume" / "last.pt"
    if resume.exists():
        saved = torch.load(resume, map_location="cpu", weights_only=False)   # RNG states must stay on the CPU
        if resumable(saved["identity"], identity):
            method.model.load_state_dict(saved["model"])
            optimiser.load_state_dict(saved["optimiser"])
            schedule.load_state_dict(saved["schedule"])
            state = TrainState(**saved["state"])
            best = saved["best_model"]
            _set_rng_states(saved["rng"][world.rank] if world.rank < len(saved["rng"]) else saved["rng"][0], device)
            log.info("resuming from %s: epoch %d, batch %d, step %d", resume, state.epoch, state.batch, state.step)
        else:
            log.warning("ignoring %s: it was written by a run with another config or data", resume)
    else:
        torch.manual_seed(cfg.seed + 1 + world.rank)   # dropout masks

    def checkpoint() -> dict[str, Any]:
        rng = [_rng_states(device)]
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
            _save_atomic(ckpt, path)

    n_train = method.n_samples("train")
    has_val = method.n_samples("val") > 0
    if not has_val:
        log.warning("the self-supervision validation part has no pairs: the plateau rule watches the training loss")
    log.info("%s on %s (%d process(es)): %d training and %d validation samples of shape %s", method_name, device,
             world.size, n_train, method.n_samples("val"), store.shape)
    while not state.done:
        batches = batches_of_epoch(n_train, cfg.batch_size, world, cfg.seed, state.epoch)
        share = len(batches[0]) // world.size
        mine = slice(world.rank * share, (world.rank + 1) * share)
        todo = batches[state.batch:]
        prefetch = Prefetcher(lambda idx: method.load("train", idx[mine]), todo, cfg.prefetch)
        started = time.perf_counter() - state.seconds
        wait0 = state.wait_seconds
        bar = tqdm(total=len(batches), initial=state.batch, desc=f"{method_name} epoch {state.epoch + 1}",
                   file=sys.stderr, disable=not world.main, mininterval=1 if sys.stderr.isatty() else 30,
                   dynamic_ncols=True)
        try:
            for cpu_batch in prefetch:
                batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + state.step)
                with _autocast(device, cfg):
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
                bar.set_postfix(loss=f"{stats['loss'] / max(stats['pairs'], 1):.4f}",
                                samples_per_s=f"{state.sums['pairs'] / max(state.seconds, 1e-9):.1f}", refresh=False)
                if max_steps is not None and state.step >= max_steps:
                    break
                if state.step % cfg.checkpoint_every == 0 and state.batch < len(batches):
                    save(resume)
        finally:
            prefetch.close()   # also when a step raises
        bar.close()
        lr = optimiser.param_groups[0]["lr"]
        train_row = summarise(state.sums, "train", state.epoch + 1, state.step, lr, state.seconds,
                              state.wait_seconds)
        state.rows.append(train_row)
        start = time.perf_counter()
        val_sums = evaluate(method, "val", cfg, world, device) if has_val else {}
        if has_val:
            state.rows.append(summarise(val_sums, "val", state.epoch + 1, state.step, lr,
                                        time.perf_counter() - start, 0.0))
        watched = state.rows[-1]["loss"]
        log.info("epoch %d: train loss %.4f, level accuracy %.3f; %s loss %.4f; %.1f pairs/s, data wait %.1f%%",
                 state.epoch + 1, train_row["loss"], train_row["level_accuracy"], "val" if has_val else "train",
                 watched, train_row["samples_per_s"], 100 * train_row["data_wait_share"])
        if watched < state.best_loss:
            state.best_loss, state.best_epoch = watched, state.epoch + 1
            best = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
        schedule.step(watched)
        if optimiser.param_groups[0]["lr"] < lr:
            state.drops += 1
            log.info("validation loss plateaued: learning rate %.2g -> %.2g", lr, optimiser.param_groups[0]["lr"])
        state.epoch += 1
        state.batch, state.sums, state.seconds, state.wait_seconds = 0, {}, 0.0, 0.0
        state.done = (state.drops > cfg.lr_drops or state.epoch >= cfg.max_epochs
                      or (max_steps is not None and state.step >= max_steps))
        save(resume)
    metrics = pd.DataFrame(state.rows, columns=METRIC_COLUMNS)
    final = checkpoint()   # every process takes part (it gathers their RNG states)
    if best:
        method.model.load_state_dict(best)
        log.info("handing on the weights of epoch %d (lowest %s loss %.4f)", state.best_epoch,
                 "validation" if has_val else "training", state.best_loss)
    if world.main:
        write_outputs(out, method, final, metrics, identity, device, world, state.best_epoch)
        shutil.rmtree(resume.parent, ignore_errors=True)   # its content is in checkpoint.pt now
    if world.size > 1:
        dist.barrier()
    return metrics


def write_outputs(out: Path, method: Method, ckpt: dict[str, Any], metrics: pd.DataFrame, identity: dict[str, Any],
                  device: torch.device, world: World, best_epoch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    encoder = method.model.encoder
    _save_atomic({"method": method.name, "spec": method.encoder_spec(), "state_dict": encoder.state_dict()},
                 out / "encoder.pt")
    _save_atomic(ckpt, out / "checkpoint.pt")
    metrics.to_csv(out / "metrics.csv", index=False)
    stopped = metrics.iloc[-1].to_dict() if len(metrics) else {}
    run_config = {"method": method.name, "pretrain": identity["config"], "data": identity["data"],
                  "device": str(device), "processes": world.size, "torch": str(torch.__version__),
                  "epochs": int(stopped.get("epoch", 0)), "steps": int(stopped.get("step", 0)),
                  "weights_of_epoch": best_epoch}
    (out / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    log.info("wrote %s (%d epochs, %d steps)", out, run_config["epochs"], run_config["steps"])


def build_parser() -> argparse.ArgumentParser:
    # stages.core.cli (and jsonschema behind it) is imported here, not at the top: the GPU benchmark imports this module
    # on machines that have PyTorch but not the workflow's other packages
    from stages.core import cli
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS), help="Pretraining method.")
    parser.add_argument("--splits", type=cli.existing_folder, required=True, help="Output folder of the splits stage.")
    parser.add_argument("--extract", type=cli.existing_folder, required=True, help="Output folder of the extract stage.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder of this method.")
    parser.add_argument("--max-steps", type=cli.positive_int, default=None,
                        help="Stop after this many optimiser steps (a smoke test of a config; default: the "
                             "plateau rule or max_epochs).")
    cli.add_section_options(parser, "pretrain")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from stages.core import cli
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = PretrainConfig.from_config(cli.section_from_args(args, "pretrain", parser))
    cli.setup_logging(args.log, "pretrain")
    if args.method not in cfg.methods:
        log.warning("method %s is not among pretrain.methods %s", args.method, list(cfg.methods))
    world = World.from_env()
    try:
        train(args.method, cfg, args.splits, args.extract, args.out, max_steps=args.max_steps, world=world)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
