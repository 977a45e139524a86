"""Stage figures: the report's figures and tables, each drawn from result tables only (one subcommand per figure).

- ``pretext``: per pretrained method, the histogram of the L2 distances of positive (same subject, years apart) and
  negative test pairs and the ROC curve of "same subject" with its AUC, beside the untrained network's
  (Jamaludin et al. 2017, Fig. 6).
- ``label-efficiency``: the headline metric of every task against the number of training subjects (and scans), per
  model, with the bootstrap confidence band (Jamaludin Fig. 8); and a table of the figure of merit.
- ``label-curves``: herniation accuracy and ROC AUC against the number of labelled training discs, every model with
  the supervised-transfer baseline (Hou et al. 2023, Fig. 9).
- ``roc``: herniation ROC curves per model, every label (Hou Fig. 8).
- ``confusion``: the grade's confusion matrices per model, every label, summed over the seeds.
- ``metrics-table``: ACC, SEN, SPE and AUC of herniation as mean +- std over seeds per model and head (Cao et al. 2022,
  Table 1 layout).
- ``segmentation-table`` and ``segmentation``: the segmentation downstream per encoder and label subset (Cao et al.
  2022, Table 2 layout), DSC against labelled subjects and example predictions.
- ``ablation-table``: MLSSCL with both losses, the multiview loss alone and the long-short loss alone: pretext top-1
  and the disc tasks (Cao et al. 2022, Table 3 layout).
- ``embeddings``: 2D t-SNE of the test bodies' frozen features, per encoder, coloured by level, grade, subject and
  field strength (from stages/embeddings.py).
- ``training``: training curves: pretraining loss and level accuracy per method and epoch, the supervised encoder's
  and the end-to-end models' losses.
- ``gradcam``, ``pairs`` and ``attention``: the Grad-CAM examples, the Siamese pair explanations and the
  attention-inside-the-disc table (from stages/gradcam.py).

Every figure is written as PNG (200 dpi) and PDF; every table as HTML (for the report) and CSV. Each subcommand
takes the files it reads and the files it writes, as the rule declares them; the options are named after the rule's
inputs and outputs (workflow/rules/report.smk).

Run:
    python -m stages.figures label-efficiency --summary results/probes/summary.parquet \\
        --png results/report/figures/label_efficiency.png --pdf results/report/figures/label_efficiency.pdf
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stages.core import cli  # noqa: E402
from stages.core.levels import DISCS, VERTEBRAE  # noqa: E402
from stages.evaluation import benchmark as bm  # noqa: E402
from stages.evaluation.metrics import roc_auc, roc_curve  # noqa: E402
from stages.evaluation.probe_data import TASKS, run_of  # noqa: E402

log = logging.getLogger("figures")
METRIC_NAMES = {"average_class_accuracy": "average class accuracy", "accuracy": "accuracy", "auc": "ROC AUC",
                "sensitivity": "sensitivity", "specificity": "specificity"}
TASK_NAMES = {"grade": "Pfirrmann grade", "herniation": "herniation", "level": "vertebral level"}
# Fixed colours per model, so that a model has one colour in every figure.
KNOWN = {"siamese": "#1b6ca8", "simclr": "#7b3294", "moco": "#b2182b", "byol": "#66a61e",
         "longitudinal_nce": "#d01c8b", "random": "#8c8c8c", "scratch": "#d9822b", "supervised": "#2e8b57",
         "simclr-random": "#b8a4c9", "simclr-scratch": "#f2b880",   # light: simclr's own
         "mlsscl": "#e6ab02", "mlsscl_multiview": "#a6761d", "mlsscl_long_short": "#1f9e89"}
CYCLE = ["#c2185b", "#00897b", "#6d4c41", "#3949ab", "#afb42b"]
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 100, "savefig.bbox": "tight",
                     "axes.spines.top": False, "axes.spines.right": False})


def colour(model: str, models: list[str]) -> str:
    """A model's colour: fixed for the built-in names, then from a cycle in the order of ``models``."""
    if model in KNOWN:
        return KNOWN[model]
    if model.endswith("-finetune") and model.removesuffix("-finetune") in KNOWN:
        return KNOWN[model.removesuffix("-finetune")]
    others = [m for m in models if m not in KNOWN]
    return CYCLE[others.index(model) % len(CYCLE)] if model in others else "#000000"


def style(model: str, head: str) -> dict[str, Any]:
    """Line style: solid for a linear head (or end to end), dashed for an MLP, dash-dotted for Hou et al.'s slices
    head (and each of its grid's settings), dotted for fine-tuning."""
    if model.endswith("-finetune"):
        return {"linestyle": ":"}
    if head.startswith("slices"):
        return {"linestyle": "-."}
    return {"linestyle": "--" if head == "mlp" else "-"}


def label(model: str, head: str, end_to_end: Iterable[str] = ("scratch",)) -> str:
    if model in end_to_end or model.endswith("-finetune"):
        return f"{model} (end to end)"
    return f"{model} ({head} probe)"


class FigureFiles(NamedTuple):
    """The files of a figure: PNG (200 dpi, shown in the HTML report) and PDF (for a paper)."""

    png: Path
    pdf: Path


class TableFiles(NamedTuple):
    """The files of a table: a standalone HTML page (shown in the report) and CSV."""

    html: Path
    csv: Path


def save(fig: plt.Figure, out: FigureFiles) -> list[Path]:
    """The figure as ``out.png`` (200 dpi) and ``out.pdf``."""
    for path in out:
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.png, dpi=200, format="png")
    fig.savefig(out.pdf, format="pdf")
    plt.close(fig)
    log.info("wrote %s, %s", out.png, out.pdf)
    return list(out)


def write_table(frame: pd.DataFrame, out: TableFiles, title: str, note: str = "") -> list[Path]:
    """``out.html`` (a standalone page with a readable table) and ``out.csv``."""
    for path in out:
        path.parent.mkdir(parents=True, exist_ok=True)
    body = frame.to_html(index=False, border=0, classes="results", na_rep="n/a", escape=True)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table.results {{ border-collapse: collapse; font-size: 0.9em; }}
