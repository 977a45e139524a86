"""Stage supervised: the supervised-transfer encoder, the "upper bound" of Jamaludin et al. 2017 (section 4.2).

The pretraining network is trained *with labels* over the self-supervision training part (validation: the
self-supervision validation part): with ``--discs`` (probes.disc_input: disc), the disc classifier on each graded disc's
volume (stages/nets/disc_cnn.py; its Conv1-Conv5 and FC6-FC7 are saved as the encoder); with ``--vertebrae``, the
Pfirrmann grade of each graded disc from its two bodies (stages/nets/disc_net.py) plus the vertebral level of each body,
both class-balanced. Its encoder is then frozen and probed like the
self-supervised ones. It sees the grades of every graded training subject there, whatever the label subset: that is
what makes it an upper bound, not a fair competitor. No downstream validation or test subject is ever in the
self-supervision training or validation parts (checked again here before training).

Run:
    python -m stages.supervised --subjects results/splits/subjects.parquet --volumes results/splits/volumes.parquet \\
        --vertebrae results/extract/vertebrae.npy --encoder results/probes/encoders/supervised/encoder.pt \\
        --history results/probes/encoders/supervised/history.csv --width 0.125 --embedding-dim 1024

Writes ``--encoder`` (encoder.pt as pretraining writes it: method, spec, weights) and ``--history`` (CSV).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.core import cli, seeds
from stages.core.levels import VERTEBRAE
from stages.core.runtime import select_device
from stages.evaluation.probe_data import (
    TASKS,
    ProbeConfig,
    check_training_subjects,
    grade_mapping,
    task_samples,
)
from stages.nets.disc_cnn import DiscClassifier
from stages.nets.disc_net import BodyReader, DiscNet, fit
from stages.nets.siamese import EncoderSpec
from stages.training.classify import (
    ClassifierFit,
    classification_ranges,
    fit_classifier,
    volume_batches,
)

log = logging.getLogger("supervised")
GRADES = np.arange(1, 6)


def training_samples(volumes: pd.DataFrame, subjects: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Graded discs of the self-supervision training and validation parts, with both bodies' level indices."""
    samples, _ = task_samples(volumes, TASKS["grade"])
    level_index = {lv: i for i, lv in enumerate(VERTEBRAE)}
    samples = samples.assign(target=np.searchsorted(GRADES, samples.label.to_numpy()),
                             upper_level=[level_index[lv.split("-")[0]] for lv in samples.level],
                             lower_level=[level_index[lv.split("-")[1]] for lv in samples.level])
    train = samples[samples.ssl_part == "train"].reset_index(drop=True)
    val = samples[samples.ssl_part == "val"].reset_index(drop=True)
    check_training_subjects(set(train.subject_id) | set(val.subject_id), subjects, ("train", "none"))
    check_training_subjects(set(train.subject_id), subjects, ("train",), column="ssl_part")
    return train, val


