"""The label-efficiency figure of merit: the paired bootstrap of the difference from scratch on every label against a
loop written from its definition (scored with scikit-learn), its verdicts, the rule as README.md states it, and the
stage's files."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from stages import probe_summary
from stages.core.config import load_schema
from stages.evaluation.probe_data import TASKS, run_folder
from stages.probe_summary import (
    BELOW,
    INCONCLUSIVE,
    MATCHES,
    UNDEFINED,
    efficiency_differences,
    label_efficiency,
    paired_difference,
    summarise,
    task_metrics,
    verdict,
)

README = (ROOT / "README.md").read_text(encoding="utf-8")


# --- Synthetic test predictions -------------------------------------------------------------------------------------

def make_test_part(task: str, subjects: int, seed: int = 0) -> pd.DataFrame:
    """A test part: 1 to 5 samples per subject, their labels (grade: one class rare, so that some bootstrap draws lack
    it; herniation: few positives, so that some draws have one class and no AUC)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        for k in range(int(rng.integers(1, 6))):
            rows.append({"subject_id": f"sub-{s:03d}", "scan_id": f"scan-{s:03d}", "level": f"L{k + 1}"})
    frame = pd.DataFrame(rows)
    if task == "grade":
        frame["label"] = rng.choice([1, 2, 3, 4, 5], size=len(frame), p=[0.3, 0.3, 0.25, 0.1, 0.05])
    elif task == "herniation":
        frame["label"] = (rng.random(len(frame)) < 0.15).astype(int)
    else:
        frame["label"] = rng.integers(0, 6, size=len(frame))
    return frame


def predict(samples: pd.DataFrame, task: str, accuracy: float, rng: np.random.Generator) -> pd.DataFrame:
    """Predictions right with probability ``accuracy`` (else another class); herniation scores rounded to one decimal,
    so that tied scores occur."""
    truth = samples.label.to_numpy()
    right = rng.random(len(truth)) < accuracy
    classes = {"grade": [1, 2, 3, 4, 5], "herniation": [0, 1], "level": list(range(6))}[task]
    wrong = np.array([rng.choice([c for c in classes if c != t]) for t in truth])
    out = samples.assign(predicted=np.where(right, truth, wrong))
    if task == "herniation":
        out["p_1"] = np.round(np.clip(0.5 * out.predicted + 0.25 + 0.25 * rng.normal(size=len(out)), 0, 1), 1)
        out["p_0"] = 1 - out["p_1"]
    return out


# --- The paired bootstrap against its definition ---------------------------------------------------------------------

def naive_paired_difference(task: str, model: list[pd.DataFrame], reference: list[pd.DataFrame], n_boot: int,
                            level: float, seed: int) -> dict[str, float]:
    """The definition as a loop: replicate r draws the test subjects (sorted by id) with
    ``rng.integers(n, size=n)``, gathers every sample of each drawn subject from each job, scores each job with
    scikit-learn, averages each model's seeds and takes the difference; replicates where a metric is undefined are
    left out; the interval is the percentiles of the rest."""
    headline = TASKS[task].headline

    def score(job: dict[str, list]) -> float:
        if headline == "auc":
            return roc_auc_score(job["label"], job["p_1"]) if len(set(job["label"])) == 2 else np.nan
        if headline == "average_class_accuracy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # "y_pred contains classes not in y_true": as we want
                return balanced_accuracy_score(job["label"], job["predicted"])
        return accuracy_score(job["label"], job["predicted"])

    def seeds_mean(jobs: list[dict[str, list]]) -> float:
        values = [v for v in (score(job) for job in jobs) if not np.isnan(v)]
        return sum(values) / len(values) if values else np.nan

    columns = ["label", "predicted"] + (["p_1"] if headline == "auc" else [])
    by_subject = [{s: {c: f.loc[f.subject_id == s, c].tolist() for c in columns} for s in set(f.subject_id)}
                  for f in model + reference]

    def resample(drawn: list[str]) -> list[dict[str, list]]:
        return [{c: [v for s in drawn for v in job[s][c]] for c in columns} for job in by_subject]

    subjects = sorted(set(model[0].subject_id))
    rng = np.random.default_rng(seed)
    kept = []
    for _ in range(n_boot):
        jobs = resample([subjects[k] for k in rng.integers(len(subjects), size=len(subjects))])
        d = seeds_mean(jobs[:len(model)]) - seeds_mean(jobs[len(model):])
        if not np.isnan(d):
            kept.append(d)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(kept, [tail, 100 - tail])
    everyone = resample(subjects)
    return {"difference": seeds_mean(everyone[:len(model)]) - seeds_mean(everyone[len(model):]), "ci_low": low,
            "ci_high": high, "replicates": len(kept)}


