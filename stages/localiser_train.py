"""Stage localiser_train: train the learned localiser on the scans that have label maps (``localise.model: cohort``).

Subjects whose label maps are withheld (``localise.withhold_label_fraction``, for the demo) are left out of training
so that the localise stage can measure the localiser on them.

Run:
    python -m stages.localiser_train --manifest results/ingest/manifest.parquet --volumes results/ingest/volumes \\
        --labels results/ingest/labels --threads 2 --out-model results/localise/model/localiser.pt \\
        --out-history results/localise/model/training.csv --out-scans results/localise/model/training_scans.csv

Writes ``--out-model`` (weights and the config it was trained with), ``--out-history`` (loss per epoch) and
``--out-scans`` (the scans it learned from).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pandas as pd
import torch

from stages.anatomy.localiser import (
    BUILTIN,
    HeatmapUNet,
    LocaliseConfig,
    load_localiser,
    save_localiser,
    train,
    training_samples,
    withheld_subjects,
)
from stages.archive.manifest import add_ingest_inputs, scan_file
from stages.core import cli

log = logging.getLogger("localiser_train")


def training_scans(manifest: pd.DataFrame, cfg: LocaliseConfig) -> pd.DataFrame:
    hidden = withheld_subjects(manifest.subject_id.tolist(), cfg.withhold_label_fraction, cfg.seed)
    labelled = manifest[(manifest.label_map.fillna("") != "") & ~manifest.subject_id.isin(hidden)]
    return labelled.sort_values("scan_id")


def starting_point(cfg: LocaliseConfig) -> tuple[HeatmapUNet | None, LocaliseConfig]:
    """The built-in weights to start from (``start_from_builtin``), and the config with their network's settings;
    else no start and the config as given."""
    if not cfg.start_from_builtin:
        return None, cfg
    model, builtin = load_localiser(BUILTIN)
    kept = {"width": builtin.width, "image_size": builtin.image_size, "heatmap_sigma_mm": builtin.heatmap_sigma_mm}
    log.info("starting from the built-in weights (%s): %s", BUILTIN.name, kept)
    return model, dataclasses.replace(cfg, **kept)


OUTPUTS = {
    "model": "The localiser: weights and the config it was trained with (PyTorch).",
    "history": "Loss per epoch (CSV).",
    "scans": "The scans it learned from (CSV).",
}


def run(manifest_file: Path, volumes: Path, labels: Path, out: dict[str, Path], cfg: LocaliseConfig) -> Path:
    """Train on the labelled scans of ``manifest_file`` (volumes and label maps in the folders ``volumes`` and
    ``labels``); write the OUTPUTS named in ``out``."""
    manifest = pd.read_parquet(manifest_file)
    scans = training_scans(manifest, cfg)
    for target in out.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    path = out["model"]
    if scans.empty:
        # Not an error: the cohort may be localised from label maps only. The localise stage flags every scan that
        # would have needed the localiser.
        log.warning("no scan with a label map to train the localiser on (cohort.label_dir, or fewer withheld): "
                    "the localiser stays untrained")
        save_localiser(None, cfg, path)
        pd.DataFrame(columns=["epoch", "loss"]).to_csv(out["history"], index=False)
        scans[["scan_id", "subject_id"]].to_csv(out["scans"], index=False)
        return path
    log.info("training on %d labelled scans of %d subjects", len(scans), scans.subject_id.nunique())
    start, cfg = starting_point(cfg)
    samples = [training_samples(str(scan_file(volumes, s.volume)), str(scan_file(labels, s.label_map)), cfg)
               for s in scans.itertuples()]
    model, history = train(samples, cfg, start)
    save_localiser(model, cfg, path)
    pd.DataFrame(history).to_csv(out["history"], index=False)
    scans[["scan_id", "subject_id"]].to_csv(out["scans"], index=False)
    log.info("final loss %.5f; wrote %s", history[-1]["loss"] if history else float("nan"), path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.localiser_train", description=__doc__.split("\n\n")[0])
    add_ingest_inputs(parser, "manifest", "volumes", "labels")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="PyTorch CPU threads (default: 1).")
    cli.add_section_options(parser, "localise")
    cli.add_output_options(parser, OUTPUTS)
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = LocaliseConfig.from_config(cli.section_from_args(args, "localise", parser))
    out = cli.outputs_from_args(args, parser, OUTPUTS)
    cli.setup_logging(args.log, "localiser_train")
    torch.set_num_threads(args.threads)
    run(args.manifest, args.volumes, args.labels, out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
