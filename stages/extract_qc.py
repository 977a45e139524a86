"""Stage extract_qc: pictures a person checks: localisation on the mid-sagittal slice, and the extracted volumes.

Run:
    python -m stages.extract_qc --manifest results/ingest/manifest.parquet --volumes results/ingest/volumes \\
        --structures results/localise/structures.parquet --flags results/localise/flags.csv \\
        --index results/extract/index.parquet --vertebrae results/extract/vertebrae.npy \\
        --discs results/extract/discs.npy --axial results/extract/axial.npy --qc-scans 12 \\
        --out-localisation localisation.png --out-gallery gallery.png

A crop-table cohort has no localisation: the gallery alone, from --index, --vertebrae and --discs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from stages.anatomy.spine_structures import world_to_index  # noqa: E402
from stages.archive.manifest import add_ingest_inputs, scan_file  # noqa: E402
from stages.core import cli, levels  # noqa: E402

log = logging.getLogger("extract_qc")
COLOURS = {"label_map": "#4cd964", "learned": "#ff9f0a", "landmarks": "#5ac8fa"}


def pick_scans(structures: pd.DataFrame, flags: pd.DataFrame, n: int) -> list[str]:
    """Up to ``n`` scans: flagged ones first (they need a look), then alternating label-map and learned ones."""
    flagged = sorted(set(flags.scan_id) & set(structures.scan_id))
    by_source = {s: sorted(set(g.scan_id) - set(flagged)) for s, g in structures.groupby("source")}
    mixed = [s for pair in zip(*by_source.values()) for s in pair] if len(by_source) > 1 else []
    rest = [s for s in sorted(set(structures.scan_id)) if s not in mixed and s not in flagged]
    return (flagged[: n // 3] + mixed + rest)[:n]


def _message_figure(text: str, out: Path) -> None:
    fig = plt.figure(figsize=(8, 2), facecolor="black")
    fig.text(0.5, 0.5, text, color="white", ha="center", va="center", fontsize=11, wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)


def localisation_figure(manifest: pd.DataFrame, volumes: Path, structures: pd.DataFrame, flags: pd.DataFrame,
                        scans: list[str], out: Path) -> None:
    """The structures of ``scans`` drawn on their mid-sagittal slices (volumes in the folder ``volumes``)."""
    if not scans:
        _message_figure("No scan could be localised (see localise/flags.csv).", out)
        return
    manifest = manifest.set_index("scan_id")
    cols = min(4, len(scans))
    rows = int(np.ceil(len(scans) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.6 * rows), squeeze=False, facecolor="black")
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, scan in zip(axes.ravel(), scans):
        image = sitk.ReadImage(str(scan_file(volumes, manifest.loc[scan, "volume"])), sitk.sitkFloat32)
        volume = sitk.GetArrayFromImage(image)
        table = structures[structures.scan_id == scan]
        k = int(np.clip(np.rint(table.k.median()), 0, len(volume) - 1))
        ax.imshow(volume[k], cmap="gray", vmin=0, vmax=np.percentile(volume[k], 99.5))
        for s in table.itertuples():
            centre = np.array([s.x, s.y, s.z])
            a, p = np.array([s.axis_x, s.axis_y, s.axis_z]), np.array([s.ap_x, s.ap_y, s.ap_z])
            corners = [centre + u * s.height_mm / 2 * a + v * s.depth_mm / 2 * p for u, v in
                       ((-1, -1), (-1, 1), (1, 1), (1, -1), (-1, -1))]
            ij = world_to_index(image, np.array(corners))
            colour = COLOURS.get(s.source, "white")
            ax.plot(ij[:, 0], ij[:, 1], color=colour, lw=0.8 if s.kind == "vertebra" else 0.6,
                    ls="-" if s.kind == "vertebra" else ":")
            if s.kind == "vertebra":
                ax.text(s.i + 0.35 * s.depth_mm / image.GetSpacing()[0] + 2, s.j, s.level, color=colour, fontsize=7,
                        va="center")
        reasons = flags.reason[flags.scan_id == scan].tolist()
        title = f"{scan[:13]} · {table.source.iloc[0].replace('_', ' ')}"
        ax.set_title(title + ("\nFLAGGED: " + reasons[0][:48] if reasons else ""), fontsize=8,
                     color="#ff453a" if reasons else "white")
    fig.suptitle("Localisation on the mid-sagittal slice: green = from label map, orange = learned localiser, "
                 "blue = landmark table; "
                 "solid = vertebral body, dotted = disc", color="white", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)


def gallery_figure(index: pd.DataFrame, arrays: dict[str, np.ndarray], n_scans: int, out: Path) -> None:
    """The middle slices of the extracted volumes of the first ``n_scans`` scans of ``index``; ``arrays``: vertebrae,
    discs and (but for a crop-table cohort) axial."""
    if index.empty:
        _message_figure("No volume was extracted: every scan was flagged by localisation (see localise/flags.csv).", out)
        return
    scans = list(dict.fromkeys(index.scan_id))[:n_scans]
    panels = [("vertebrae", "vertebra", levels.VERTEBRAE), ("discs", "disc", levels.DISCS), ("axial", "disc", levels.DISCS)]
    crops = bool((index.source == "crop_table").all())
    if crops or "axial" not in arrays:  # pre-cut crops are not resliced: no axial slices
        panels = panels[:2]
    n_cols = sum(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(scans), n_cols, figsize=(1.25 * n_cols, 1.5 * len(scans) + 0.8), squeeze=False,
                             facecolor="black")
    for r, scan in enumerate(scans):
        c = 0
        rows = index[index.scan_id == scan]
        for array, kind, names in panels:
            for name in names:
                ax = axes[r, c]
                ax.set_axis_off()
                hit = rows[(rows.kind == kind) & (rows.level == name)]
                if len(hit):
                    volume = arrays[array][int(hit.row.iloc[0])].astype(np.float32)
                    ax.imshow(volume[len(volume) // 2], cmap="gray", vmin=0, vmax=1.2)
                if r == 0:
                    ax.set_title(("axial " if array == "axial" else "") + name, color="white", fontsize=7)
                c += 1
        axes[r, 0].text(-0.1, 0.5, scan[:13], transform=axes[r, 0].transAxes, color="white", fontsize=6,
                        rotation=90, va="center", ha="right")
    title = ("Crops of the crop table as the later stages see them, middle slice: vertebral bodies and discs brought "
             "to the extraction sizes; intensity 0-1.2 (neighbouring bodies' median, or the crop's own, = 0.5)" if crops
             else "Extracted volumes, middle slice: vertebral bodies (rows down the spine, anterior left), discs, and "
                  "axial slices through each disc; intensity 0-1.2 (neighbouring bodies' median = 0.5)")
    fig.suptitle(title, color="white", fontsize=9, wrap=True)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.extract_qc", description=__doc__.split("\n\n")[0])
    located = parser.add_argument_group("localisation figure (none for a crop-table cohort)")
    add_ingest_inputs(located, "manifest", "volumes", required=False)
    located.add_argument("--structures", type=cli.existing_file, default=None,
                         help="structures.parquet of the localise stage.")
    located.add_argument("--flags", type=cli.existing_file, default=None, help="flags.csv of the localise stage.")
    located.add_argument("--qc-scans", type=cli.positive_int, default=12,
                         help="Scans in the localisation figure (extract.qc_scans; default: 12).")
    located.add_argument("--out-localisation", type=Path, default=None, help="PNG of the localisation figure.")
    gallery = parser.add_argument_group("gallery of extracted volumes")
    gallery.add_argument("--index", type=cli.existing_file, required=True, help="index.parquet of the extraction.")
    for name in ("vertebrae", "discs"):
        gallery.add_argument(f"--{name}", type=cli.existing_file, required=True, help=f"{name}.npy of the extraction.")
    gallery.add_argument("--axial", type=cli.existing_file, default=None,
                         help="axial.npy of the extraction (none for a crop-table cohort).")
    gallery.add_argument("--out-gallery", type=Path, required=True, help="PNG of the gallery of extracted volumes.")
    cli.add_log_option(parser)
    return parser


LOCALISATION = ("manifest", "volumes", "structures", "flags", "out_localisation")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [getattr(args, name) is not None for name in LOCALISATION]
    if any(given) and not all(given):
        parser.error("the localisation figure needs all of --manifest, --volumes, --structures, --flags and "
                     "--out-localisation")
    cli.setup_logging(args.log, "extract_qc")
    if all(given):
        structures = pd.read_parquet(args.structures)
        flags = pd.read_csv(args.flags)
        localisation_figure(pd.read_parquet(args.manifest), args.volumes, structures, flags,
                            pick_scans(structures, flags, args.qc_scans), args.out_localisation)
        log.info("wrote %s", args.out_localisation)
    arrays = {name: np.load(path, mmap_mode="r") for name, path in
              (("vertebrae", args.vertebrae), ("discs", args.discs), ("axial", args.axial)) if path is not None}
    gallery_figure(pd.read_parquet(args.index), arrays, 4, args.out_gallery)
    log.info("wrote %s", args.out_gallery)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