table.results th, table.results td {{ padding: 0.3em 0.8em; border-bottom: 1px solid #ccc; text-align: right; }}
table.results th {{ background: #f0f0f0; }}
table.results td:first-child, table.results th:first-child {{ text-align: left; }}
p.note {{ max-width: 60em; font-size: 0.9em; color: #444; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
{body}
<p class="note">{html.escape(note)}</p>
</body></html>
"""
    out.html.write_text(page)
    frame.to_csv(out.csv, index=False)
    return list(out)


def _undefined(ax: plt.Axes, task: str, metric: str) -> None:
    ax.set_title(f"{TASK_NAMES[task]}: {METRIC_NAMES[metric]}")
    _empty(ax, f"{METRIC_NAMES[metric]} is undefined on this test part\n(its {TASK_NAMES[task]} labels have one "
               "class)")


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# --- Pretext ------------------------------------------------------------------------------------------------------

TOP1_COLUMNS = ("trained_view1_top1", "trained_view2_top1")


def pretext_figure(distances: dict[str, pd.DataFrame], out: FigureFiles,
                   evaluations: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """One row per method, panels by what its pretext evaluation scored (its per-item table's columns): a pair method
    (siamese, columns ``positive`` and ``distance``) gets Jamaludin Fig. 6, the distance histograms of positive and
    negative test pairs and the ROC curve of same-subject detection (score: minus the distance), trained and
    untrained; a view method (simclr, columns ``trained_view1_top1`` ...) the test top-1 of the trained and the
    untrained network with bootstrap intervals over the test slices, overall and per level (:func:`_top1_panels`;
    ``evaluations``, the methods' evaluation.json, give the batch size of the chance line)."""
    methods = list(distances)
    evaluations = evaluations or {}
    fig, axes = plt.subplots(len(methods), 2, figsize=(8.5, 3.4 * len(methods)), squeeze=False)
    for (left, right), method in zip(axes, methods):
        table = distances[method]
        if {"positive", "distance"} <= set(table):
            _pair_panels(left, right, method, table)
        elif set(TOP1_COLUMNS) <= set(table):
            _top1_panels(left, right, method, table, evaluations.get(method, {}))
        else:
            _empty(left, f"{method}: its pretext table has neither pair distances nor top-1 columns\n"
                         f"(columns: {', '.join(map(str, table.columns))})")
            right.axis("off")
    fig.tight_layout()
    return save(fig, out)


def _pair_panels(hist_ax: plt.Axes, roc_ax: plt.Axes, method: str, table: pd.DataFrame) -> None:
    """Jamaludin Fig. 6 for one pair method: distance histograms and same-subject ROC, trained and untrained."""
    positive = table.positive.astype(bool).to_numpy()
    if positive.all() or not positive.any():
        kind = "no" if not len(positive) else "only positive" if positive.any() else "only negative"
        _empty(hist_ax, f"{method}: the self-supervision test part has {kind} pairs")
        _empty(roc_ax, "no ROC curve without both kinds of pairs")
        return
    bins = np.histogram_bin_edges(table.distance, bins=30)
    hist_ax.hist(table.distance[~positive], bins=bins, color="#c0392b", alpha=0.55,
                 label=f"negative pairs (n={int((~positive).sum())})")
    hist_ax.hist(table.distance[positive], bins=bins, color="#1b6ca8", alpha=0.55,
                 label=f"positive pairs (n={int(positive.sum())})")
    hist_ax.set_xlabel("L2 distance between FC7 embeddings")
    hist_ax.set_ylabel("test pairs")
    hist_ax.set_title(f"{method}: distances of test pairs")
    hist_ax.legend(frameon=False)
    for column, name, line in (("distance", "trained", "-"), ("untrained_distance", "untrained (same seed)", ":")):
        if column not in table:
            continue
        fpr, tpr = roc_curve(positive, -table[column].to_numpy())
        auc = roc_auc(positive, -table[column].to_numpy())
        roc_ax.plot(fpr, tpr, line, color="#1b6ca8" if column == "distance" else "#8c8c8c",
                    label=f"{name}: AUC {auc:.3f}")
    roc_ax.plot([0, 1], [0, 1], color="#cccccc", linewidth=0.8)
    roc_ax.set_xlabel("false-positive rate (other subject called same)")
    roc_ax.set_ylabel("true-positive rate")
    roc_ax.set_title(f"{method}: same-subject detection (ROC)")
    roc_ax.set_aspect("equal")
    roc_ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))


def slice_top1(table: pd.DataFrame, network: str) -> np.ndarray:
    """Each test slice's top-1 of ``network`` ("trained" or "untrained"): the mean of its two views' (0, 0.5 or 1)."""
    views = table[[f"{network}_view1_top1", f"{network}_view2_top1"]].astype(float).to_numpy()
    return views.mean(1)


def bootstrap_mean(values: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0,
                   paired: np.ndarray | None = None) -> tuple[float, float, float]:
    """The mean of ``values`` (one per test slice; minus ``paired``'s, slice for slice, when given) and its
    percentile bootstrap interval over the slices (resampled with replacement, ``resamples`` times, seeded: the
    figure is the same at every run). NaN for no slices."""
    x = np.asarray(values, dtype=float) - (0.0 if paired is None else np.asarray(paired, dtype=float))
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, len(x), size=(min(200, resamples - done), len(x)))].mean(1)
                            for done in range(0, resamples, 200)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(low), float(high)


def _top1_panels(all_ax: plt.Axes, level_ax: plt.Axes, method: str, table: pd.DataFrame,
                 evaluation: dict[str, Any]) -> None:
    """A view method's pretext test top-1 (the share of views whose other view ranks first among the batch's views):
    trained vs untrained with 95% bootstrap intervals over the test slices (a slice's two views resampled together),
    the chance level of a full batch, and the same per disc level."""
    if table.empty:
        _empty(all_ax, f"{method}: the self-supervision test part has no slices")
        level_ax.axis("off")
        return
    networks = (("trained", "#7b3294"), ("untrained", "#8c8c8c"))
    top1 = {name: slice_top1(table, name) for name, _ in networks if f"{name}_view1_top1" in table}
    for i, (name, c) in enumerate((n, c) for n, c in networks if n in top1):
        mean, low, high = bootstrap_mean(top1[name])
        all_ax.bar(i, mean, color=c, alpha=0.8, width=0.6)
        all_ax.errorbar(i, mean, yerr=[[mean - low], [high - mean]], color="#222", capsize=4, linewidth=1)
        all_ax.text(i, high + 0.02, f"{mean:.3f}\n[{low:.3f}, {high:.3f}]", ha="center", va="bottom", fontsize=7.5)
    all_ax.set_xticks(range(len(top1)), [f"{n}" + (" (same seed)" if n == "untrained" else "") for n in top1])
    batch = int(evaluation.get("batch_images") or 0)
    views = evaluation.get("views")   # a retrieval among all test items (mlsscl): what its two columns are
    if batch > 1:
        chance = 1 / (2 * batch - 1)
        all_ax.axhline(chance, color="#c0392b", linestyle="--", linewidth=0.9,
                       label=f"chance: 1 of {2 * batch - 1} other views ({batch} images a batch)")
    elif evaluation.get("chance_top1"):
        all_ax.axhline(evaluation["chance_top1"], color="#c0392b", linestyle="--", linewidth=0.9,
                       label=evaluation.get("chance_label") or f"chance: 1 of {len(table)} test "
                                                               f"{'regions' if views else 'items'}")
    if batch > 1 or evaluation.get("chance_top1"):
        all_ax.legend(frameon=False, loc="upper right", fontsize=7)
    all_ax.set_ylim(0, 1.18)
    all_ax.set_ylabel("share right (test volumes)" if evaluation.get("chance_label") else "top-1 (share of test views)")
    items = "volumes" if evaluation.get("chance_label") else "regions" if views else "slices"
    title = f"{method}: pretext test top-1 ({len(table)} {items}; 95% bootstrap intervals)"
    if views:
        title += f"\nmean of: {views['view1']}; {views['view2']}"
    if len(top1) == 2:
        diff, low, high = bootstrap_mean(top1["trained"], paired=top1["untrained"])
        title += f"\ntrained - untrained {diff:+.3f} [{low:+.3f}, {high:+.3f}]"
    all_ax.set_title(title)
    if views:
        _view_panel(level_ax, method, table, views, evaluation["chance_top1"])
        return
    levels_here = [lv for lv in DISCS if "level" in table and lv in set(table.level)]
    if not levels_here:
        _empty(level_ax, "no disc levels in the pretext table")
        return
    for j, (name, c) in enumerate((n, c) for n, c in networks if n in top1):
        stats = [bootstrap_mean(top1[name][(table.level == lv).to_numpy()]) for lv in levels_here]
        x = np.arange(len(levels_here)) + (j - 0.5) * 0.2
        mean, low, high = (np.array(v) for v in zip(*stats))
        level_ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o", color=c, markersize=4, capsize=2.5,
                          linewidth=1, label=name)
    counts = table.level.value_counts()
    level_ax.set_xticks(range(len(levels_here)), [f"{lv}\n({counts[lv]})" for lv in levels_here])
    if batch > 1:
        level_ax.axhline(1 / (2 * batch - 1), color="#c0392b", linestyle="--", linewidth=0.9)
    level_ax.set_ylim(0, 1.05)
    level_ax.set_xlabel("disc level (test slices)")
    level_ax.set_ylabel("top-1")
    level_ax.set_title(f"{method}: top-1 per level (95% bootstrap intervals)")
    level_ax.legend(frameon=False, fontsize=7)
    level_ax.grid(alpha=0.25, axis="y")


def _view_panel(ax: plt.Axes, method: str, table: pd.DataFrame, views: dict[str, str], chance: float) -> None:
    """A retrieval method's two pretext tasks apart (mlsscl: cross-view and long-short), trained and untrained, with
    95% bootstrap intervals over the test items and the chance level."""
    for j, (name, c) in enumerate((("trained", "#7b3294"), ("untrained", "#8c8c8c"))):
        stats = [bootstrap_mean(table[f"{name}_{view}_top1"].astype(float).to_numpy()) for view in views]
        mean, low, high = (np.array(v) for v in zip(*stats))
        ax.errorbar(np.arange(len(views)) + (j - 0.5) * 0.2, mean, yerr=[mean - low, high - mean], fmt="o", color=c,
                    markersize=4, capsize=2.5, linewidth=1, label=name)
    ax.axhline(chance, color="#c0392b", linestyle="--", linewidth=0.9)
    ax.set_xticks(range(len(views)), [text.replace(", ", ",\n") for text in views.values()])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-1")
    ax.set_title(f"{method}: top-1 per pretext task\n(95% bootstrap intervals)")
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.25, axis="y")


# --- Label efficiency ---------------------------------------------------------------------------------------------

def _curves(summary: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    here = summary[(summary.task == task) & (summary.metric == metric)]
    return here.sort_values(["model", "head", "fraction"])


def label_efficiency_figure(summary: pd.DataFrame, out: FigureFiles, end_to_end: list[str]) -> list[Path]:
    """Jamaludin Fig. 8: each task's headline metric against the training subjects, per model and head, with the
    bootstrap band; the x axis also gives the mean number of scans."""
    tasks = [t for t in TASKS if t in set(summary.task)]
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks) + 2.2, 3.8), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks):
        metric = TASKS[task].headline
        here = _curves(summary, task, metric)
        for (model, head), group in here.groupby(["model", "head"], sort=False):
            if group["mean"].isna().all():
                continue
            c = colour(model, models)
            (line,) = ax.plot(group.n_subjects, group["mean"], marker="o", markersize=3.5, color=c,
                              **style(model, head))
            if group.ci_low.notna().any() and head != "mlp":   # bands of the MLP heads would hide the rest
                ax.fill_between(group.n_subjects, group.ci_low, group.ci_high, color=c, alpha=0.1, linewidth=0)
            handles.setdefault(label(model, head, end_to_end), line)
        if not ax.lines:
            _undefined(ax, task, metric)
            continue
        ticks = here.drop_duplicates("fraction").sort_values("fraction")
        ax.set_xticks(ticks.n_subjects)
        ax.set_xticklabels([f"{s:.0f}\n({n:.0f})" for s, n in zip(ticks.n_subjects, ticks.n_scans)])
        ax.set_xlabel("training subjects (scans)")
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_title(f"{TASK_NAMES[task]}: {METRIC_NAMES[metric]}")
        ax.grid(alpha=0.25)
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save(fig, out)


def _difference(row: pd.Series) -> str:
    """``+0.012 [-0.031, +0.050]``: a difference from scratch with its interval."""
    if pd.isna(row.difference):
        return "n/a"
    if pd.isna(row.ci_low) or pd.isna(row.ci_high):
        return f"{row.difference:+.3f} [no interval]"
    return f"{row.difference:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"


def figure_of_merit_table(efficiency: pd.DataFrame, out: TableFiles) -> list[Path]:
    """The figure of merit (probes/label_efficiency.csv): per task, model and head, the first label subset that
    matches scratch on every label, and the difference from scratch there with its interval and verdict (not
    reached: at the largest subset tried)."""
    if efficiency.empty:
        frame = pd.DataFrame({"note": ["no figure of merit: the scratch model was not run on every label"]})
        note = ""
    else:
        frame = pd.DataFrame({
            "task": efficiency.task.map(TASK_NAMES), "metric": efficiency.metric.map(METRIC_NAMES),
            "model": efficiency.model, "head": efficiency["head"],
            "scratch, every label": efficiency.reference_value.map("{:.3f}".format),
            "scans (scratch)": efficiency.reference_scans.map("{:.0f}".format),
            "first subset matching it": efficiency.matched_at_fraction.map(
                lambda v: "not reached" if pd.isna(v) else f"{v:g}"),
            "scans there": efficiency.matched_scans.map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
            "share of scans": efficiency.scan_share.map(lambda v: "" if pd.isna(v) else f"{v:.0%}"),
            "value there": efficiency.value_there.map(lambda v: "" if pd.isna(v) else f"{v:.3f}")})
        note = ""
        if {"difference", "ci_low", "ci_high", "compared_at_fraction", "fraction_verdict"} <= set(efficiency):
            level = efficiency.ci_level.dropna()
            margin = efficiency.margin.dropna()
            percent = f"{level.iloc[0]:.0%}" if len(level) else "bootstrap"
            frame["compared at subset"] = efficiency.compared_at_fraction.map(lambda v: f"{v:g}")
            frame[f"difference from scratch [{percent} interval]"] = efficiency.apply(_difference, axis=1)
            frame["verdict there"] = efficiency.fraction_verdict
            note = (f" A subset matches when the lower end of the {percent} paired bootstrap interval (over test "
                    "subjects) of the difference, model minus scratch on every label, is above "
                    f"-{margin.iloc[0] if len(margin) else 'the margin'} (probes.match_margin; non-inferiority); "
                    "below scratch at all labels: the interval lies below 0; inconclusive: neither. Not reached: "
                    "the difference and verdict at the largest subset tried.")
    return write_table(frame, out, "Label efficiency: labels needed to match the model trained from scratch",
                       "For each model and head: the smallest label subset at which its headline metric matches "
                       "that of the model trained from scratch on every label (Jamaludin et al. 2017 report 667 vs "
                       "976 scans)." + note)


def label_curves_figure(summary: pd.DataFrame, out: FigureFiles, end_to_end: list[str]) -> list[Path]:
    """Hou Fig. 9: herniation accuracy and AUC against the number of labelled training discs, with the
    supervised-transfer baseline."""
    here = summary[summary.task == "herniation"]
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    handles: dict[str, Any] = {}
    if here.empty:
        for ax in axes:
            _empty(ax, "herniation was not among probes.tasks")
    for ax, metric in zip(axes, ("accuracy", "auc")):
        curves = _curves(here, "herniation", metric)
        for (model, head), group in curves.groupby(["model", "head"], sort=False):
            if head == "mlp" or group["mean"].isna().all():
                continue   # Hou's comparison is of linear heads; the MLP is in the other figures
            c = colour(model, models)
            (line,) = ax.plot(group.n_train, group["mean"], marker="o", markersize=3.5, color=c,
                              linewidth=2.2 if model == "supervised" else 1.4, **style(model, head))
            lower = (group["mean"] - group["std"].fillna(0)).clip(0, 1)     # the metrics live in [0, 1]
            upper = (group["mean"] + group["std"].fillna(0)).clip(0, 1)
            ax.fill_between(group.n_train, lower, upper, color=c, alpha=0.12, linewidth=0)
            handles.setdefault(label(model, head, end_to_end), line)
        if not curves.empty and not ax.lines:
            _undefined(ax, "herniation", metric)
        elif not curves.empty:
            ax.set_xlabel("labelled training discs")
            ax.set_ylabel(METRIC_NAMES[metric])
            ax.set_title(f"herniation: {METRIC_NAMES[metric]} (mean \u00b1 std over seeds)")
            ax.grid(alpha=0.25)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save(fig, out)