@pytest.mark.parametrize("task", ["grade", "herniation", "level"])
def test_paired_bootstrap_equals_the_definition_written_as_a_loop(task):
    rng = np.random.default_rng(11)
    samples = make_test_part(task, subjects=14, seed=3)
    model = [predict(samples, task, 0.7, rng) for _ in range(3)]
    reference = [predict(samples, task, 0.75, rng).sample(frac=1.0, random_state=s)   # another row order
                 for s in range(2)]
    ours = paired_difference(task, model, reference, n_boot=150, level=0.9, seed=5)
    theirs = naive_paired_difference(task, model, reference, n_boot=150, level=0.9, seed=5)
    assert ours["replicates"] == theirs["replicates"]
    if task == "herniation":
        assert theirs["replicates"] < 150        # some draws had no positive: left out, as the definition says
    for key in ("difference", "ci_low", "ci_high"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    assert ours["ci_low"] <= ours["difference"] <= ours["ci_high"]


@pytest.mark.parametrize("task", ["grade", "herniation", "level"])
def test_two_models_with_identical_predictions_differ_by_zero_with_a_zero_width_interval(task):
    rng = np.random.default_rng(2)
    samples = make_test_part(task, subjects=12)
    seeds = [predict(samples, task, 0.6, rng) for _ in range(3)]
    paired = paired_difference(task, seeds, [s.copy() for s in seeds], n_boot=200, level=0.95)
    assert paired["difference"] == 0.0 and paired["ci_low"] == 0.0 and paired["ci_high"] == 0.0


def test_models_scored_on_different_test_samples_are_refused():
    rng = np.random.default_rng(0)
    samples = make_test_part("grade", subjects=10)
    model = predict(samples, "grade", 0.7, rng)
    with pytest.raises(ValueError, match="not scored on the same test samples"):
        paired_difference("grade", [model], [model.iloc[1:]], 10, 0.95)
    other = model.assign(subject_id=model.subject_id.replace("sub-000", "sub-999"))
    with pytest.raises(ValueError, match=r"same test samples.*sub-"):
        paired_difference("grade", [model], [other], 10, 0.95)


def test_the_interval_narrows_with_more_test_subjects():
    rng = np.random.default_rng(4)
    widths = []
    for subjects in (10, 120):
        samples = make_test_part("level", subjects)
        paired = paired_difference("level", [predict(samples, "level", 0.7, rng)],
                                   [predict(samples, "level", 0.7, rng)], 300, 0.95)
        widths.append(paired["ci_high"] - paired["ci_low"])
    assert widths[1] < widths[0]


# --- Verdicts and the rule README.md states -------------------------------------------------------------------------

def test_readme_states_the_rule_the_code_applies_with_the_schema_default_margin():
    section = README.split("## Probes: how many labels does pretraining save?")[1].split("\n## ")[0]
    flat = " ".join(section.split())
    assert probe_summary.MATCH_RULE in flat
    default = load_schema()["properties"]["probes"]["properties"]["match_margin"]["default"]
    assert f"`probes.match_margin`, default {default:g}" in flat
    for words in (f'"{BELOW}"', f'"{INCONCLUSIVE}"', "label_efficiency_differences"):
        assert words in flat, words
    margin = default
    assert verdict(0.0, -margin, 1.0, margin) == INCONCLUSIVE            # "above": the margin itself is not enough
    assert verdict(0.0, -margin + 1e-9, 1.0, margin) == MATCHES
    assert verdict(-0.02, -margin + 0.01, -0.001, margin) == MATCHES     # within the margin, though below 0
    assert verdict(-0.3, -0.4, -0.2, margin) == BELOW
    assert verdict(-0.02, -0.2, 0.1, margin) == INCONCLUSIVE
    assert verdict(0.1, np.nan, np.nan, margin) == INCONCLUSIVE           # no interval (probes.bootstrap 0)
    assert verdict(np.nan, np.nan, np.nan, margin) == UNDEFINED
    with pytest.raises(ValueError, match="match_margin must be >= 0"):
        verdict(0.0, 0.0, 0.0, -0.1)


def test_config_yaml_documents_the_margin_at_its_default():
    text = (ROOT / "config.yaml").read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("match_margin:"))
    default = load_schema()["properties"]["probes"]["properties"]["match_margin"]["default"]
    assert float(re.match(r"\s*match_margin:\s*([0-9.]+)", line).group(1)) == default and "#" in line


# --- The figure of merit from probe jobs ----------------------------------------------------------------------------

N_SUBJECTS = {0.25: 10, 0.5: 20, 1.0: 40}


