"""Stage curriculum_order: the curriculum orderings of the curricular multi-task study from the single tasks'
downstream results ("effective curriculum orderings of the SSL tasks correlate with increasing downstream accuracies
obtained for the individual SSL task").

Each task of ``--tasks`` was pretrained alone and probed (stages/probe.py); its score is the mean over the probe's
seeds of one head's balanced accuracy (average class accuracy) on one downstream task at the largest label fraction
(``--metrics``: those jobs' metrics.json files). The orderings:

- ``C`` (curriculum): the tasks by increasing score;
- ``AC`` (anti-curriculum): by decreasing score;
- ``MC`` (mixed, three or more tasks): the curriculum with its first two steps swapped, an order that is neither
  increasing nor decreasing.

Ties keep the order of ``--tasks``. Writes ``--out-json`` (the scores and the three orderings, read by each step of
the ordered curricula: ``python -m stages.pretrain --ordering FILE --ordering-name C --step I``) and ``--out-csv``
(one row per task: its score, the seeds it is the mean of, and its place in each ordering).

Run:
    python -m stages.curriculum_order --tasks rotation relative_location swav --probe-task grade --head linear \\
        --metrics results/probes/runs/rotation/grade/f1/seed0/metrics.json ... \\
        --out-json results/pretrain/orderings.json --out-csv results/pretrain/orderings.csv
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli

log = logging.getLogger("curriculum_order")
METRIC = "average_class_accuracy"   # balanced accuracy, the study's measure


def orderings(scores: dict[str, float], tasks: list[str]) -> dict[str, list[str]]:
    """C, AC and (three or more tasks) MC of ``tasks`` by ``scores`` (see the module's docstring)."""
    if len(tasks) < 2 or set(tasks) - set(scores):
        raise ValueError(f"need a score for each of two or more tasks, got {tasks} and scores for {sorted(scores)}")
    rank = {task: i for i, task in enumerate(tasks)}
    increasing = sorted(tasks, key=lambda t: (scores[t], rank[t]))
    decreasing = sorted(tasks, key=lambda t: (-scores[t], rank[t]))
    out = {"C": increasing, "AC": decreasing}
    if len(tasks) >= 3:
        out["MC"] = [increasing[1], increasing[0], *increasing[2:]]
    return out


def task_scores(metrics: list[dict[str, Any]], tasks: list[str], probe_task: str,
                head: str) -> tuple[dict[str, float], dict[str, int]]:
    """Each task's mean balanced accuracy over its probe jobs at the largest fraction among ``metrics``, and the
    number of seeds."""
    rows = [{"model": m["model"], "task": m["task"], "fraction": m["fraction"], "seed": m["seed"],
             "value": m["heads"].get(head, {}).get(METRIC, np.nan)} for m in metrics]
    table = pd.DataFrame(rows, columns=["model", "task", "fraction", "seed", "value"])
    table = table[(table.task == probe_task) & table.model.isin(tasks)]
    missing = [t for t in tasks if t not in set(table.model)]
    if missing:
        raise ValueError(f"no {probe_task} probe results of {missing} among the --metrics files")
    table = table[table.fraction == table.groupby("model").fraction.transform("max")]
    if table.value.isna().any():
        bad = sorted(set(table.model[table.value.isna()]))
        raise ValueError(f"the {head} head has no {METRIC} in the {probe_task} results of {bad}")
    grouped = table.groupby("model").value
    return {t: float(grouped.mean()[t]) for t in tasks}, {t: int(grouped.count()[t]) for t in tasks}


def run(metrics_files: list[Path], tasks: list[str], probe_task: str, head: str, out_json: Path,
        out_csv: Path) -> dict[str, Any]:
    metrics = [json.loads(p.read_text()) for p in metrics_files]
    scores, seeds = task_scores(metrics, tasks, probe_task, head)
    orders = orderings(scores, tasks)
    result = {"probe_task": probe_task, "head": head, "metric": METRIC, "scores": scores, "seeds": seeds, **orders}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    table = pd.DataFrame({"task": tasks, "score": [scores[t] for t in tasks], "seeds": [seeds[t] for t in tasks],
                          **{f"step_in_{name}": [order.index(t) + 1 for t in tasks] for name, order in orders.items()}})
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    log.info("%s %s balanced accuracy: %s; %s", probe_task, head,
             ", ".join(f"{t} {scores[t]:.3f}" for t in tasks),
             "; ".join(f"{name} {' -> '.join(order)}" for name, order in orders.items()))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.curriculum_order", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", required=True, help="The single tasks to order (pretraining methods).")
    parser.add_argument("--probe-task", required=True, help="The downstream task whose results order them.")
    parser.add_argument("--head", required=True, help="The probe head whose balanced accuracy is the score.")
    parser.add_argument("--metrics", type=cli.existing_file, nargs="+", required=True,
                        help="The tasks' probe jobs' metrics.json files.")
    parser.add_argument("--out-json", type=Path, required=True, help="Output: scores and orderings (JSON).")
    parser.add_argument("--out-csv", type=Path, required=True, help="Output: one row per task (CSV).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.tasks)) != len(args.tasks) or len(args.tasks) < 2:
        parser.error(f"--tasks needs two or more different tasks, got {args.tasks}")
    cli.setup_logging(args.log, "curriculum_order")
    try:
        run(args.metrics, args.tasks, args.probe_task, args.head, args.out_json, args.out_csv)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