# --- ROC, confusion, Cao table ------------------------------------------------------------------------------------

def _full(predictions: pd.DataFrame, task: str) -> pd.DataFrame:
    here = predictions[predictions.task == task]
    return here[here.fraction == here.fraction.max()] if len(here) else here


def roc_figure(predictions: pd.DataFrame, out: FigureFiles, end_to_end: list[str]) -> list[Path]:
    """Hou Fig. 8: herniation ROC per model (every label; seed 0's curve, AUC as mean +- std over seeds)."""
    here = _full(predictions, "herniation")
    models = list(dict.fromkeys(predictions.model))
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    if here.empty:
        _empty(ax, "herniation was not among probes.tasks")
        return save(fig, out)
    for (model, head), group in here.groupby(["model", "head"], sort=False):
        aucs = [roc_auc(g.label.to_numpy(), g.p_1.to_numpy()) for _, g in group.groupby("seed")]
        first = group[group.seed == group.seed.min()]
        if first.label.nunique() < 2:
            continue
        fpr, tpr = roc_curve(first.label.to_numpy(), first.p_1.to_numpy())
        spread = f" \u00b1 {np.nanstd(aucs, ddof=1):.3f}" if len(aucs) > 1 else ""
        ax.plot(fpr, tpr, color=colour(model, models), **style(model, head),
                label=f"{label(model, head, end_to_end)}: AUC {np.nanmean(aucs):.3f}{spread}")
    if not ax.lines:
        _empty(ax, "the herniation test part has one class only: no ROC curve can be drawn")
        return save(fig, out)
    ax.plot([0, 1], [0, 1], color="#cccccc", linewidth=0.8)
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    n_discs, n_subjects = first_counts(here)
    ax.set_title(f"Herniation, every training label: test ROC ({n_discs} discs, {n_subjects} subjects)")
    ax.set_aspect("equal")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return save(fig, out)


def first_counts(frame: pd.DataFrame) -> tuple[int, int]:
    """Test discs and subjects of one job (the first model, head and seed)."""
    key = frame.iloc[0]
    one = frame[(frame.model == key.model) & (frame["head"] == key["head"]) & (frame.seed == key.seed)]
    return len(one), one.subject_id.nunique()


def confusion_figure(predictions: pd.DataFrame, out: FigureFiles, end_to_end: list[str]) -> list[Path]:
    """Confusion matrices of the grade per model and head (every label, summed over seeds), row-normalised colours
    with the counts written in."""
    here = _full(predictions, "grade")
    if here.empty:
        fig, ax = plt.subplots(figsize=(5, 3))
        _empty(ax, "the grade was not among probes.tasks")
        return save(fig, out)
    groups = list(here.groupby(["model", "head"], sort=False))
    cols = min(4, len(groups))
    rows = int(np.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.9 * rows), squeeze=False)
    grades = np.arange(1, 6)
    image = None
    for ax, ((model, head), group) in zip(axes.flat, groups):
        matrix = np.zeros((5, 5), dtype=int)
        for t, p in zip(group.label.astype(int), group.predicted.astype(int)):
            matrix[t - 1, p - 1] += 1
        share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(5):
            for j in range(5):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.6 else "#222")
        ax.set_xticks(range(5), [f"P{g}" for g in grades])
        ax.set_yticks(range(5), [f"P{g}" for g in grades])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label(model, head, end_to_end), fontsize=9)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"Pfirrmann grade, every training label: test discs (counts summed over "
                 f"{here.seed.nunique()} seed(s); colour: share of the true grade's row)", fontsize=10)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="share of the row")
    return save(fig, out)


def metrics_table(results: pd.DataFrame, out: TableFiles, end_to_end: list[str]) -> list[Path]:
    """Cao et al. 2022 Table 1: ACC, SEN, SPE, AUC (herniation, every label) as mean +- std over seeds."""
    here = results[results.task == "herniation"]
    if here.empty:
        frame = pd.DataFrame({"note": ["herniation was not among probes.tasks"]})
    else:
        here = here[here.fraction == here.fraction.max()]
        rows = []
        for (model, head), group in here.groupby(["model", "head"], sort=False):
            row = {"method": label(model, head, end_to_end), "seeds": len(group),
                   "training subjects": f"{group.n_subjects.mean():.0f}"}
            for metric, name in (("accuracy", "ACC (%)"), ("sensitivity", "SEN (%)"), ("specificity", "SPE (%)"),
                                 ("auc", "AUC (%)")):
                v = group[metric].astype(float) * 100
                row[name] = "n/a" if v.isna().all() else (
                    f"{v.mean():.1f} \u00b1 {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}")
            rows.append(row)
        frame = pd.DataFrame(rows)
    return write_table(frame, out, "Herniation on the test subjects, every training label (mean \u00b1 std over seeds)",
                       "ACC accuracy, SEN sensitivity, SPE specificity at probability 0.5, AUC area under the ROC "
                       "curve; the seeds differ in the heads' initialisation and folds (every label: the same "
                       "training subjects). Layout of Cao et al. 2022, Table 1.")


ABLATION = {"mlsscl": "both (L = alpha L_multiview + beta L_long-short)", "mlsscl_multiview": "multiview only",
            "mlsscl_long_short": "long-short only"}


def ablation_table(results: pd.DataFrame, evaluations: dict[str, dict[str, Any]], out: TableFiles) -> list[Path]:
    """Cao et al. 2022 Table 3: MLSSCL with both losses, the multiview loss alone and the long-short loss alone (the
    mlsscl methods that ran): their pretext test top-1 (``evaluations``: each method's evaluation.json) and each disc
    task's headline metric on the test subjects with every training label, per head, mean +- std over seeds."""
    rows = []
    for method in (m for m in ABLATION if m in evaluations):
        evaluation = evaluations[method]
        here = results[(results.model == method) & results.task.isin(["grade", "herniation"])]
        here = here[here.fraction == here.fraction.max()] if len(here) else here
        base = {"loss": ABLATION[method], "method": method,
                **{f"pretext {name} top-1, trained (untrained)": _pair(evaluation, key)
                   for name, key in (("axial-sagittal", "multiview_top1"), ("short-long", "long_short_top1"))}}
        for head, group in here.groupby("head", sort=False) if len(here) else [("n/a", here)]:
            row = {**base, "head": head}
            for task in ("grade", "herniation"):
                metric = TASKS[task].headline
                v = group.loc[group.task == task, metric].astype(float)
                row[f"{TASK_NAMES[task]}: {METRIC_NAMES[metric]}"] = "n/a" if v.isna().all() else (
                    f"{v.mean():.3f} \u00b1 {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
            rows.append(row)
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"note": ["no mlsscl method among pretrain.methods"]})
    return write_table(frame, out, "MLSSCL ablation: which loss does the work (Cao et al. 2022, Table 3 layout)",
                       "Pretext top-1: the share of the self-supervision test regions whose axial query finds its own "
                       "sagittal key (short axial query: its own long axial key) first among every test region's; "
                       "chance is one over their number. The disc tasks with every training label (grade: average "
                       "class accuracy; herniation: ROC AUC), mean \u00b1 std over seeds.")


def curricula_table(summary: pd.DataFrame, curricula: dict[str, list[str]], attention: dict[str, dict[str, Any]],
                    searches: dict[str, list[pd.DataFrame]], task: str, head: str, out: TableFiles) -> list[Path]:
    """The curricular multi-task study's Tables 1-2 on spine data: per curriculum and per single task that ran alone,
    the balanced accuracy (average class accuracy) of ``head`` on ``task`` at the largest label fraction with its
    interval (probes/summary.parquet), delta against the curriculum's first task trained alone, the difference from
    the supervised baseline, the attention inside the disc (``attention``: report/gradcam/{model}/summary.json) and
    the learning rate each step's search chose (``searches``: lr_search.csv of each step, in order)."""
    metric = "average_class_accuracy"
    here = summary[(summary.task == task) & (summary["head"] == head) & (summary.metric == metric)]
    here = here[here.fraction == here.fraction.max()] if len(here) else here
    values = {r.model: r for r in here.itertuples()}
    supervised = values.get("supervised")
    singles = sorted({t for steps in curricula.values() for t in steps if t in values})

    def cell(model: str) -> str:
        r = values.get(model)
        return "n/a" if r is None else f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    def diff(model: str, other: Any) -> str:
        r = values.get(model)
        return "n/a" if r is None or other is None else f"{r.mean - other.mean:+.3f}"

    rows = []
    for model in singles:
        rows.append({"model": model, "steps": model, "balanced accuracy [interval]": cell(model),
                     "delta vs its first task alone": "", "vs supervised": diff(model, supervised),
                     "learning rates (search)": ""})
    for name, steps in curricula.items():
        chosen = [f"{t.learning_rate[t.chosen].iloc[0]:g}" if len(t) and t.chosen.any() else "?"
                  for t in searches.get(name, [])]
        rows.append({"model": name, "steps": " → ".join(steps), "balanced accuracy [interval]": cell(name),
                     "delta vs its first task alone": diff(name, values.get(steps[0])),
                     "vs supervised": diff(name, supervised), "learning rates (search)": ", ".join(chosen)})
    for row in rows:
        s = attention.get(row["model"])
        row["attention inside the disc (uniform)"] = "n/a" if s is None else (
            f"{_number(s['inside_disc'])} ({_number(s['disc_share_of_volume'])})")
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"note": ["no curriculum ran"]})
    return write_table(frame, out, "Curricula of pretext tasks (the curricular multi-task study's Tables 1-2 layout)",
                       f"Balanced accuracy: the {head} head's average class accuracy on {TASK_NAMES.get(task, task)} "
                       "with every training label (mean over seeds, interval as in the probe summary). Delta: the "
                       "curriculum minus its first task pretrained alone; vs supervised: minus the supervised "
                       "baseline's (n/a: not run). Attention: the share of the Grad-CAM mass inside the disc on the "
                       "report's Grad-CAM task, beside the uniform share. Learning rates: the rate each step's "
                       "search chose, step by step.")


def _pair(evaluation: dict[str, Any], key: str) -> str:
    trained, untrained = (evaluation.get(n, {}).get(key) for n in ("trained", "untrained"))
    if trained is None:
        return "n/a"
    return f"{trained:.3f} ({untrained:.3f})" if untrained is not None else f"{trained:.3f}"


SEGMENTATION_METRICS = {"dice": "DSC", "ppv": "PPV", "ltpr": "LTPR", "lfpr": "LFPR"}