def jobs(samples: pd.DataFrame, task: str, plan: dict[tuple[str, str, float], list[pd.DataFrame]]
         ) -> tuple[pd.DataFrame, dict[tuple, pd.DataFrame]]:
    """The results table and predictions as stages.probe_summary.load_runs returns them, from each (model, head,
    fraction)'s seeds' predictions."""
    rows, predictions = [], {}
    for (model, head, fraction), seeds in plan.items():
        for seed, p in enumerate(seeds):
            metrics = task_metrics(task, p.label.to_numpy(), p.predicted.to_numpy(),
                                   p["p_1"].to_numpy() if "p_1" in p else None)
            rows.append({"model": model, "head": head, "task": task, "fraction": fraction, "seed": seed,
                         "n_subjects": N_SUBJECTS[fraction], "n_scans": 1.5 * N_SUBJECTS[fraction], "n_train": 99,
                         "n_test": len(samples), **{m: metrics.get(m, np.nan) for m in probe_summary.METRICS[task]}})
            predictions[(model, head, task, fraction, seed)] = p.assign(head=head)
    return pd.DataFrame(rows), predictions


def improved(p: pd.DataFrame, share: float, rng: np.random.Generator) -> pd.DataFrame:
    """``p`` with a share of its wrong predictions made right: never worse on any resample."""
    fix = (p.predicted != p.label) & (rng.random(len(p)) < share)
    return p.assign(predicted=np.where(fix, p.label, p.predicted))


def test_a_clearly_non_inferior_model_matches_and_a_clearly_worse_one_is_below(tmp_path):
    rng = np.random.default_rng(8)
    samples = make_test_part("grade", subjects=60, seed=1)
    scratch = [predict(samples, "grade", 0.8, rng) for _ in range(3)]
    plan = {("scratch", "network", 0.5): [predict(samples, "grade", 0.5, rng) for _ in range(3)],
            ("scratch", "network", 1.0): scratch,
            # the scratch predictions, a few more right, from a quarter of the labels: matches there
            ("ssl", "linear", 0.25): [improved(p, 0.2, rng) for p in scratch],
            ("ssl", "linear", 1.0): [improved(p, 0.5, rng) for p in scratch],
            # far worse at every fraction: below scratch at all labels, the figure of merit not reached
            ("random", "mlp", 0.25): [predict(samples, "grade", 0.2, rng) for _ in range(3)],
            ("random", "mlp", 1.0): [predict(samples, "grade", 0.3, rng) for _ in range(3)]}
    results, predictions = jobs(samples, "grade", plan)
    summary = summarise(results, predictions, 0, 0.95)
    differences = efficiency_differences(summary, predictions, 400, 0.95, 0.05)
    assert set(zip(differences.model, differences["head"])) == {("ssl", "linear"), ("random", "mlp")}
    assert (differences.reference == "scratch (network) at fraction 1").all()
    ssl = differences[differences.model == "ssl"].set_index("fraction")
    assert (ssl.ci_low >= 0).all() and (ssl.verdict == MATCHES).all()
    np.testing.assert_allclose(ssl.difference, ssl.value - ssl.reference_value, atol=1e-12)
    worse = differences[differences.model == "random"]
    assert (worse.ci_high < 0).all() and (worse.verdict == BELOW).all()

    efficiency = label_efficiency(differences).set_index("model")
    assert efficiency.loc["ssl", "matched_at_fraction"] == 0.25
    assert efficiency.loc["ssl", "matched_scans"] == 15 and efficiency.loc["ssl", "scan_share"] == 0.25
    assert efficiency.loc["ssl", "verdict"].startswith("matches with 15 of 60 scans")
    assert efficiency.loc["ssl", "fraction_verdict"] == MATCHES
    assert np.isnan(efficiency.loc["random", "matched_at_fraction"])
    assert efficiency.loc["random", "verdict"] == f"not reached with any subset (at fraction 1: {BELOW})"
    assert efficiency.loc["random", "compared_at_fraction"] == 1.0
    assert efficiency.loc["random", "ci_high"] < 0


def test_label_efficiency_refuses_the_summary_and_is_empty_without_scratch_on_every_label():
    rng = np.random.default_rng(0)
    samples = make_test_part("level", subjects=8)
    results, predictions = jobs(samples, "level", {("scratch", "network", 0.5): [predict(samples, "level", 0.5, rng)],
                                                   ("ssl", "linear", 0.5): [predict(samples, "level", 0.5, rng)]})
    summary = summarise(results, predictions, 0, 0.95)
    with pytest.raises(ValueError, match="efficiency_differences"):
        label_efficiency(summary)
    differences = efficiency_differences(summary, predictions, 10, 0.95, 0.05)
    assert differences.empty and label_efficiency(differences).empty


