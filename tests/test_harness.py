"""The pretraining harness knows no method: a second, deliberately small method (tests/toy_method.py), registered by
the test alone, is trained by the unchanged harness and the unchanged CLI, logs its own metrics, resumes exactly
after a run stopped part way, hands on its encoder, and brings its own pretext evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from ssl_data import store_files, write_ssl_data
from toy_method import Killed, ToyMethod

from stages import pretext_eval, pretrain
from stages.core.config import load_schema
from stages.training.config import PretrainConfig
from stages.training.harness import TIMING_COLUMNS
from stages.training.registry import METHODS
from stages.training.store import VolumeStore

SMALL = {"batch_size": 16, "threads": 1, "device": "cpu", "checkpoint_every": 2, "max_epochs": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ssl_data(tmp_path_factory.mktemp("ssl"))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> type[ToyMethod]:
    monkeypatch.setitem(METHODS, "toy", ToyMethod)
    return ToyMethod


def _outputs(root: Path) -> dict[str, Path]:
    # outputs in different folders: the stage writes exactly the files it is given
    return {"encoder": root / "model" / "encoder.pt", "checkpoint": root / "state" / "checkpoint.pt",
            "metrics": root / "tables" / "metrics.csv", "run-config": root / "run_config.yaml"}


def _pretrain(data: Path, out: Path, **config) -> dict[str, Path]:
    outputs = _outputs(out)
    argv = ["--method", "toy"]
    for option, path in {**store_files(data), **outputs}.items():
        argv += [f"--{option}", str(path)]
    for key, value in {**SMALL, **config}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert pretrain.main(argv) == 0
    return outputs


def test_the_toy_method_is_not_among_the_workflows_methods():
    assert "toy" not in METHODS
    assert "toy" not in load_schema()["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"]


def test_a_registered_method_is_trained_by_the_unchanged_cli_and_logs_its_own_columns(data, tmp_path, toy):
    assert "toy" in pretrain.build_parser()._option_string_actions["--method"].choices
    outputs = _pretrain(data, tmp_path)
    metrics = pd.read_csv(outputs["metrics"])
    assert list(metrics.columns) == ["epoch", "split", "step", "lr", "loss", "accuracy", "samples", *TIMING_COLUMNS]
    assert list(metrics.epoch) == [1, 1, 2, 2] and list(metrics.split) == ["train", "val"] * 2
    bodies = pd.read_parquet(store_files(data)["volumes"])
    val = metrics[metrics.split == "val"]
    assert (val.samples == int(((bodies.ssl_part == "val") & (bodies.kind == "vertebra")).sum())).all()
    assert metrics.accuracy.between(0, 1).all() and (metrics.loss > 0).all()
    encoder = torch.load(outputs["encoder"], weights_only=False)
    assert encoder["method"] == "toy" and encoder["spec"] == {"slices": 5, "channels": 4, "dim": 8}
    built = toy(PretrainConfig.from_config(SMALL), VolumeStore(**store_files(data)))
    assert set(encoder["state_dict"]) == set(built.model.encoder.state_dict())
    assert outputs["checkpoint"].is_file() and outputs["run-config"].is_file()
    assert not (outputs["checkpoint"].parent / "resume").exists()


def test_a_run_stopped_part_way_resumes_and_ends_exactly_as_an_uninterrupted_run(data, tmp_path, toy, monkeypatch):
    whole = _pretrain(data, tmp_path / "whole")
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(toy, "stop_after", 5)
    with pytest.raises(Killed):
        _pretrain(data, stopped)
    resume = _outputs(stopped)["checkpoint"].parent / "resume" / "last.pt"
    assert torch.load(resume, weights_only=False)["state"]["step"] == 4     # checkpoint_every 2
    assert not _outputs(stopped)["encoder"].exists()
    monkeypatch.setattr(toy, "stop_after", None)
    again = _pretrain(data, stopped)
    assert not resume.exists()
    a, b = pd.read_csv(whole["metrics"]), pd.read_csv(again["metrics"])
    numbers = [c for c in a.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    wa = torch.load(whole["encoder"], weights_only=False)["state_dict"]
    wb = torch.load(again["encoder"], weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pretext_evaluation_is_the_methods_own(data, tmp_path, toy):
    outputs = _pretrain(data, tmp_path / "run", max_epochs=1)
    out = tmp_path / "pretext"
    argv = ["--checkpoint", str(outputs["checkpoint"]), "--evaluation", str(out / "evaluation.json"),
            "--scores", str(out / "scores.parquet"), "--scores-csv", str(out / "scores.csv"), "--threads", "1"]
    for option, path in store_files(data).items():
        argv += [f"--{option}", str(path)]
    assert pretext_eval.main(argv) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["method"] == "toy" and set(summary) >= {"trained", "untrained", "test_bodies"}
    table = pd.read_parquet(out / "scores.parquet")
    assert list(table.columns) == ["row", "level", "trained_level", "untrained_level"]
    assert len(table) == summary["test_bodies"] > 0
    volumes = pd.read_parquet(store_files(data)["volumes"]).set_index("row")
    assert (volumes.loc[table.row, "ssl_part"] == "test").all()


def test_the_schema_offers_exactly_the_registered_methods():
    """pretrain.methods is checked at start-up against the schema's enum: it names every registered method and
    nothing else, so a method added to the registry is also added there (and a typo fails before any job runs)."""
    enum = load_schema()["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"]
    assert sorted(enum) == sorted(METHODS)