def segmentation_table(summaries: pd.DataFrame, out: TableFiles) -> list[Path]:
    """Cao et al. 2022 Table 2 on spine anatomy: per encoder, label subset and structure, DSC, PPV, LTPR and LFPR on
    the downstream test subjects with their intervals (the segment stage's summary.parquet of every model)."""
    if summaries.empty:
        frame = pd.DataFrame({"note": ["no segmentation: no label maps among the downstream subjects"]})
    else:
        rows = []
        for (model, fraction, structure), group in summaries.groupby(["model", "fraction", "structure"], sort=False):
            by_metric = group.set_index("metric")
            row = {"model": model, "labelled share": f"{fraction:.0%}",
                   "training subjects": int(group.n_subjects.iloc[0]), "structure": structure,
                   "test scans": int(group.scans.iloc[0])}
            for metric, name in SEGMENTATION_METRICS.items():
                v = by_metric.loc[metric]
                row[name] = "n/a" if not np.isfinite(v.value) else (
                    f"{v.value:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}]")
            rows.append(row)
        frame = pd.DataFrame(rows)
    return write_table(frame, out, "Segmentation of the vertebrae and discs (Cao et al. 2022, Table 2 layout)",
                       "Mid-sagittal slice of each test scan's lumbar region; DSC Dice, PPV positive predictive "
                       "value (means over the test scans and seeds), LTPR and LFPR the detection true- and "
                       "false-positive rates of the structures (connected components), with 95% bootstrap intervals "
                       "over the test subjects. Every encoder trained end to end under the same U-Net decoder; "
                       "scratch: the same network from pretraining's initial weights (scratch_resnet18: the "
                       "ResNet-18).")


def segmentation_figure(summaries: pd.DataFrame, examples: dict[str, dict[str, np.ndarray]],
                        out: FigureFiles) -> list[Path]:
    """Top: DSC against the training subjects per encoder, one panel per structure, with intervals. Below: each
    encoder's predictions on the first test scan at every label subset (seed 0), beside the truth."""
    models = list(dict.fromkeys(summaries.model)) if len(summaries) else []
    structures = list(dict.fromkeys(summaries.structure)) if len(summaries) else []
    fractions = sorted(set(summaries.fraction)) if len(summaries) else []
    rows = 1 + len(models)
    cols = max(len(structures), len(fractions) + 2, 2)
    fig = plt.figure(figsize=(2.4 * cols, 2.6 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols)
    if summaries.empty:
        _empty(fig.add_subplot(grid[0, :]), "no segmentation: no label maps among the downstream subjects")
        return save(fig, out)
    span = cols // max(len(structures), 1)
    for j, structure in enumerate(structures):
        ax = fig.add_subplot(grid[0, j * span:(j + 1) * span])
        for model in models:
            here = summaries[(summaries.model == model) & (summaries.structure == structure)
                             & (summaries.metric == "dice")].sort_values("n_subjects")
            c = colour(model, models)
            ax.plot(here.n_subjects, here.value, "o-", color=c, label=model, markersize=3.5,
                    linewidth=2 if model.startswith("scratch") else 1.3)
            ax.fill_between(here.n_subjects, here.ci_low, here.ci_high, color=c, alpha=0.12)
        ax.set_xlabel("labelled training subjects")
        ax.set_ylabel("DSC (test scans)")
        ax.set_title(f"{structure}: DSC (95% intervals)")
        ax.grid(alpha=0.25)
        ax.legend(frameon=False, fontsize=7)
    palette = matplotlib.colors.ListedColormap(["black", "#1b9e77", "#d95f02"])
    for i, model in enumerate(models, start=1):
        shown = examples.get(model, {})
        if "image" not in shown or not len(shown["image"]):
            _empty(fig.add_subplot(grid[i, :]), f"{model}: no example")
            continue
        panels = [("input", shown["image"][0], None), ("truth", shown["truth"][0], palette)]
        panels += [(f"{f:.0%} labels", shown[f"predicted_{f:g}"][0], palette) for f in fractions
                   if f"predicted_{f:g}" in shown]
        for j, (title, image, cmap) in enumerate(panels[:cols]):
            ax = fig.add_subplot(grid[i, j])
            if cmap is None:
                ax.imshow(image, cmap="gray")
            else:
                ax.imshow(image, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.set_title(f"{model}: {title}" if j == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle("Segmentation downstream: vertebrae (green) and discs (orange) on the mid-sagittal slice")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))   # room for the title above the panels
    return save(fig, out)


# --- Embeddings ---------------------------------------------------------------------------------------------------

def embeddings_figure(coords: dict[str, pd.DataFrame], out: FigureFiles) -> list[Path]:
    """Rows: encoders; columns: the same 2D map coloured by level, grade, age, sex, field strength, vendor, years
    since the subject's first scan and subject (a column the table lacks, or with no value, says so)."""
    encoders = list(coords)
    columns = [("level", "vertebral level"), ("grade", "grade of the disc below"), ("age_years", "age (years)"),
               ("sex", "sex"), ("field_strength_t", "field strength"), ("vendor", "vendor"),
               ("years_since_baseline", "years since first scan"), ("subject", "subject")]
    continuous = {"age_years", "years_since_baseline"}
    fig, axes = plt.subplots(len(encoders), len(columns), figsize=(3.6 * len(columns) + 1, 3.5 * len(encoders)),
                             squeeze=False)
    for row_axes, encoder in zip(axes, encoders):
        table = coords[encoder]
        for ax, (column, title) in zip(row_axes, columns):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{encoder}: {title}")
            values = table[column] if column in table else pd.Series(np.nan, index=table.index)
            if values.isna().all():
                _empty(ax, f"no {title} known")
                continue
            if column in continuous:
                known = values.notna()
                ax.scatter(table.x[~known], table.y[~known], s=6, color="#dddddd", linewidths=0)
                points = ax.scatter(table.x[known], table.y[known], c=values[known].astype(float), cmap="viridis",
                                    s=9, linewidths=0)
                fig.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
                continue
            if column == "subject":
                codes = pd.factorize(values)[0]
                ax.scatter(table.x, table.y, c=codes, cmap="tab20", s=9, linewidths=0)
                n = values.nunique()
                ax.text(0.02, 0.02, f"{n} subject(s), one colour each" + (" (colours repeat after 20)" if n > 20
                                                                            else ""),
                        transform=ax.transAxes, fontsize=7.5)
                continue
            if column == "level":
                order = [lv for lv in VERTEBRAE if lv in set(values)]
            else:
                order = sorted(values.dropna().unique())
            cmap = plt.get_cmap("viridis", max(len(order), 2))
            for k, value in enumerate(order):
                sel = values == value
                name = f"P{int(value)}" if column == "grade" else (f"{value:g} T" if column == "field_strength_t"
                                                                    else str(value))
                ax.scatter(table.x[sel], table.y[sel], s=9, color=cmap(k / max(len(order) - 1, 1)), label=name,
                           linewidths=0)
            missing = values.isna()
            if missing.any():
                ax.scatter(table.x[missing], table.y[missing], s=6, color="#dddddd",
                           label="no grade" if column == "grade" else "unknown", linewidths=0)
            ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=1.5)
    fig.suptitle("t-SNE of the frozen FC7 features of the vertebral bodies of the downstream and self-supervision test "
                 "subjects (axes have no units)", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


# --- Training curves ----------------------------------------------------------------------------------------------

# What a pretraining method's metrics.csv holds besides its loss (each method logs its own statistics): the column of
# its accuracy panel and the panels' titles, by method; a method not named here gets the first of PRETRAIN_CURVES
# whose column its table has.
PRETRAIN_TITLES = {
    "siamese": ("level_accuracy", "FC8 level accuracy", "loss (contrastive + level)"),
    "simclr": ("top1", "top-1 (other view ranked first in batch)", "NT-Xent loss"),
    "moco": ("top1", "top-1 (own key ranked first against the queue)", "InfoNCE loss against the queue"),
    "byol": ("top1", "top-1 (other view's target ranked first in batch)", "loss (2 - 2 cos)"),
    "longitudinal_nce": ("level_accuracy", "FC8 level accuracy", "loss (supervised InfoNCE + level)"),
    **{m: ("top1", "multiview top-1 (own key of another view first against the queue)",
           "loss (alpha multiview + beta long-short InfoNCE)")
       for m in ("mlsscl", "mlsscl_multiview", "mlsscl_long_short")},
    "rotation": ("accuracy", "rotation accuracy (4 ways)", "cross-entropy"),
    "relative_location": ("accuracy", "relative-location accuracy (8 ways)", "cross-entropy"),
    "swav": ("accuracy", "both views on one prototype", "swapped-prediction loss"),
    "vae": ("reconstruction", "reconstruction error per voxel", "negative ELBO per voxel (reconstruction + beta KL)"),
}
PRETRAIN_CURVES = (("level_accuracy", "FC8 level accuracy", "loss"), ("top1", "top-1", "loss"),
                   ("accuracy", "task accuracy", "loss"))


def training_figure(pretrain: dict[str, pd.DataFrame], supervised: pd.DataFrame | None,
                    end_to_end: dict[str, pd.DataFrame], out: FigureFiles) -> list[Path]:
    """One row per pretraining method, its loss and its accuracy per epoch (train and val: the columns its
    metrics.csv has, :data:`PRETRAIN_TITLES`); beside them the downstream networks' losses."""
    methods = list(pretrain) or ["none"]
    rows = len(methods)
    fig = plt.figure(figsize=(14, 3.6 * rows + 0.2))
    grid = fig.add_gridspec(rows, 3)
    down_ax = fig.add_subplot(grid[:, 2])
    models = list(pretrain) + ["supervised"] + list(end_to_end)
    for r, method in enumerate(methods):
        loss_ax, acc_ax = fig.add_subplot(grid[r, 0]), fig.add_subplot(grid[r, 1])
        table = pretrain.get(method)
        if table is None:
            _empty(loss_ax, "no pretraining method")
            _empty(acc_ax, "no pretraining method")
            continue
        column, acc_title, loss_title = PRETRAIN_TITLES.get(method) or next(
            (c for c in PRETRAIN_CURVES if c[0] in table), (None, "accuracy", "loss"))
        c = colour(method, models)
        for split, line in (("train", "-"), ("val", "--")):
            part = table[table.split == split].sort_values("epoch")
            if part.empty:
                continue
            if part.loss.notna().any():
                loss_ax.plot(part.epoch, part.loss, line, color=c, marker="o", markersize=2.5,
                             label=f"{method} ({split})")
            if column is not None and part[column].notna().any():
                acc_ax.plot(part.epoch, part[column], line, color=c, marker="o", markersize=2.5,
                            label=f"{method} ({split})")
        loss_ax.set_title(f"{method} pretraining: {loss_title}")
        acc_ax.set_title(f"{method} pretraining: {acc_title}")
        if column != "reconstruction":
            acc_ax.set_ylim(0, 1.02)
        loss_ax.set_ylabel("loss")
        acc_ax.set_ylabel({"top1": "top-1", "reconstruction": "squared error per voxel"}.get(column, "accuracy"))
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.25)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(frameon=False)
            else:
                _empty(ax, f"{method}: no such column in its metrics.csv")
    down_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    curves = ({"supervised encoder": supervised} if supervised is not None else {}) | end_to_end
    for name, table in curves.items():
        c = colour(name.split(" ")[0], models)
        down_ax.plot(table.epoch, table.train_loss, "-", color=c, label=f"{name} (train)")
        if table.val_loss.notna().any():
            down_ax.plot(table.epoch, table.val_loss, "--", color=c, label=f"{name} (val)")
        if "kept" in table and table.kept.any():
            kept = table[table.kept.astype(bool)].iloc[0]
            down_ax.plot([kept.epoch], [kept.val_loss if pd.notna(kept.val_loss) else kept.train_loss], "o",
                         color=c, markersize=5)
    down_ax.set_title("downstream networks: class-balanced cross-entropy\n(dot: the epoch kept)")
    down_ax.set_xlabel("epoch")
    down_ax.set_ylabel("loss")
    down_ax.grid(alpha=0.25)
    if down_ax.lines:
        down_ax.legend(frameon=False, fontsize=7)
    else:
        _empty(down_ax, "no network trained end to end")
    fig.tight_layout()
    return save(fig, out)


