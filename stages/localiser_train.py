"""Stage localiser_train: train the learned localiser on the scans that have label maps.

Subjects whose label maps are withheld (``localise.withhold_label_fraction``, for the demo) are left out of training
so that the localise stage can measure the localiser on them.

Run:
    python -m stages.localiser_train --ingest results/ingest --out results/localise/model --threads 2

Writes ``localiser.pt`` (weights and the config it was trained with), ``training.csv`` (loss per epoch) and
``training_scans.csv`` (the scans it learned from).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pandas as pd
import torch

from stages.anatomy.localiser import LocaliseConfig, train, training_samples, withheld_subjects
from stages.core import cli

log = logging.getLogger("localiser_train")


def training_scans(manifest: pd.DataFrame, cfg: LocaliseConfig) -> pd.DataFrame:
    hidden = withheld_subjects(manifest.subject_id.tolist(), cfg.withhold_label_fraction, cfg.seed)
    labelled = manifest[(manifest.label_map.fillna("") != "") & ~manifest.subject_id.isin(hidden)]
    return labelled.sort_values("scan_id")


def run(ingest: Path, out: Path, cfg: LocaliseConfig) -> Path:
    manifest = pd.read_parquet(ingest / "manifest.parquet")
    scans = training_scans(manifest, cfg)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "localiser.pt"
    if scans.empty:
        # Not an error: the cohort may be localised from label maps only. The localise stage flags every scan that
        # would have needed the localiser.
        log.warning("no scan with a label map to train the localiser on (cohort.label_dir, or fewer withheld): "
                    "the localiser stays untrained")
        torch.save({"state_dict": None, "config": dataclasses.asdict(cfg)}, path)
        pd.DataFrame(columns=["epoch", "loss"]).to_csv(out / "training.csv", index=False)
        scans[["scan_id", "subject_id"]].to_csv(out / "training_scans.csv", index=False)
        return path
    log.info("training on %d labelled scans of %d subjects", len(scans), scans.subject_id.nunique())
    samples = [training_samples(str(ingest / s.volume), str(ingest / s.label_map), cfg) for s in scans.itertuples()]
    model, history = train(samples, cfg)
    torch.save({"state_dict": model.state_dict(), "config": dataclasses.asdict(cfg)}, path)
    pd.DataFrame(history).to_csv(out / "training.csv", index=False)
    scans[["scan_id", "subject_id"]].to_csv(out / "training_scans.csv", index=False)
    log.info("final loss %.5f; wrote %s", history[-1]["loss"] if history else float("nan"), path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localiser_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingest", type=Path, required=True, help="Output folder of the ingest stage.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder for the model.")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="PyTorch CPU threads (default: 1).")
    cli.add_section_options(parser, "localise")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.ingest / "manifest.parquet").is_file():
        parser.error(f"--ingest {args.ingest} has no manifest.parquet")
    cfg = LocaliseConfig.from_config(cli.section_from_args(args, "localise", parser))
    cli.setup_logging(args.log, "localiser_train")
    torch.set_num_threads(args.threads)
    run(args.ingest, args.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
