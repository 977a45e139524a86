"""The benchmark of every model on every downstream task: headline metrics picked per task, ranks and rank positions
within each cell by hand, the leaderboard's order, pretraining costs summed from Snakemake benchmark files, and the
report's table and figure through the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.evaluation import benchmark as bm
from stages.figures import main as figures_main


def _summary() -> pd.DataFrame:
    rows = []
    values = {  # (model, head) -> grade average class accuracy at fractions 0.5 and 1.0; herniation AUC at 1.0
        ("siamese", "linear"): (0.70, 0.80, 0.90),
        ("random", "linear"): (0.60, 0.70, 0.60),
        ("scratch", "network"): (0.50, 0.80, 0.70),
    }
    for (model, head), (g50, g100, h100) in values.items():
        for task, metric, fraction, value in (("grade", "average_class_accuracy", 0.5, g50),
                                              ("grade", "average_class_accuracy", 1.0, g100),
                                              ("grade", "accuracy", 1.0, 0.99),          # not the headline
                                              ("herniation", "auc", 1.0, h100)):
            rows.append({"model": model, "head": head, "task": task, "fraction": fraction, "n_subjects": 10 * fraction,
                         "metric": metric, "mean": value, "ci_low": value - 0.1, "ci_high": value + 0.1})
    return pd.DataFrame(rows)


def test_ranks_and_positions_by_hand():
    cells = bm.headline_cells(_summary())
    assert set(cells.task) == {"grade", "herniation"} and len(cells) == 9     # the accuracy rows dropped
    ranked = bm.rank_cells(cells).set_index(["model", "task", "fraction"])
    # grade at 1.0: siamese 0.80 and scratch 0.80 tie for ranks 1-2 (1.5 each), random 3rd
    assert ranked.loc[("siamese", "grade", 1.0), "rank"] == 1.5 == ranked.loc[("scratch", "grade", 1.0), "rank"]
    assert ranked.loc[("random", "grade", 1.0), "rank"] == 3
    # position = (rank - 1) / (entries - 1): 3 entries per cell
    assert ranked.loc[("random", "grade", 1.0), "position"] == 1.0
    assert ranked.loc[("siamese", "grade", 1.0), "position"] == pytest.approx(0.25)
    assert ranked.loc[("siamese", "herniation", 1.0), "position"] == 0.0
    board = bm.leaderboard(bm.rank_cells(cells), pd.DataFrame(columns=["model", "wall_hours", "cpu_hours", "jobs"]))
    # siamese: (0 + 0.25 + 0) / 3; scratch: (1 + 0.25 + 0.5) / 3; random: (0.5 + 1 + 1) / 3
    assert list(board.model) == ["siamese", "scratch", "random"]
    assert board.mean_position.tolist() == pytest.approx([0.25 / 3, 1.75 / 3, 2.5 / 3])
    assert board.loc[0, "grade"] == (0.80, pytest.approx(0.70), pytest.approx(0.90), 1.0)   # at the largest fraction


def test_a_lone_entry_and_a_missing_value_are_handled():
    cells = pd.DataFrame({"model": ["a", "b", "c"], "head": "segmentation", "task": ["seg", "seg", "other"],
                          "fraction": 1.0, "n_subjects": 4, "mean": [0.9, np.nan, 0.5], "ci_low": 0.0, "ci_high": 1.0})
    ranked = bm.rank_cells(cells)
    assert ranked["rank"].tolist()[0] == 1 and np.isnan(ranked["rank"].tolist()[1])
    assert ranked.position.tolist()[2] == 0.0 and ranked.entries.tolist() == [1, 1, 1]


def test_segmentation_cells_are_dice_per_structure():
    summaries = pd.DataFrame({"model": "siamese", "fraction": [0.1, 0.1], "n_subjects": 4, "structure": "disc",
                              "metric": ["dice", "ppv"], "value": [0.8, 0.7], "ci_low": 0.7, "ci_high": 0.9})
    cells = bm.segmentation_cells(summaries)
    assert cells.task.tolist() == ["segmentation: disc"] and cells["mean"].tolist() == [0.8]


def _bench(path, seconds: float, cpu: float) -> None:
    path.write_text("s\th:m:s\tmax_rss\tcpu_time\n" f"{seconds}\t0:00:00\t100\t{cpu}\n")


def test_pretraining_costs_sum_a_curriculums_steps(tmp_path):
    for name, s, cpu in (("siamese", 3600, 7200), ("c_step1", 1800, 1800), ("c_step2", 1800, 3600)):
        _bench(tmp_path / f"{name}.tsv", s, cpu)
    costs = bm.pretraining_costs({"siamese": [tmp_path / "siamese.tsv"],
                                  "c": [tmp_path / "c_step1.tsv", tmp_path / "c_step2.tsv"]}).set_index("model")
    assert costs.loc["siamese", "wall_hours"] == 1 and costs.loc["siamese", "cpu_hours"] == 2
    assert costs.loc["c", "wall_hours"] == 1 and costs.loc["c", "cpu_hours"] == 1.5 and costs.loc["c", "jobs"] == 2
    missing = bm.pretraining_costs({"c": [tmp_path / "c_step1.tsv", tmp_path / "gone.tsv"]})
    assert missing.jobs.tolist() == [2] and np.isnan(missing.cpu_hours.iloc[0])
    (tmp_path / "bad.tsv").write_text("what\n")
    with pytest.raises(ValueError, match="not a Snakemake benchmark file"):
        bm.pretraining_costs({"x": [tmp_path / "bad.tsv"]})


def test_the_table_and_figure_through_the_cli(tmp_path, capsys):
    _summary().to_parquet(tmp_path / "summary.parquet")
    _bench(tmp_path / "siamese.tsv", 7200, 3600)
    common = ["--summary", str(tmp_path / "summary.parquet"), "--costs", str(tmp_path / "siamese.tsv"),
              "--cost-models", "siamese"]
    assert figures_main(["benchmark-table", *common, "--html", str(tmp_path / "b.html"),
                         "--csv", str(tmp_path / "b.csv")]) == 0
    table = pd.read_csv(tmp_path / "b.csv")
    assert table.model.tolist() == ["siamese", "scratch", "random"]
    assert table.loc[0, "pretraining CPU h"] == 1.0 and np.isnan(table.loc[1, "pretraining CPU h"])
    assert table.loc[0, "grade"] == "0.800 [0.700, 0.900] at 100%"
    assert figures_main(["benchmark", *common, "--png", str(tmp_path / "b.png"), "--pdf", str(tmp_path / "b.pdf")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000
    _summary().iloc[:0].to_parquet(tmp_path / "empty.parquet")
    assert figures_main(["benchmark-table", "--summary", str(tmp_path / "empty.parquet"), "--html",
                         str(tmp_path / "e.html"), "--csv", str(tmp_path / "e.csv")]) == 0
    assert "no downstream results" in (tmp_path / "e.html").read_text()
    with pytest.raises(SystemExit):
        figures_main(["benchmark", "--summary", str(tmp_path / "summary.parquet"), "--costs",
                      str(tmp_path / "siamese.tsv"), "--png", "x.png", "--pdf", "x.pdf"])
    assert "--cost-models" in capsys.readouterr().err