# --- Grad-CAM -----------------------------------------------------------------------------------------------------

def _overlay(ax: plt.Axes, image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1.2)
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def _example_inputs(m: dict[str, np.ndarray], bodies: np.ndarray | None,
                    example: int) -> tuple[list[np.ndarray], list[str]]:
    """The input volumes of one example of a model's maps.npz and their names: the disc volume, or the upper and the
    lower body (saved with the maps; maps written before they were, the bodies' rows of ``bodies``)."""
    parts = [str(p) for p in m["parts"]] if "parts" in m else ["upper body", "lower body"]
    if "inputs" in m:
        return [np.asarray(v, dtype=np.float32) for v in m["inputs"][example]], parts
    if bodies is None:
        raise ValueError("these maps hold no input volumes: give the vertebral bodies (--vertebrae)")
    return [np.asarray(bodies[int(m[k][example])], dtype=np.float32) for k in ("upper", "lower")], parts


HOU_TITLE = ("Grad-CAM, variant of Hou et al. 2023 (weights: mean |gradient| / their standard deviation, one softmax "
             "over every map and channel; each map divided by its maximum)")


def _shown_disc(maps: dict[str, dict[str, np.ndarray]], drawn: list[str],
                example: int) -> dict[str, tuple[int, bool]]:
    """The example each drawn model shows, and whether it is the first model's disc: the same test disc for all
    (the first model's ``example``-th, where another model has it among its examples; the models' test samples and
    their order can differ, as the axial probes' and the two bodies' do); a model without it shows its own
    ``example``-th."""
    def key(m: dict[str, np.ndarray], i: int) -> tuple[str, str]:
        return (str(m["scan_id"][i]), str(m["level"][i])) if "scan_id" in m and "level" in m else ("", str(i))

    first = maps[drawn[0]]
    wanted = key(first, example)
    shown = {}
    for model in drawn:
        m = maps[model]
        keys = [key(m, i) for i in range(len(m["cam_up"]))]
        shown[model] = (keys.index(wanted), True) if wanted in keys else (example, False)
    return shown


def gradcam_figure(maps: dict[str, dict[str, np.ndarray]], bodies: np.ndarray | None, out: FigureFiles,
                   variant: str, example: int = 0) -> list[Path]:
    """One test disc, every model, one row each: the slices of each input the model reads (the middle slice and the
    slices either side of the disc volume, or of the upper and the lower body; a simclr model's 3 axial slices), with
    the map over them and the disc's outline (white). In Hou et al.'s variant a binary task maps positive
    predictions only: a negative prediction's row says so."""
    models = list(maps)
    key = "cam_up" if variant == "gradcam" else "hou_up"
    drawn = [m for m in models if len(maps[m][key]) > example]
    if not drawn:
        fig, ax = plt.subplots(figsize=(6, 2))
        _empty(ax, "no model to explain (every job predicted one class)")
        return save(fig, out)
    first = maps[drawn[0]]
    task = str(first["task"]) if "task" in first else "grade"
    binary = TASKS[task].binary if task in TASKS else False

    def name(value: Any) -> str:
        return f"P{int(value)}" if task == "grade" else ("herniated" if int(value) else "not herniated")

    def slices_shown(volume: np.ndarray) -> list[int]:
        n = volume.shape[0]
        return sorted({max(n // 2 - 2, 0), n // 2, min(n // 2 + 2, n - 1)})

    index = _shown_disc(maps, drawn, example)
    layout = {}                                  # per drawn model: its inputs, their names and the slices shown
    for model in drawn:
        volumes, parts = _example_inputs(maps[model], bodies, index[model][0])
        layout[model] = (volumes, parts, slices_shown(volumes[0]))
    columns = max(len(p) * len(s) for _, p, s in layout.values())
    fig, axes = plt.subplots(len(models), columns, figsize=(1.9 * columns + 1.0, 2.2 * len(models) + 0.8),
                             squeeze=False)
    titled: tuple[str, ...] | None = None
    for row, model in zip(axes, models):
        for ax in row:
            ax.axis("off")
        if model not in layout:
            row[0].text(0, 0.5, f"{model}: nothing to explain (one-class rule)", transform=row[0].transAxes,
                        fontsize=8)
            continue
        m, (i, same) = maps[model], index[model]
        volumes, parts, shown = layout[model]
        no_map = variant == "hou" and "hou_map" in m and not bool(m["hou_map"][i])
        for j, (volume, part) in enumerate(zip(volumes, parts)):
            for s_i, s in enumerate(shown):
                ax = row[j * len(shown) + s_i]
                ax.axis("on")
                heat = np.asarray(m[key][i, j, s], dtype=np.float32)
                _overlay(ax, volume[s], np.zeros_like(heat) if no_map else heat, m["masks"][i, j, s])
                if tuple(parts) != titled:       # each kind of input's columns named where it first appears
                    ax.set_title(part if volume.shape[0] == 1 else f"{part}, slice {s + 1}/{volume.shape[0]}",
                                 fontsize=7.5)
        titled = tuple(parts)
        head = f" ({m['head']})" if "head" in m and str(m["head"]) != "network" else ""
        text = f"{model}{head}\npredicted {name(m['predicted'][i])}"
        if not same:
            text += f"\n(another test disc: {m['level'][i]},\ntruth {name(m['label'][i])})"
        row[0].set_ylabel(text + ("\nnegative prediction:\nno Hou map" if no_map else ""), fontsize=8)
    if variant == "gradcam":
        title = "Grad-CAM (standard): the predicted class's logit, a disc's inputs on one scale"
    else:
        title = HOU_TITLE + ("\nbinary task: maps of positive predictions only (y = z1 - z0, the pre-sigmoid logit)"
                             if binary else "\ny = the predicted class's logit")
    outline = "white: the disc's label map" if first["has_mask"][example] else "no label map for this scan"
    fig.suptitle(f"{title}\ntest disc {first['level'][example]}, truth: {name(first['label'][example])}; {outline}",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"


def attention_table(summaries: list[dict[str, Any]], out: TableFiles) -> list[Path]:
    """Per model: the share of each variant's map inside the disc's label map, each beside the uniform share over
    the same test discs (Hou et al.'s averages cover its own samples: in a binary task the positive predictions)."""
    frame = pd.DataFrame([{"model": s["model"] + (f" ({s['head']})" if s.get("head") not in (None, "network") else ""),
                           "input": s.get("input", "two bodies"),
                           "layer (map size)": f"{s['layer']} (" + " x ".join(str(v) for v in s.get("map_size", []))
                           + ")",
                           "test discs scored": s["samples"],
                           "inside the disc, Grad-CAM": _number(s["inside_disc"]),
                           "uniform attention (disc share of the input)": _number(s["disc_share_of_volume"]),
                           "test discs scored, Hou et al.": s.get("samples_hou", ""),
                           "inside the disc, Hou et al. variant": _number(s["inside_disc_hou"]),
                           "uniform attention, Hou et al.'s discs": _number(s.get("disc_share_of_volume_hou")),
                           "note": s.get("note", "")}
                          for s in summaries])
    if not frame.note.astype(bool).any():
        frame = frame.drop(columns="note")
    binary = any(TASKS[s["task"]].binary for s in summaries if s.get("task") in TASKS)
    hou = ("In this binary task Hou et al.'s maps, as theirs, explain the pre-sigmoid logit of positive "
           "predictions only (y = z1 - z0): their scores cover the test discs predicted positive. " if binary else
           "Hou et al.'s maps explain the predicted class's logit, on every test disc. ")
    return write_table(frame, out, "Attention inside the disc (share of the Grad-CAM mass inside the disc's label map)",
                       "Averaged over the test discs with a label map and a non-empty map. " + hou
                       + "Uniform attention, a map spread evenly, would score the disc's share of the input volume(s) "
                       "(the disc volume, the two body volumes, or a simclr model's 3 axial slices, where the disc's "
                       "label map is resliced as the slices are) over the same discs; a higher score means the model "
                       "looks at the disc. The axial slices' score and the sagittal volumes' are each against their "
                       "own uniform share, not against each other.")


def pairs_figure(pairs: dict[str, np.ndarray], bodies: np.ndarray, out: FigureFiles) -> list[Path]:
    """The Siamese similarity maps of a few test pairs: each pair's two bodies (middle slice) with the map."""
    n = len(pairs["a"])
    if n == 0:
        fig, ax = plt.subplots(figsize=(6, 2))
        _empty(ax, "the self-supervision test part has no pairs (too few subjects with follow-up studies): "
                   "nothing to explain")
        return save(fig, out)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.6), squeeze=False)
    mid = bodies.shape[1] // 2
    for i in range(n):
        for j, key in enumerate(("a", "b")):
            ax = axes[j, i]
            volume = np.asarray(bodies[int(pairs[key][i])], dtype=np.float32)
            _overlay(ax, volume[mid], np.asarray(pairs["cam_up"][i, j, mid], dtype=np.float32), None)
        kind = "same subject" if pairs["positive"][i] else "other subject"
        axes[0, i].set_title(f"{pairs['level'][i]}, {kind}\ndistance {pairs['distance'][i]:.2f}", fontsize=8)
    axes[0, 0].set_ylabel("first scan", fontsize=8)
    axes[1, 0].set_ylabel("second scan", fontsize=8)
    fig.suptitle("Siamese network: where the features make the two bodies of a test pair alike\n"
                 "(Grad-CAM of minus the L2 distance of the embeddings; middle slice)", fontsize=10)
    fig.tight_layout()
    return save(fig, out)


# --- Normative model ----------------------------------------------------------------------------------------------

def normative_figure(deviations: dict[str, pd.DataFrame], summaries: dict[str, dict[str, Any]],
                     out: FigureFiles) -> list[Path]:
    """One row per frozen encoder: the test discs' deviation from the healthy-disc model by grade (points, and the
    mean per grade with its bootstrap interval; the reference discs' own deviations in grey) and against age (with
    the least-squares line); Spearman's rho and the slope per decade, with their intervals, in the titles."""
    encoders = list(deviations)
    fig, axes = plt.subplots(len(encoders), 2, figsize=(10, 3.4 * len(encoders)), squeeze=False)
    rng = np.random.default_rng(0)   # the jitter only
    for (grade_ax, age_ax), encoder in zip(axes, encoders):
        if "test" not in summaries[encoder]:
            _empty(grade_ax, f"{encoder}: no normative model: {summaries[encoder].get('skipped', 'no summary')}")
            age_ax.axis("off")
            continue
        table, test = deviations[encoder], summaries[encoder]["test"]
        reference, held_out = table[table.part == "reference"], table[table.part == "test"]
        healthy = summaries[encoder]["healthy_max_grade"]
        grade_ax.scatter(rng.uniform(-0.25, 0.25, len(reference)), reference.deviation, s=6, facecolors="none",
                         edgecolors="#999999", linewidths=0.5, label=f"reference (grade <= {healthy}, training)")
        grades = held_out.grade.to_numpy(dtype=float)
        grade_ax.scatter(grades + rng.uniform(-0.2, 0.2, len(grades)), held_out.deviation, s=8, alpha=0.6,
                         color=colour(encoder, encoders), label="test discs")
        for g, cell in test["by_grade"].items():
            low, high = cell["ci"]
            if low is not None:
                grade_ax.errorbar(int(g) + 0.32, cell["mean"], yerr=[[cell["mean"] - low], [high - cell["mean"]]],
                                  fmt="o", color="black", capsize=3, markersize=4)
        rho = test["spearman_grade"]
        grade_ax.set_title(f"{encoder}: deviation by grade, rho {_with_ci(rho)}")
        grade_ax.set_xticks(range(0, 6), ["ref", "1", "2", "3", "4", "5"])
        grade_ax.set_xlabel("Pfirrmann grade (test discs; mean and 95% interval in black)")
        grade_ax.set_ylabel("Mahalanobis deviation")
        grade_ax.legend(frameon=False, fontsize=7)
        ages = held_out.age_years.to_numpy(dtype=float)
        age_ax.scatter(ages, held_out.deviation, s=8, alpha=0.6, color=colour(encoder, encoders))
        ok = ~np.isnan(ages)
        if ok.sum() >= 3 and np.ptp(ages[ok]) > 0:
            slope, intercept = np.polyfit(ages[ok], held_out.deviation.to_numpy()[ok], 1)
            xs = np.array([ages[ok].min(), ages[ok].max()])
            age_ax.plot(xs, intercept + slope * xs, color="black", lw=1)
        age_ax.set_title(f"{encoder}: deviation by age, slope {_with_ci(test['slope_per_decade'])} per decade")
        age_ax.set_xlabel("age at the scan (years)")
        age_ax.set_ylabel("Mahalanobis deviation")
    fig.tight_layout()
    return save(fig, out)


# --- Benchmark of every model -----------------------------------------------------------------------------------

def benchmark_cells(summary: pd.DataFrame, segmentation: list[pd.DataFrame]) -> pd.DataFrame:
    """Every ranked cell: the probes' headline metrics and segmentation's Dice (stages/evaluation/benchmark.py)."""
    cells = [c for c in [bm.headline_cells(summary)] + [bm.segmentation_cells(s) for s in segmentation] if not c.empty]
    return bm.rank_cells(pd.concat(cells, ignore_index=True) if cells else bm.headline_cells(summary))


def benchmark_table(ranked: pd.DataFrame, costs: pd.DataFrame, out: TableFiles) -> list[Path]:
    """Every model and head, best mean rank first: the rank, each task's headline at its largest label fraction with
    its interval, the pretraining cost."""
    if ranked.empty:
        return write_table(pd.DataFrame({"note": ["no downstream results"]}), out,
                           "Benchmark of every model on every downstream task")
    board = bm.leaderboard(ranked, costs)
    tasks = list(dict.fromkeys(ranked.task))
    rows = []
    for i, entry in board.iterrows():
        row = {"rank": i + 1, "model": entry.model, "head": entry["head"],
               "mean rank position (cells)": f"{entry.mean_position:.2f} ({entry.cells})"}
        for task in tasks:
            cell = entry.get(task)
            row[task] = ("" if not isinstance(cell, tuple) else
                         f"{cell[0]:.3f} [{cell[1]:.3f}, {cell[2]:.3f}] at {cell[3]:.0%}")
        row["pretraining wall h"] = "" if pd.isna(entry.wall_hours) else f"{entry.wall_hours:.3f}"
        row["pretraining CPU h"] = "" if pd.isna(entry.cpu_hours) else f"{entry.cpu_hours:.3f}"
        rows.append(row)
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"note": ["no downstream results"]})
    headlines = ", ".join(f"{t}: {TASKS[t].headline.replace('_', ' ')}" for t in tasks if t in TASKS)
    return write_table(
        frame, out, "Benchmark of every model on every downstream task",
        f"Headline metrics ({headlines}; segmentation: Dice) at the largest label fraction, mean over seeds with the "
        "95% bootstrap interval over test subjects. Every model with its head is ranked within each cell (task or "
        "structure, and label fraction; ties share the mean rank) and scored by its rank position there, (rank - 1) "
        "/ (entries - 1): 0 best, 1 worst; the table orders them by the mean over their cells. Pretraining: "
        "wall-clock and CPU hours of the jobs that trained the model (a curriculum's steps and learning-rate "
        "searches summed), from Snakemake's benchmark files; empty for models not pretrained here.")


