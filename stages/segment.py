"""Stage segment: the segmentation downstream (Cao et al. 2022, Table 2, on spine anatomy). One 3D encoder, pretrained
(``--encoder``, the handed-on backbone of any 3D method: the Siamese trunk or a ResNet-18) or from scratch
(``--scratch``: the same network at pretraining's initial weights, ``--backbone`` naming it), under MONAI's U-Net decoder (stages/nets/segmenter.py), trained end to end to label the
vertebrae and discs on the mid-sagittal slice of each lumbar region (stages/training/segmenter.py), on nested
label subsets of the downstream training subjects with a label map (``segmentation.label_fractions``), and scored on
every downstream test subject's scans: DSC, PPV, LTPR and LFPR per structure class with intervals over subjects
(stages/evaluation/segmentation.py). The label maps are the ground truth; validation and test subjects never train.

Run:
    python -m stages.segment --regions results/regions/regions.npy --labels results/regions/labels.npy \\
        --table results/regions/regions.parquet --encoder results/pretrain/siamese/encoder.pt \\
        --out-scores results/segmentation/siamese/scores.parquet \\
        --out-summary results/segmentation/siamese/summary.parquet \\
        --out-history results/segmentation/siamese/history.csv --out-examples results/segmentation/siamese/examples.npz

From scratch: ``--scratch --slices 9 --width 0.125 --embedding-dim 128 --encoder-seed 0`` instead of ``--encoder``.

Writes ``--out-scores`` (Parquet, a CSV copy beside it): one row per label subset, seed, test scan and structure class,
with its counts (stages/evaluation/segmentation.py) and its DSC and PPV; ``--out-summary`` (Parquet and CSV): per
subset, structure and metric, the value over the test scans (every seed) and its bootstrap interval over subjects;
``--out-history``: each network's loss per epoch; ``--out-examples``: for a few test scans, the input's middle slice,
the truth and each subset's prediction (seed 0), for the report's figure. A cohort without label maps in the training
or test subjects writes empty tables and says so.
"""

from __future__ import annotations

import argparse
import copy
import logging

import numpy as np
import pandas as pd
import torch

from stages.archive.manifest import write_table
from stages.core import cli
from stages.core.errors import LeakageError
from stages.evaluation.segmentation import (
    TALLY_COLUMNS,
    bootstrap,
    scan_metrics,
    tally_scan,
)
from stages.nets.encoders import Encoder, load_encoder, random_encoder
from stages.nets.siamese import BACKBONES
from stages.nets.segmenter import TrunkUNet
from stages.training.segmenter import (
    CLASSES,
    SegmentationConfig,
    fit,
    mid_sagittal,
    nested_subsets,
    predict,
)

log = logging.getLogger("segment")
OUTPUTS = {
    "scores": "Per label subset, seed, test scan and structure: counts, DSC, PPV (Parquet; a CSV copy beside it).",
    "summary": "Per label subset, structure and metric: value and bootstrap interval (Parquet; a CSV copy beside it).",
    "history": "Each network's loss per epoch (CSV).",
    "examples": "A few test scans' input, truth and predictions (npz).",
}
EXAMPLES = 4


