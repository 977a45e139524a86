"""One benchmark of every model on every downstream task (the population analysis's "implement and benchmark").

Each task's headline metric (stages/evaluation/probe_data.py's ``TASKS``: average class accuracy for the grade, ROC
AUC for herniation, accuracy for the level) at every label fraction, per model and head, from the probes' summary
(mean over seeds, bootstrap interval over test subjects); segmentation's Dice per structure at each labelled share
where it ran. Every entry (a model with its head: linear, MLP, transfer, the end-to-end network, segmentation) is
ranked within each cell (task or structure, and label fraction: 1 = best, ties share the mean rank) and scored there
by its rank position, (rank - 1) / (entries - 1): 0 best, 1 worst, so that cells with different numbers of entries
weigh alike; entries are ordered by their mean position over the cells they have (a missing cell is not scored).
Pretraining cost: wall-clock and CPU hours of the jobs that trained each model (Snakemake's benchmark files; a
curriculum's steps summed, its learning-rate searches included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.evaluation.probe_data import TASKS

CELL = ["task", "fraction"]
COLUMNS = ["model", "head", "task", "fraction", "n_subjects", "mean", "ci_low", "ci_high"]


def headline_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """The probes' summary reduced to each task's headline metric: model, head, task, fraction, n_subjects, mean,
    ci_low, ci_high."""
    headline = np.array([t in TASKS and TASKS[t].headline == m for t, m in zip(summary.task, summary.metric)], bool)
    keep = summary[headline] if len(summary) else summary.reindex(columns=COLUMNS)
    return keep[["model", "head", "task", "fraction", "n_subjects", "mean", "ci_low", "ci_high"]].reset_index(drop=True)


def segmentation_cells(summaries: pd.DataFrame) -> pd.DataFrame:
    """The segment stages' summaries (model, fraction, structure, metric, value, ci_low, ci_high, n_subjects)
    reduced to Dice, as cells of head ``segmentation`` and task ``segmentation: {structure}``."""
    if summaries.empty:
        return pd.DataFrame(columns=["model", "head", "task", "fraction", "n_subjects", "mean", "ci_low", "ci_high"])
    dsc = summaries[summaries.metric == "dice"]
    return pd.DataFrame({"model": dsc.model, "head": "segmentation", "task": "segmentation: " + dsc.structure,
                         "fraction": dsc.fraction, "n_subjects": dsc.n_subjects, "mean": dsc.value,
                         "ci_low": dsc.ci_low, "ci_high": dsc.ci_high}).reset_index(drop=True)


def rank_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with ``rank`` within each (task, fraction), 1 for the highest mean (ties share their mean rank; a
    NaN mean gets none), ``entries`` ranked there, and ``position`` (rank - 1) / (entries - 1) (0 for a lone entry)."""
    rank = cells.groupby(CELL)["mean"].rank(ascending=False, method="average")
    entries = rank.notna().groupby([cells[c] for c in CELL]).transform("sum")
    return cells.assign(rank=rank, entries=entries, position=((rank - 1) / (entries - 1).clip(lower=1)))


def leaderboard(ranked: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Per model and head: the mean rank position over its ranked cells, how many, each task's headline at its
    largest fraction, and the model's pretraining cost (NaN for models that were not pretrained here); best first."""
    rows = []
    for (model, head), own in ranked.groupby(["model", "head"], sort=False):
        row = {"model": model, "head": head, "mean_position": float(own.position.mean()),
               "cells": int(own["rank"].notna().sum())}
        for task, per_task in own.groupby("task", sort=False):
            top = per_task[per_task.fraction == per_task.fraction.max()].iloc[0]
            row[task] = (float(top["mean"]), float(top.ci_low), float(top.ci_high), float(top.fraction))
        rows.append(row)
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board = board.merge(costs, on="model", how="left") if not costs.empty else board.assign(wall_hours=np.nan,
                                                                                              cpu_hours=np.nan)
    return board.sort_values(["mean_position", "model", "head"], kind="stable").reset_index(drop=True)


def pretraining_costs(files: dict[str, list[Path]]) -> pd.DataFrame:
    """Wall-clock and CPU hours per model, summed over its jobs' Snakemake benchmark files (``s`` and ``cpu_time``
    columns, seconds; the last line of each file: a job re-run appends none, the file is rewritten). A model with a
    missing file (results copied without their benchmarks folder, a run before the file existed) has no cost."""
    rows = []
    for model, paths in files.items():
        wall = cpu = 0.0
        if not all(Path(p).is_file() for p in paths):
            rows.append({"model": model, "wall_hours": np.nan, "cpu_hours": np.nan, "jobs": len(paths)})
            continue
        for path in paths:
            frame = pd.read_csv(path, sep="\t")
            if frame.empty or "s" not in frame:
                raise ValueError(f"{path} is not a Snakemake benchmark file (no 's' column or no rows)")
            wall += float(frame["s"].iloc[-1])
            cpu += float(frame["cpu_time"].iloc[-1]) if "cpu_time" in frame else np.nan
        rows.append({"model": model, "wall_hours": wall / 3600, "cpu_hours": cpu / 3600, "jobs": len(paths)})
    return pd.DataFrame(rows, columns=["model", "wall_hours", "cpu_hours", "jobs"])