def benchmark_figure(ranked: pd.DataFrame, costs: pd.DataFrame, out: FigureFiles) -> list[Path]:
    """Every model with its head (best mean rank position first) against every cell (task and label fraction),
    coloured by rank position, the headline metric written in; below, the pretraining CPU hours."""
    if ranked.empty:
        fig, ax = plt.subplots(figsize=(8, 3))
        _empty(ax, "no downstream results")
        return save(fig, out)
    board = bm.leaderboard(ranked, costs)
    entries = list(zip(board.model, board["head"]))
    columns = sorted(dict.fromkeys(zip(ranked.task, ranked.fraction)), key=lambda c: (c[0].startswith("seg"), c))
    fig, (ax, cost_ax) = plt.subplots(2, 1, figsize=(max(10, 0.7 * len(columns) + 4), 0.3 * len(entries) + 5),
                                      gridspec_kw={"height_ratios": [max(3, len(entries)), 6]})
    grid = np.full((len(entries), len(columns)), np.nan)
    for _, c in ranked.iterrows():
        i, j = entries.index((c.model, c["head"])), columns.index((c.task, c.fraction))
        grid[i, j] = c.position
        ax.text(j, i, f"{c['mean']:.2f}" if np.isfinite(c["mean"]) else "", ha="center", va="center", fontsize=6,
                color="white" if c.position > 0.6 else "black")
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), [f"{t.replace('segmentation: ', 'seg. ')}\n{f:.0%}" for t, f in columns],
                  fontsize=6)
    ax.set_yticks(range(len(entries)), [f"{m} ({h})" for m, h in entries], fontsize=7)
    ax.set_title("every model and head on every downstream task and label fraction, best mean rank position first\n"
                 "(colour: rank position in the cell, 0 = best, 1 = worst; number: the headline metric)", fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="rank position")
    paid = costs.dropna(subset=["cpu_hours"]).sort_values("cpu_hours") if not costs.empty else costs
    if paid.empty:
        _empty(cost_ax, "no pretraining cost: no benchmark files")
    else:
        cost_ax.barh(paid.model, paid.cpu_hours, color=[colour(m, list(paid.model)) for m in paid.model])
        cost_ax.set_xlabel("pretraining CPU hours (Snakemake benchmark files)")
        cost_ax.set_title("pretraining cost", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


# --- Population: subgroups and associations -------------------------------------------------------------------

def _q_heatmap(ax: plt.Axes, tests: pd.DataFrame, rows: pd.Series, columns: pd.Series, fdr: float, title: str) -> None:
    """-log10 q of ``tests`` on a grid (``rows`` x ``columns`` labels per test), each cell's effect written in it, a
    box around those at q <= ``fdr``."""
    if tests.empty:
        _empty(ax, f"{title}: no tests")
        return
    row_names, col_names = list(dict.fromkeys(rows)), list(dict.fromkeys(columns))
    grid = np.full((len(row_names), len(col_names)), np.nan)
    for (_, test), r, c in zip(tests.iterrows(), rows, columns):
        i, j = row_names.index(r), col_names.index(c)
        grid[i, j] = -np.log10(max(test.q, 1e-12)) if np.isfinite(test.q) else np.nan
        ax.text(j, i, f"{test.effect:.2f}" if np.isfinite(test.effect) else "", ha="center", va="center", fontsize=6)
        if np.isfinite(test.q) and test.q <= fdr:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2))
    image = ax.imshow(grid, cmap="Oranges", vmin=0, vmax=max(2.0, float(np.nanmax(grid)) if np.isfinite(grid).any()
                                                                  else 2.0), aspect="auto")
    ax.set_xticks(range(len(col_names)), col_names, fontsize=7)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=6)
    ax.set_title(title, fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="-log10 q")


def population_figure(tests: dict[str, pd.DataFrame], summaries: dict[str, dict[str, Any]],
                      out: FigureFiles) -> list[Path]:
    """One row per frozen encoder: BIC per number of subgroups (the choice and its bootstrap stability), the groups'
    enrichment and the components' associations (-log10 q, effects written in, boxes at q <= fdr), the scanner
    confound (balanced accuracy against chance) and longitudinal change (embedding against grade, per year)."""
    encoders = list(tests)
    fig, axes = plt.subplots(len(encoders), 5, figsize=(24, 4.2 * len(encoders)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.3, 1.3, 0.8, 1]})
    for row, encoder in zip(axes, encoders):
        summary, table = summaries[encoder], tests[encoder]
        if "groups" not in summary:   # one line across the row
            for ax in row:
                ax.axis("off")
            row[0].text(0, 0.5, f"{encoder}: no population analysis: {summary.get('skipped', 'no summary')}",
                        transform=row[0].transAxes, ha="left", va="center", fontsize=11, color="#555")
            continue
        bic_ax, enrich_ax, assoc_ax, scanner_ax, change_ax = row
        ks = [int(k) for k in summary["bic"]]
        bic_ax.plot(ks, list(summary["bic"].values()), "o-", color=colour(encoder, encoders))
        bic_ax.axvline(summary["groups"], color="black", ls=":", lw=1)
        stable = summary["stability"]
        ari = "n/a" if stable["replicates"] == 0 else _with_ci({"value": stable["mean"], "ci": stable["ci"]})
        bic_ax.set_title(f"{encoder}: {summary['groups']} group(s) by BIC ({summary['subjects']} subjects)\n"
                         f"bootstrap ARI {ari}", fontsize=9)
        bic_ax.set_xlabel("groups in the Gaussian mixture")
        bic_ax.set_ylabel("BIC (lower is better)")
        fdr = summary["fdr"]
        enriched = table[table.analysis == "enrichment"]   # none for one group (stages/evaluation/population.py)
        category = enriched.category.astype(object).where(enriched.category.notna(), "").astype(str)  # all NaN: float
        _q_heatmap(enrich_ax, enriched, enriched.covariate.astype(str) + np.where(category != "", ": " + category, ""),
                   "group " + enriched.group.astype("Int64").astype(str), fdr,
                   f"enrichment (odds ratio / median difference); boxed: q <= {fdr:g}" if summary["groups"] > 1
                   else "enrichment: one group, no rest to compare it with")
        associated = table[table.analysis == "association"]
        _q_heatmap(assoc_ax, associated, associated.covariate,
                   "PC" + associated.component.astype("Int64").astype(str), fdr,
                   "components against covariates (Pearson r / eta squared)")
        names, values, chance, labels = [], [], [], []
        for name, result in summary["scanner_confound"].items():
            if "balanced_accuracy" in result:
                names.append(name.replace("_", " "))
                values.append(result["balanced_accuracy"])
                chance.append(result["chance"])
                labels.append(f"p {result['p']:.3f}")
        if names:
            bars = scanner_ax.bar(names, values, color=colour(encoder, encoders))
            for bar, c, text in zip(bars, chance, labels):
                scanner_ax.hlines(c, bar.get_x(), bar.get_x() + bar.get_width(), color="black", ls="--", lw=1)
                scanner_ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, text, ha="center",
                                fontsize=7)
            scanner_ax.set_ylim(0, 1.1)
            scanner_ax.set_ylabel("balanced accuracy (cross-validated)")
            scanner_ax.set_title("scanner confound: read from the embedding\n(dashed: chance)", fontsize=9)
        else:
            reasons = "; ".join(f"{k.replace('_', ' ')}: {v.get('skipped', '')}"
                                for k, v in summary["scanner_confound"].items())
            _empty(scanner_ax, f"scanner confound not tested ({reasons})")
        change = summary["longitudinal"]
        if "spearman" in change:
            points = pd.DataFrame(summary["longitudinal_points"])
            change_ax.scatter(points.grade_per_year, points.embedding_per_year, s=12,
                              color=colour(encoder, encoders))
            change_ax.set_xlabel("mean disc grade change per year")
            change_ax.set_ylabel("embedding distance moved per year")
            change_ax.set_title(f"longitudinal: {change['subjects']} subjects, rho {_with_ci(change['spearman'])}",
                                fontsize=9)
        else:
            _empty(change_ax, f"longitudinal: {change['skipped']}")
    fig.tight_layout()
    return save(fig, out)