def test_the_stage_writes_the_differences_and_a_strict_json_figure_of_merit(tmp_path):
    rng = np.random.default_rng(3)
    samples = make_test_part("herniation", subjects=30, seed=2)
    scratch = [predict(samples, "herniation", 0.8, rng) for _ in range(2)]
    plan = {("scratch", "network", 0.5): [predict(samples, "herniation", 0.6, rng) for _ in range(2)],
            ("scratch", "network", 1.0): scratch, ("ssl", "linear", 0.5): scratch, ("ssl", "linear", 1.0): scratch,
            ("random", "linear", 0.5): [predict(samples, "herniation", 0.2, rng) for _ in range(2)],
            ("random", "linear", 1.0): [predict(samples, "herniation", 0.2, rng) for _ in range(2)]}
    runs = tmp_path / "runs"
    for (model, head, fraction), seeds in plan.items():
        for seed, p in enumerate(seeds):
            folder = runs / run_folder(model, "herniation", fraction, seed)
            folder.mkdir(parents=True)
            m = task_metrics("herniation", p.label.to_numpy(), p.predicted.to_numpy(), p.p_1.to_numpy())
            folder.joinpath("metrics.json").write_text(json.dumps(
                {"n_subjects": N_SUBJECTS[fraction], "n_scans": 2 * N_SUBJECTS[fraction], "n_train": 9,
                 "n_test": len(p), "heads": {head: m}}))
            p.assign(head=head).to_parquet(folder / "predictions.parquet")
    subjects = tmp_path / "subjects.parquet"
    pd.DataFrame({"subject_id": [f"t{i}" for i in range(8)], "downstream_part": "train"}).to_parquet(subjects)
    out = tmp_path / "out"
    argv = ["--metrics", *map(str, sorted(runs.rglob("metrics.json"))),
            "--predictions", *map(str, sorted(runs.rglob("predictions.parquet"))), "--subjects", str(subjects),
            "--results", str(out / "results.parquet"), "--summary", str(out / "summary.parquet"),
            "--efficiency", str(out / "label_efficiency.csv"),
            "--efficiency-differences", str(out / "label_efficiency_differences.parquet"),
            "--subsets", str(out / "subsets.parquet"), "--all-predictions", str(out / "predictions.parquet"),
            "--models", "ssl", "random", "scratch", "--tasks", "herniation", "--label-fractions", "0.5", "1.0",
            "--seeds", "2", "--bootstrap", "100", "--match-margin", "0.05"]
    assert probe_summary.main(argv) == 0
    differences = pd.read_csv(out / "label_efficiency_differences.csv")
    pd.testing.assert_frame_equal(differences, pd.read_parquet(out / "label_efficiency_differences.parquet"),
                                  check_dtype=False)
    assert differences.columns.tolist() == probe_summary.DIFFERENCE_COLUMNS
    assert differences.model.tolist() == ["ssl", "ssl", "random", "random"]
    assert differences.fraction.tolist() == [0.5, 1.0, 0.5, 1.0] and (differences.margin == 0.05).all()
    assert differences.verdict.tolist() == [MATCHES, MATCHES, BELOW, BELOW]
    text = (out / "label_efficiency.json").read_text()
    records = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert [(r["model"], r["matched_at_fraction"]) for r in records] == [("ssl", 0.5), ("random", None)]
    efficiency = pd.read_csv(out / "label_efficiency.csv")
    assert efficiency.verdict.tolist() == [r["verdict"] for r in records]
    assert efficiency.columns.tolist() == probe_summary.EFFICIENCY_COLUMNS


def test_the_reports_table_shows_the_interval_and_the_verdict(tmp_path):
    from stages import figures
    rows = {"task": "grade", "metric": "average_class_accuracy", "head": "linear", "reference_value": 0.8,
            "reference_scans": 60.0, "ci_level": 0.95, "margin": 0.05}
    efficiency = pd.DataFrame([
        {**rows, "model": "ssl", "matched_at_fraction": 0.25, "matched_scans": 15.0, "scan_share": 0.25,
         "value_there": 0.81, "compared_at_fraction": 0.25, "difference": 0.01, "ci_low": -0.02, "ci_high": 0.04,
         "fraction_verdict": MATCHES},
        {**rows, "model": "random", "matched_at_fraction": None, "matched_scans": None, "scan_share": None,
         "value_there": None, "compared_at_fraction": 1.0, "difference": -0.3, "ci_low": -0.4, "ci_high": -0.2,
         "fraction_verdict": BELOW}])
    html, csv = tmp_path / "merit.html", tmp_path / "merit.csv"
    figures.figure_of_merit_table(efficiency, figures.TableFiles(html, csv))
    table = pd.read_csv(csv, keep_default_na=False, dtype=str)
    assert table["difference from scratch [95% interval]"].tolist() == ["+0.010 [-0.020, +0.040]",
                                                                        "-0.300 [-0.400, -0.200]"]
    assert table["verdict there"].tolist() == [MATCHES, BELOW]
    assert table["compared at subset"].tolist() == ["0.25", "1"]
    assert table["first subset matching it"].tolist() == ["0.25", "not reached"]
    assert "above -0.05 (probes.match_margin" in html.read_text()