def parts(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The regions with a label map of the downstream training and test subjects; LeakageError if a subject is in
    both."""
    labelled = table[table.has_labels.astype(bool)]
    train, test = labelled[labelled.downstream_part == "train"], labelled[labelled.downstream_part == "test"]
    shared = set(train.subject_id) & set(test.subject_id)
    if shared:
        raise LeakageError(f"{len(shared)} subject(s) are both downstream training and test subjects: re-run splits")
    return train, test


def segment(encoder: Encoder, regions: np.ndarray, labels: np.ndarray, table: pd.DataFrame,
            cfg: SegmentationConfig, model: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Train and score ``encoder`` (copied afresh for every network) on every label subset and seed: the scores,
    the summary, the histories and the examples."""
    train, test = parts(table.reset_index(drop=True))
    slices = encoder.spec.slices
    scores, summaries, histories = [], [], []
    examples: dict[str, np.ndarray] = {}
    if train.empty or test.empty:
        log.warning("no label maps among the %s subjects: nothing to segment",
                    "training" if train.empty else "test")
        return (pd.DataFrame(columns=["model", "fraction", "seed", "scan_id", "subject_id", "structure",
                                      *TALLY_COLUMNS, "dice", "ppv"]),
                pd.DataFrame(columns=["model", "fraction", "n_subjects", "structure", "metric", "value", "ci_low",
                                      "ci_high", "scans", "subjects"]),
                pd.DataFrame(columns=["model", "fraction", "seed", "epoch", "loss"]), examples)
    x_test, y_test = mid_sagittal(regions[test.row.to_numpy()], labels[test.row.to_numpy()], slices, cfg)
    shown = np.arange(min(EXAMPLES, len(test)))
    examples.update(image=x_test[shown, (slices - 1) // 2].numpy(), truth=y_test[shown].numpy(),
                    scans=test.scan_id.to_numpy()[shown].astype(str))
    for seed in range(cfg.seeds):
        subsets = nested_subsets(sorted(set(train.subject_id)), cfg.label_fractions, cfg.seed + seed)
        for fraction, subjects in subsets.items():
            chosen = train[train.subject_id.isin(subjects)]
            x, y = mid_sagittal(regions[chosen.row.to_numpy()], labels[chosen.row.to_numpy()], slices, cfg)
            torch.manual_seed(cfg.seed + 1000 * seed)      # the decoder's initial weights: the same for every model
            net = TrunkUNet(copy.deepcopy(encoder), len(CLASSES) + 1, tuple(cfg.decoder_channels))
            history = fit(net, x, y, cfg, cfg.seed + seed)
            histories += [{"model": model, "fraction": fraction, "seed": seed, "epoch": e + 1, "loss": v}
                          for e, v in enumerate(history)]
            predicted = predict(net, x_test)
            for i, scan in enumerate(test.itertuples()):
                counts = tally_scan(predicted[i], y_test[i].numpy(), CLASSES)
                scores.append(counts.assign(model=model, fraction=fraction, seed=seed, scan_id=scan.scan_id,
                                            subject_id=scan.subject_id))
            if seed == 0:
                examples[f"predicted_{fraction:g}"] = predicted[shown]
            log.info("%s, %d training subjects (%g), seed %d: last loss %.4f", model, len(subjects), fraction, seed,
                     history[-1])
    table_scores = scan_metrics(pd.concat(scores, ignore_index=True))
    sizes = {f: len(s) for f, s in nested_subsets(sorted(set(train.subject_id)), cfg.label_fractions,
                                                   cfg.seed).items()}
    for fraction, group in table_scores.groupby("fraction", sort=True):
        summary = bootstrap(group, cfg.bootstrap, cfg.ci_level, cfg.seed)
        summaries.append(summary.assign(model=model, fraction=fraction, n_subjects=sizes[fraction]))
    columns = ["model", "fraction", "seed", "scan_id", "subject_id", "structure", *TALLY_COLUMNS, "dice", "ppv"]
    summary = pd.concat(summaries, ignore_index=True)
    summary = summary[["model", "fraction", "n_subjects", *[c for c in summary.columns
                                                             if c not in ("model", "fraction", "n_subjects")]]]
    return table_scores[columns], summary, pd.DataFrame(histories), examples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=cli.existing_file, required=True,
                        help="regions.npy of the lumbar_regions stage.")
    parser.add_argument("--labels", type=cli.existing_file, required=True,
                        help="labels.npy of the lumbar_regions stage (the regions' label maps).")
    parser.add_argument("--table", type=cli.existing_file, required=True,
                        help="regions.parquet of the lumbar_regions stage (subjects, parts, has_labels).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", type=cli.existing_file, help="A pretrained encoder.pt (a 3D method's).")
    source.add_argument("--scratch", action="store_true",
                        help="The same network from pretraining's initial weights (with --slices, --width, "
                             "--embedding-dim, --encoder-seed).")
    parser.add_argument("--model", default=None, help="The model's name in the tables (default: the encoder's "
                                                      "method, or scratch).")
    parser.add_argument("--slices", type=cli.positive_int, default=None, help="--scratch: slices of the trunk.")
    parser.add_argument("--width", type=float, default=None, help="--scratch: pretrain.width.")
    parser.add_argument("--embedding-dim", type=cli.positive_int, default=None,
                        help="--scratch: pretrain.embedding_dim.")
    parser.add_argument("--encoder-seed", type=int, default=None, help="--scratch: pretrain.seed.")
    parser.add_argument("--backbone", choices=BACKBONES, default="trunk",
                        help="--scratch: the network (default: %(default)s; resnet18: the 3D ResNet-18).")
    cli.add_section_options(parser, "segmentation")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = SegmentationConfig.from_config(cli.section_from_args(args, "segmentation", parser))
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    if args.scratch:
        missing = [o for o in ("slices", "width", "embedding_dim", "encoder_seed") if getattr(args, o) is None]
        if missing:
            parser.error(f"--scratch needs --{missing[0].replace('_', '-')}")
    cli.setup_logging(args.log, "segment")
    torch.set_num_threads(cfg.threads)
    if args.scratch:
        encoder = random_encoder((args.slices, *cfg.size), args.encoder_seed, args.width, args.embedding_dim,
                                 args.backbone)
        model = args.model or ("scratch" if args.backbone == "trunk" else f"scratch_{args.backbone}")
    else:
        encoder, saved = load_encoder(args.encoder)
        model = args.model or saved["method"]
    table = pd.read_parquet(args.table)
    regions, labels = np.load(args.regions, mmap_mode="r"), np.load(args.labels, mmap_mode="r")
    if len(regions) != len(table) or labels.shape != regions.shape:
        parser.error(f"{args.regions} ({len(regions)} regions), {args.labels} and {args.table} ({len(table)} rows) "
                     "are not from one lumbar_regions run")
    scores, summary, history, examples = segment(encoder, regions, labels, table, cfg, model)
    write_table(scores, out["scores"])
    write_table(summary, out["summary"])
    out["history"].parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(out["history"], index=False)
    np.savez_compressed(out["examples"], **examples)
    log.info("%s: wrote %s and %s", model, out["scores"], out["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