def _with_ci(figure: dict[str, Any]) -> str:
    value, (low, high) = figure["value"], figure["ci"]
    if value is None or np.isnan(value):
        return "n/a"
    return f"{value:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def genetics_figure(heritability: dict[str, pd.DataFrame], scans: dict[str, pd.DataFrame],
                    summaries: dict[str, dict[str, Any]], truth: dict[str, Any] | None, out: FigureFiles) -> list[Path]:
    """Left: twin heritability of the mean baseline grade and of each encoder's leading components (ACE by maximum
    likelihood, filled, with its family-bootstrap interval; Falconer's estimate hollow), the demo's expected value of
    the disc trait dashed. Right: Manhattan plots, -log10 p of every SNP, the disc trait's scan on top and one row
    per encoder for its components; SNPs at q <= fdr ringed, planted SNPs (the demo's truth) marked."""
    encoders = list(heritability)
    fig = plt.figure(figsize=(18, 2.2 + 2.6 * (len(encoders) + 1)))
    grid = fig.add_gridspec(len(encoders) + 1, 2, width_ratios=[1, 2.2])
    h_ax = fig.add_subplot(grid[:, 0])
    rows, labels = [], []
    disc_from = next((e for e in encoders if (heritability[e].trait == "mean_grade").any()), None)
    for encoder in encoders:
        for _, r in heritability[encoder].iterrows():
            if r.trait == "mean_grade" and encoder != disc_from:
                continue
            rows.append((encoder, r))
            labels.append("mean grade (disc trait)" if r.trait == "mean_grade" else f"{encoder} {r.trait.upper()}")
    for y, (encoder, r) in enumerate(rows):
        c = "black" if r.trait == "mean_grade" else colour(encoder, encoders)
        pairs = f"{int(r.get('mz_pairs', 0))} MZ / {int(r.get('dz_pairs', 0))} DZ pairs"
        if pd.notna(r.get("h2", np.nan)):
            h_ax.errorbar(r.h2, y, xerr=[[max(r.h2 - r.h2_low, 0)], [max(r.h2_high - r.h2, 0)]], fmt="o", color=c,
                          capsize=3)
            if pd.notna(r.falconer_h2):   # a moment estimate can fall far outside [0, 1]: kept at the axis' edge
                clipped = float(np.clip(r.falconer_h2, -0.95, 1.95))
                h_ax.plot(clipped, y - 0.25, ">" if clipped < r.falconer_h2 else "<" if clipped > r.falconer_h2
                          else "o", mfc="none", color=c)
            h_ax.text(2.05, y, f"{r.h2:.2f} [{r.h2_low:.2f}, {r.h2_high:.2f}]", va="center", fontsize=7)
        else:
            h_ax.text(0.5, y, f"skipped: {r.get('skipped', '')}", va="center", ha="center", fontsize=7, color="#555")
        h_ax.text(-0.95, y + 0.3, pairs, fontsize=6, color="#555")
    if truth and disc_from is not None:
        expected = truth["expected"]["h2"]
        y = next(i for i, (_, r) in enumerate(rows) if r.trait == "mean_grade")
        h_ax.vlines(expected, y - 0.45, y + 0.45, color="crimson", ls="--")
        h_ax.text(expected, y + 0.5, f"expected {expected:.2f}\n(planted liability {truth['liability']['h2']:.2f})",
                  color="crimson", fontsize=7, ha="center")
    h_ax.set_yticks(range(len(rows)), labels, fontsize=8)
    h_ax.set_ylim(len(rows) - 0.3, -0.7)
    h_ax.set_xlim(-1.0, 2.8)
    h_ax.axvspan(0, 1, color="#f2f2f2", zorder=0)
    h_ax.set_xlabel("heritability h2 (filled: ACE, interval over families; hollow: Falconer, arrow: off the axis)")
    h_ax.set_title("twin heritability, adjusted for " + ", ".join(summaries[encoders[0]]["covariates"]), fontsize=10)
    planted = {s["snp"] for s in truth["planted_snps"]} if truth else set()
    panels = [("mean grade (disc trait)", disc_from, ["mean_grade"])] + [
        (f"{e}: leading components", e, [t for t in summaries[e]["traits"] if t != "mean_grade"]) for e in encoders]
    for i, (title, encoder, traits) in enumerate(panels):
        ax = fig.add_subplot(grid[i, 1])
        scan = scans[encoder] if encoder is not None else pd.DataFrame()
        scan = scan[scan.trait.isin(traits)] if len(scan) else scan
        if not len(scan):
            reason = "; ".join(f"{k}: {v}" for k, v in summaries.get(encoder, {}).get("skipped", {}).items()
                               if k.startswith("scan"))
            _empty(ax, f"{title}: no SNP scan ({reason or 'no genotype table'})")
            continue
        fdr = summaries[encoder]["fdr"]
        for j, trait in enumerate(traits):
            part = scan[scan.trait == trait]
            c = "black" if trait == "mean_grade" else plt.get_cmap("tab10")(j)
            ax.scatter(part.position, -np.log10(part.p.clip(lower=1e-300)), s=8, color=c,
                       label="mean grade" if trait == "mean_grade" else trait.upper())
            hit = part[part.q <= fdr]
            ax.scatter(hit.position, -np.log10(hit.p), s=60, facecolors="none", edgecolors="crimson", lw=1.2)
            for _, h in hit.iterrows():
                ax.annotate(h.snp, (h.position, -np.log10(h.p)), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        for _, s in scan.drop_duplicates("snp")[lambda d: d.snp.isin(planted)].iterrows():
            ax.axvline(s.position, color="crimson", ls=":", lw=1)
        ax.set_ylabel("-log10 p")
        ax.set_title(f"{title}: {scan.snp.nunique()} SNPs; ringed q <= {fdr:g}"
                     + ("; dotted: planted SNPs" if planted else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncol=len(traits))
    fig.axes[-1].set_xlabel("SNP (position in the genotype table)")
    fig.tight_layout()
    return save(fig, out)


# --- CLI ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.figures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE")

    def add(name: str, text: str, kind: str = "figure") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        for option, what in (("png", "PNG file (200 dpi)"), ("pdf", "PDF file")) if kind == "figure" else (
                ("html", "HTML page"), ("csv", "CSV file")):
            p.add_argument(f"--{option}", type=Path, required=True, help=f"The {what} to write.")
        cli.add_log_option(p)
        return p

    def models(p: argparse.ArgumentParser) -> None:
        p.add_argument("--end-to-end", nargs="*", default=["scratch"], help="Models trained end to end.")

    p = add("pretext", "Distance histograms and ROC of the pretext test pairs (Jamaludin Fig. 6).")
    p.add_argument("--distances", type=cli.existing_file, nargs="+", required=True,
                   help="pretrain/{method}/pretext/distances.parquet, one per method.")
    p.add_argument("--methods", nargs="+", required=True, help="The methods' names, in the same order.")
    p.add_argument("--evaluations", type=cli.existing_file, nargs="*", default=[],
                   help="pretrain/{method}/pretext/evaluation.json, one per method in the same order (a view "
                        "method's batch size: the chance level of its top-1).")
    for name, text in (("label-efficiency", "Headline metric vs training subjects with bands (Jamaludin Fig. 8)."),
                       ("label-curves", "Herniation accuracy and AUC vs labels (Hou Fig. 9).")):
        p = add(name, text)
        p.add_argument("--summary", type=cli.existing_file, required=True, help="probes/summary.parquet.")
        models(p)
    p = add("figure-of-merit", "The label-efficiency figure of merit as a table.", "table")
    p.add_argument("--efficiency", type=cli.existing_file, required=True, help="probes/label_efficiency.csv.")
    for name, text in (("roc", "Herniation ROC curves per model (Hou Fig. 8)."),
                       ("confusion", "Grade confusion matrices per model.")):
        p = add(name, text)
        p.add_argument("--predictions", type=cli.existing_file, required=True, help="probes/predictions.parquet.")
        models(p)
    p = add("metrics-table", "ACC, SEN, SPE, AUC mean +- std over seeds (Cao Table 1).", "table")
    p.add_argument("--results", type=cli.existing_file, required=True, help="probes/results.parquet.")
    models(p)
    p = add("ablation-table", "MLSSCL's ablation: both losses, multiview only, long-short only (Cao Table 3).",
            "table")
    p.add_argument("--results", type=cli.existing_file, required=True, help="probes/results.parquet.")
    p.add_argument("--evaluations", type=cli.existing_file, nargs="+", required=True,
                   help="pretrain/{method}/pretext/evaluation.json of the mlsscl methods (the method is read from it).")
    p = add("curricula-table", "Curricula vs their single tasks: balanced accuracy, delta, attention.", "table")
    p.add_argument("--summary", type=cli.existing_file, required=True, help="probes/summary.parquet.")
    p.add_argument("--curricula", nargs="*", default=[], metavar="NAME=TASK,TASK",
                   help="Named curricula and their steps (curricula.runs).")
    p.add_argument("--orderings", type=cli.existing_file, default=None,
                   help="pretrain/orderings.json (the curricula C, AC, MC and their steps).")
    p.add_argument("--attention", type=cli.existing_file, nargs="*", default=[],
                   help="report/gradcam/{model}/summary.json (the model is read from it).")
    p.add_argument("--searches", type=cli.existing_file, nargs="*", default=[],
                   help="pretrain/{curriculum}/steps/{i}/lr_search.csv.")
    p.add_argument("--task", default="grade", help="The downstream task (default: %(default)s).")
    p.add_argument("--head", default="linear", help="The probe head (default: %(default)s).")
    p = add("segmentation-table", "Segmentation DSC, PPV, LTPR, LFPR per encoder and subset (Cao Table 2).", "table")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="segmentation/{model}/summary.parquet, one per model.")
    p = add("segmentation", "Segmentation DSC against labelled subjects, and example predictions.")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="segmentation/{model}/summary.parquet, one per model.")
    p.add_argument("--examples", type=cli.existing_file, nargs="+", required=True,
                   help="segmentation/{model}/examples.npz, one per model in the same order.")
    p = add("embeddings", "t-SNE maps of the test bodies' features.")
    p.add_argument("--coords", type=cli.existing_file, nargs="+", required=True,
                   help="report/embeddings/{encoder}.parquet, one per encoder (named by the file).")
    p = add("training", "Training curves.")
    p.add_argument("--pretrain", type=cli.existing_file, nargs="*", default=[],
                   help="pretrain/{method}/metrics.csv (the method is the folder's name).")
    p.add_argument("--supervised", type=cli.existing_file, help="probes/encoders/supervised/history.csv.")
    p.add_argument("--end-to-end", type=cli.existing_file, nargs="*", default=[],
                   help="history.csv of end-to-end probe jobs (named by the model of their job).")
    p = add("gradcam", "Grad-CAM examples per model.")
    p.add_argument("--maps", type=cli.existing_file, nargs="+", required=True,
                   help="report/gradcam/{model}/maps.npz (the model is the folder's name).")
    p.add_argument("--vertebrae", type=cli.existing_file,
                   help="extract/vertebrae.npy (only for maps written without their input volumes).")
    p.add_argument("--variant", choices=("gradcam", "hou"), default="gradcam", help="Which maps.")
    p = add("attention", "The attention-inside-the-disc table.", "table")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="report/gradcam/{model}/summary.json.")
    p = add("normative", "Deviation from the healthy-disc model by grade and age, per encoder.")
    p.add_argument("--deviations", type=cli.existing_file, nargs="+", required=True,
                   help="report/normative/{encoder}.parquet, one per encoder (named by the file).")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="report/normative/{encoder}.json, one per encoder in the same order.")
    for name, kind in (("benchmark-table", "table"), ("benchmark", "figure")):
        p = add(name, "Every model on every downstream task, ranked, with the pretraining cost.", kind)
        p.add_argument("--summary", type=cli.existing_file, required=True, help="probes/summary.parquet.")
        p.add_argument("--segmentation", type=cli.existing_file, nargs="*", default=[],
                       help="segmentation/{model}/summary.parquet, one per model (where segmentation ran).")
        p.add_argument("--costs", type=Path, nargs="*", default=[],
                       help="benchmarks/pretrain/*.tsv of the pretraining jobs (Snakemake benchmark files; a missing "
                            "file leaves its model's cost empty).")
        p.add_argument("--cost-models", nargs="*", default=[],
                       help="The model each --costs file belongs to, in the same order (a curriculum's steps repeat "
                            "its name).")
    p = add("population", "Subgroups, associations, the scanner confound and longitudinal change, per encoder.")
    p.add_argument("--tests", type=cli.existing_file, nargs="+", required=True,
                   help="report/population/{encoder}_tests.csv, one per encoder (named by the file).")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="report/population/{encoder}.json, one per encoder in the same order.")
    p = add("genetics", "Twin heritability and SNP association (Manhattan), per encoder.")
    p.add_argument("--heritability", type=cli.existing_file, nargs="+", required=True,
                   help="report/genetics/{encoder}_heritability.csv, one per encoder (named by the file).")
    p.add_argument("--scans", type=cli.existing_file, nargs="+", required=True,
                   help="report/genetics/{encoder}_scan.csv, one per encoder in the same order.")
    p.add_argument("--summaries", type=cli.existing_file, nargs="+", required=True,
                   help="report/genetics/{encoder}.json, one per encoder in the same order.")
    p.add_argument("--truth", type=cli.existing_file, default=None,
                   help="The demo cohort's truth/genetics.json: the expected heritability and the planted SNPs.")
    p = add("pairs", "Siamese pair explanations.")
    p.add_argument("--pairs", type=cli.existing_file, required=True, help="report/gradcam/{method}/pairs.npz.")
    p.add_argument("--vertebrae", type=cli.existing_file, required=True, help="extract/vertebrae.npy.")
    return parser