def disc_samples(volumes: pd.DataFrame, subjects: pd.DataFrame,
                 grade_classes: tuple[int, ...]) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Graded disc volumes of the self-supervision training and validation parts (target: the grade's class index)
    and the number of classes."""
    samples, _ = task_samples(volumes, TASKS["grade"], "disc")
    samples = samples.assign(target=samples.label.map(grade_mapping(grade_classes)).astype(int) - 1)
    train = samples[samples.ssl_part == "train"].reset_index(drop=True)
    val = samples[samples.ssl_part == "val"].reset_index(drop=True)
    check_training_subjects(set(train.subject_id) | set(val.subject_id), subjects, ("train", "none"))
    check_training_subjects(set(train.subject_id), subjects, ("train",), column="ssl_part")
    return train, val, max(grade_classes)


def run_on_discs(subjects_file: Path, volumes_file: Path, discs: Path, encoder_file: Path, history_file: Path,
                 cfg: ProbeConfig, width: float, embedding_dim: int,
                 grade_classes: tuple[int, ...] = (1, 2, 3, 4, 5)) -> pd.DataFrame:
    """Train the disc classifier (stages/nets/disc_cnn.py) end to end on the graded disc volumes of the
    self-supervision parts, with the classification augmentation; write its Conv1-Conv5 and FC6-FC7 as
    ``encoder_file`` (an encoder of disc-sized volumes) and ``history_file``."""
    subjects = pd.read_parquet(subjects_file)
    volumes = pd.read_parquet(volumes_file)
    train, val, n_classes = disc_samples(volumes, subjects, grade_classes)
    if train.empty:
        raise ValueError("no graded disc in the self-supervision training part: the supervised-transfer encoder "
                         "cannot be trained (drop 'supervised' from probes.baselines)")
    rows = np.concatenate([train.row.to_numpy(), val.row.to_numpy()]).astype(np.int64)
    read = BodyReader(discs, rows)
    shape = read.array.shape[1:]
    spec = EncoderSpec(slices=shape[0], height=shape[1], width_px=shape[2], width=width, embedding_dim=embedding_dim,
                       dropout=0.0)
    seed = seeds.supervised_encoder(cfg.seed)
    seeds.seed_torch(seed)
    net = DiscClassifier(spec, n_classes, cfg.dropout)
    device = select_device(cfg.device, "probe_training.device")
    log.info("supervised training of the disc classifier on %d graded discs (%d subjects), validation %d discs",
             len(train), train.subject_id.nunique(), len(val))
    targets = np.concatenate([train.target.to_numpy(), val.target.to_numpy()])
    net, history = fit_classifier(net, volume_batches(lambda pos: read(rows[pos]), classification_ranges(cfg), seed,
                                                      device),
                                  targets, len(train), len(val), n_classes, ClassifierFit.from_section(cfg, seed),
                                  device)
    state = net.cpu().as_encoder().state_dict()
    for path in (encoder_file, history_file):
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"method": "supervised", "structure": "disc", "spec": spec.to_dict(), "state_dict": state},
               encoder_file)
    history.to_csv(history_file, index=False)
    return history


def run(subjects_file: Path, volumes_file: Path, vertebrae: Path, encoder_file: Path, history_file: Path,
        cfg: ProbeConfig, width: float, embedding_dim: int) -> pd.DataFrame:
    """Train the supervised-transfer encoder on the self-supervision parts' graded discs (the splits' tables, the
    ``vertebrae`` array store); write ``encoder_file`` and ``history_file``; return the history."""
    subjects = pd.read_parquet(subjects_file)
    volumes = pd.read_parquet(volumes_file)
    train, val = training_samples(volumes, subjects)
    if train.empty:
        raise ValueError("no graded disc in the self-supervision training part: the supervised-transfer encoder "
                         "cannot be trained (drop 'supervised' from probes.baselines)")
    rows = np.concatenate([f[c].to_numpy() for f in (train, val) for c in ("upper", "lower")])
    read = BodyReader(vertebrae, rows)
    shape = read.array.shape[1:]
    spec = EncoderSpec(slices=shape[0], height=shape[1], width_px=shape[2], width=width, embedding_dim=embedding_dim)
    seed = seeds.supervised_encoder(cfg.seed)
    seeds.seed_torch(seed)
    net = DiscNet(spec, len(GRADES), inputs=2, level_head=True)
    log.info("supervised pretraining on %d graded discs (%d subjects), validation %d discs", len(train),
             train.subject_id.nunique(), len(val))
    net, history = fit(net, train, val, read, len(GRADES), cfg.fit_config(seed, cfg.level_loss_weight),
                       select_device(cfg.device, "probe_training.device"))
    for path in (encoder_file, history_file):
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"method": "supervised", "spec": spec.to_dict(), "state_dict": net.encoder.cpu().state_dict()},
               encoder_file)
    history.to_csv(history_file, index=False)
    return history


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.supervised", description=__doc__.split("\n\n")[0])
    cli.add_split_tables(parser)
    array = parser.add_mutually_exclusive_group(required=True)
    array.add_argument("--vertebrae", type=cli.existing_file,
                       help="vertebrae.npy of the extract stage: train on each graded disc's two bodies.")
    array.add_argument("--discs", type=cli.existing_file,
                       help="discs.npy of the extract stage: train the disc classifier on the disc volumes.")
    parser.add_argument("--grade-classes", type=int, nargs=5, default=[1, 2, 3, 4, 5], metavar="CLASS",
                        help="--discs: the class of Pfirrmann grades 1..5 (probes.grade_classes).")
    parser.add_argument("--encoder", type=Path, required=True, help="Output: encoder.pt (the trained encoder).")
    parser.add_argument("--history", type=Path, required=True, help="Output: history.csv (the loss per epoch).")
    cli.add_encoder_size_options(parser)
    cli.add_section_options(parser, "probe_training")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = ProbeConfig.from_config(cli.section_from_args(args, "probe_training", parser))
    cli.setup_logging(args.log, "supervised")
    if args.discs is not None:
        run_on_discs(args.subjects, args.volumes, args.discs, args.encoder, args.history, cfg, args.width,
                     args.embedding_dim, tuple(args.grade_classes))
    else:
        run(args.subjects, args.volumes, args.vertebrae, args.encoder, args.history, cfg, args.width,
            args.embedding_dim)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