def histories(paths: list[Path]) -> dict[str, pd.DataFrame]:
    """The end-to-end probe jobs' training histories by model (the job of each file, stages/evaluation/probe_data.py);
    a job whose subset had one class trained nothing and has no rows."""
    tables = {}
    for path in paths:
        table = pd.read_csv(path)
        if table.empty:
            log.warning("%s has no rows: the job trained nothing (one-class subset?)", path)
        else:
            tables[run_of(path)["model"]] = table
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log, "figures")
    figure = FigureFiles(args.png, args.pdf) if "png" in args else None
    table = TableFiles(args.html, args.csv) if "html" in args else None
    if args.figure == "pretext":
        if len(args.methods) != len(args.distances):
            parser.error(f"give one --methods name per --distances file ({len(args.distances)} files, "
                         f"{len(args.methods)} names)")
        if args.evaluations and len(args.evaluations) != len(args.methods):
            parser.error(f"give one --evaluations file per method ({len(args.methods)} methods, "
                         f"{len(args.evaluations)} files)")
        pretext_figure({m: pd.read_parquet(p) for m, p in zip(args.methods, args.distances)}, figure,
                       {m: json.loads(p.read_text()) for m, p in zip(args.methods, args.evaluations)})
    elif args.figure == "label-efficiency":
        label_efficiency_figure(pd.read_parquet(args.summary), figure, args.end_to_end)
    elif args.figure == "label-curves":
        label_curves_figure(pd.read_parquet(args.summary), figure, args.end_to_end)
    elif args.figure == "figure-of-merit":
        figure_of_merit_table(pd.read_csv(args.efficiency), table)
    elif args.figure == "roc":
        roc_figure(pd.read_parquet(args.predictions), figure, args.end_to_end)
    elif args.figure == "confusion":
        confusion_figure(pd.read_parquet(args.predictions), figure, args.end_to_end)
    elif args.figure == "metrics-table":
        metrics_table(pd.read_parquet(args.results), table, args.end_to_end)
    elif args.figure == "ablation-table":
        evaluations = [json.loads(p.read_text()) for p in args.evaluations]
        ablation_table(pd.read_parquet(args.results), {e["method"]: e for e in evaluations}, table)
    elif args.figure == "segmentation-table":
        segmentation_table(pd.concat([pd.read_parquet(p) for p in args.summaries], ignore_index=True), table)
    elif args.figure == "segmentation":
        if len(args.examples) != len(args.summaries):
            parser.error("give one --examples file per --summaries file, in the same order")
        summaries = [pd.read_parquet(p) for p in args.summaries]
        examples = {p.parent.name: dict(np.load(p)) for p in args.examples}
        segmentation_figure(pd.concat(summaries, ignore_index=True), examples, figure)
    elif args.figure == "embeddings":
        embeddings_figure({p.stem: pd.read_parquet(p) for p in args.coords}, figure)
    elif args.figure == "training":
        pretrain = {p.parent.name: pd.read_csv(p) for p in args.pretrain}
        supervised = pd.read_csv(args.supervised) if args.supervised else None
        training_figure(pretrain, supervised, histories(args.end_to_end), figure)
    elif args.figure == "gradcam":
        maps = {p.parent.name: dict(np.load(p)) for p in args.maps}
        bodies = np.load(args.vertebrae, mmap_mode="r") if args.vertebrae else None
        gradcam_figure(maps, bodies, figure, args.variant)
    elif args.figure == "curricula-table":
        curricula = {}
        for item in args.curricula:
            name, _, steps = item.partition("=")
            if not name or not steps:
                parser.error(f"--curricula takes NAME=TASK,TASK, got {item!r}")
            curricula[name] = steps.split(",")
        if args.orderings:
            orders = json.loads(args.orderings.read_text())
            curricula.update({k: v for k, v in orders.items() if k in ("C", "AC", "MC")})
        searches: dict[str, list[pd.DataFrame]] = {}
        for path in sorted(args.searches, key=lambda p: int(p.parent.name)):   # .../{curriculum}/steps/{i}/
            searches.setdefault(path.parent.parent.parent.name, []).append(pd.read_csv(path))
        attention = {s["model"]: s for s in (json.loads(p.read_text()) for p in args.attention)}
        curricula_table(pd.read_parquet(args.summary), curricula, attention, searches, args.task, args.head, table)
    elif args.figure == "attention":
        attention_table([json.loads(p.read_text()) for p in args.summaries], table)
    elif args.figure == "normative":
        if len(args.deviations) != len(args.summaries):
            parser.error(f"give one --summaries file per --deviations file ({len(args.deviations)} and "
                         f"{len(args.summaries)})")
        normative_figure({p.stem: pd.read_parquet(p) for p in args.deviations},
                         {p.stem: json.loads(q.read_text()) for p, q in zip(args.deviations, args.summaries)}, figure)
    elif args.figure in ("benchmark", "benchmark-table"):
        if len(args.costs) != len(args.cost_models):
            parser.error(f"give one --cost-models name per --costs file ({len(args.cost_models)} and "
                         f"{len(args.costs)})")
        files: dict[str, list[Path]] = {}
        for model, path in zip(args.cost_models, args.costs):
            files.setdefault(model, []).append(path)
        ranked = benchmark_cells(pd.read_parquet(args.summary), [pd.read_parquet(p) for p in args.segmentation])
        costs = bm.pretraining_costs(files)
        if args.figure == "benchmark":
            benchmark_figure(ranked, costs, figure)
        else:
            benchmark_table(ranked, costs, table)
    elif args.figure == "population":
        if len(args.tests) != len(args.summaries):
            parser.error(f"give one --summaries file per --tests file ({len(args.tests)} and {len(args.summaries)})")
        population_figure({p.stem.removesuffix("_tests"): pd.read_csv(p, keep_default_na=True) for p in args.tests},
                          {p.stem.removesuffix("_tests"): json.loads(q.read_text())
                           for p, q in zip(args.tests, args.summaries)}, figure)
    elif args.figure == "genetics":
        if not len(args.heritability) == len(args.scans) == len(args.summaries):
            parser.error("give one --scans and one --summaries file per --heritability file")
        names = [p.stem.removesuffix("_heritability") for p in args.heritability]
        genetics_figure({n: pd.read_csv(p) for n, p in zip(names, args.heritability)},
                        {n: pd.read_csv(p) for n, p in zip(names, args.scans)},
                        {n: json.loads(p.read_text()) for n, p in zip(names, args.summaries)},
                        json.loads(args.truth.read_text()) if args.truth else None, figure)
    elif args.figure == "pairs":
        pairs_figure(dict(np.load(args.pairs)), np.load(args.vertebrae, mmap_mode="r"), figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
