"""The pretraining harness: it reads only what the splits allow, reproduces, resumes after SIGKILL exactly, and DDP
over 2 gloo processes equals one process on the same global batch; pretraining on discs (``pretrain.structure``)
reads disc volumes only, sizes FC8 by the disc levels and records the structure."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT
from kill_run import kill_at_step
from ssl_data import DISC_SHAPE, store_files, write_ssl_data

from stages import pretext_eval, pretrain
from stages.core.errors import LeakageError
from stages.core.levels import DISCS
from stages.nets.encoders import load_encoder
from stages.nets.siamese import EncoderSpec, SiameseNet
from stages.pretext_eval import run as pretext_run
from stages.training.config import PretrainConfig
from stages.training.harness import (
    TIMING_COLUMNS,
    Outputs,
    World,
    batches_of_epoch,
    metric_columns,
    resumable,
    run_identity,
    train,
)
from stages.training.methods.siamese import SiameseMethod
from stages.training.store import VolumeStore

SMALL = {"width": 0.125, "embedding_dim": 32, "batch_size": 16, "threads": 1, "device": "cpu",
         "checkpoint_every": 2}
METRIC_COLUMNS = ["epoch", "split", "step", "lr", "loss", "contrastive", "level_loss", "level_accuracy",
                  "positive_distance", "negative_distance", "samples", "seconds", "samples_per_s", "data_wait_share"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ssl_data(tmp_path_factory.mktemp("ssl"))


def _stage(data: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.pretrain", "--method", "siamese"]
    for option, path in {**store_files(data), **dataclasses.asdict(Outputs.under(out))}.items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def _store(data: Path, **kwargs) -> VolumeStore:
    return VolumeStore(**store_files(data), **kwargs)


def _train(cfg: PretrainConfig, data: Path, out: Path, **kwargs) -> pd.DataFrame:
    return train(SiameseMethod, cfg, _store(data), Outputs.under(out), **kwargs)


def _pretext(run: Path, data: Path, out: Path) -> dict:
    return pretext_run(run / "checkpoint.pt", **store_files(data), evaluation=out / "evaluation.json",
                       scores=out / "distances.parquet", scores_csv=out / "distances.csv")


def _encoder(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "encoder.pt", weights_only=False)["state_dict"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_only_self_supervision_train_and_val_volumes_are_readable(data):
    store = _store(data)
    subjects = pd.read_parquet(data / "splits" / "subjects.parquet").set_index("subject_id")
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet").set_index("row")
    read = np.concatenate([np.r_[p.a.to_numpy(), p.b.to_numpy()] for p in store.pairs.values()])
    who = subjects.loc[volumes.loc[read, "subject_id"]]
    assert set(who.ssl_part) <= {"train", "val"}
    assert not who.downstream_part.isin(["val", "test"]).any()
    forbidden = volumes.index[volumes.subject_id.map(subjects.downstream_part).eq("test")].to_numpy()
    assert len(forbidden) and not store.allowed[forbidden].any()
    with pytest.raises(LeakageError, match="refusing to read"):
        store.load(forbidden[:2])
    ssl_test = volumes.index[volumes.ssl_part.eq("test")].to_numpy()
    with pytest.raises(LeakageError):
        store.load(ssl_test[:1])


def test_a_pair_reaching_a_downstream_test_subject_stops_the_run(data, tmp_path):
    forged = tmp_path / "forged"
    shutil.copytree(data, forged)
    volumes = pd.read_parquet(forged / "splits" / "volumes.parquet")
    pairs = pd.read_parquet(forged / "splits" / "pairs.parquet")
    test_row = int(volumes[volumes.downstream_part == "test"].row.iloc[0])
    pairs.loc[pairs.index[pairs.part == "train"][0], "b"] = test_row
    pairs.to_parquet(forged / "splits" / "pairs.parquet", index=False)
    with pytest.raises(LeakageError, match="must not read"):
        _store(forged)
    result = subprocess.run(_stage(forged, tmp_path / "out", "--max-steps", "1"), check=False, capture_output=True,
                            text=True, env=_env(), cwd=ROOT)
    assert result.returncode != 0 and "LeakageError" in result.stderr
    assert not (tmp_path / "out" / "encoder.pt").exists()


def test_same_seed_same_weights_other_seed_other_weights(data, tmp_path):
    runs = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        cfg = PretrainConfig.from_config({**SMALL, "seed": seed})
        _train(cfg, data, tmp_path / name, max_steps=3)
        runs[name] = _encoder(tmp_path / name)
    assert all(torch.equal(runs["first"][k], runs["again"][k]) for k in runs["first"])
    assert not all(torch.equal(runs["first"][k], runs["other"][k]) for k in runs["first"])
    metrics = pd.read_csv(tmp_path / "first" / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS == metric_columns(SiameseMethod)
    assert set(metrics.split) == {"train", "val"}
    assert not (tmp_path / "first" / "resume").exists(), "the rolling checkpoint is removed once a run completes"
    for name in ("encoder.pt", "checkpoint.pt", "metrics.csv", "run_config.yaml"):
        assert (tmp_path / "first" / name).is_file()


def test_a_run_killed_with_sigkill_resumes_and_ends_exactly_as_an_uninterrupted_run(data, tmp_path):
    extra = ("--max-epochs", "2")
    whole = subprocess.run(_stage(data, tmp_path / "whole", *extra), check=False, capture_output=True, text=True,
                           env=_env(), cwd=ROOT)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    kill_at_step(_stage(data, out, *extra), out / "resume" / "last.pt", 4, cwd=ROOT, env=_env())
    assert not (out / "encoder.pt").exists()
    again = subprocess.run(_stage(data, out, *extra), check=False, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    a, b = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    numbers = [c for c in METRIC_COLUMNS if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    assert len(a) == 4   # 2 epochs x (train, val)
    wa, wb = _encoder(tmp_path / "whole"), _encoder(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_with_two_gloo_processes_equals_one_process(data, tmp_path):
    extra = ("--max-steps", "2", "--dropout", "0", "--batch-size", "32")
    single = subprocess.run(_stage(data, tmp_path / "one", *extra), check=False, capture_output=True, text=True,
                            env=_env(), cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *_stage(data, tmp_path / "two", *extra)[1:]], check=False, capture_output=True,
                         text=True, env=_env(), cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_config = (tmp_path / "two" / "run_config.yaml").read_text()
    assert "processes: 2" in run_config
    one, two = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    for column in ("loss", "contrastive", "level_loss", "positive_distance", "negative_distance"):
        assert np.allclose(one[column], two[column], rtol=1e-4), column
    # the weight change after two SGD steps is a function of the gradients: it must agree
    torch.manual_seed(0)
    spec = torch.load(tmp_path / "one" / "encoder.pt", weights_only=False)["spec"]
    start = SiameseNet(EncoderSpec(**spec)).encoder.state_dict()
    w1, w2 = _encoder(tmp_path / "one"), _encoder(tmp_path / "two")
    for key in w1:
        d1, d2 = w1[key] - start[key], w2[key] - start[key]
        assert d1.abs().max() > 0, key
        assert torch.allclose(d1, d2, rtol=1e-3, atol=1e-6), key


def test_global_batches_divide_among_processes_and_depend_only_on_seed_and_epoch():
    one = batches_of_epoch(100, 32, World(), seed=0, epoch=3)
    assert [len(b) for b in one] == [32, 32, 32]
    assert all(np.array_equal(x, y) for x, y in zip(one, batches_of_epoch(100, 32, World(), seed=0, epoch=3)))
    assert not np.array_equal(one[0], batches_of_epoch(100, 32, World(), seed=0, epoch=4)[0])
    assert [len(b) for b in batches_of_epoch(7, 32, World(size=2), seed=0, epoch=0)] == [6]


def test_pretext_evaluation_reads_only_the_test_part_and_writes_every_pair(data, tmp_path):
    cfg = PretrainConfig.from_config(SMALL)
    _train(cfg, data, tmp_path / "run", max_steps=2)
    summary = _pretext(tmp_path / "run", data, tmp_path / "eval")
    pairs = pd.read_parquet(data / "splits" / "pairs.parquet")
    distances = pd.read_parquet(tmp_path / "eval" / "distances.parquet")
    assert len(distances) == int((pairs.part == "test").sum()) > 0
    assert (distances.distance >= 0).all() and (distances.untrained_distance >= 0).all()
    for figures in (summary["trained"], summary["untrained"]):
        assert 0 <= figures["auc"] <= 1 and 0 <= figures["level_accuracy"] <= 1
    volumes = pd.read_parquet(data / "splits" / "volumes.parquet")
    assert summary["test_bodies"] == int(((volumes.ssl_part == "test") & (volumes.kind == "vertebra")).sum())


def test_a_short_training_clearly_beats_an_untrained_network_on_both_pretext_figures(tmp_path):
    # Subject texture under a coarse per-volume nuisance field: an untrained network's distances follow the
    # nuisance; 240 steps of the Siamese loss learn to see past it and to tell the levels apart.
    data = write_ssl_data(tmp_path / "data", n_subjects=80, nuisance=0.5)
    no_augmentation = {"rotation_deg": 0, "shift_fraction": [0, 0], "shift_slices": 0, "scale_range": [1, 1],
                       "intensity": 0, "flip": False}
    cfg = PretrainConfig.from_config({**SMALL, "dropout": 0.0, **no_augmentation})
    _train(cfg, data, tmp_path / "run", max_steps=240)
    summary = _pretext(tmp_path / "run", data, tmp_path / "eval")
    trained, untrained = summary["trained"], summary["untrained"]
    assert trained["auc"] >= untrained["auc"] + 0.1, (trained["auc"], untrained["auc"])
    assert trained["level_accuracy"] >= untrained["level_accuracy"] + 0.3, (trained, untrained)


def test_a_checkpoint_resumes_across_runtime_settings_but_not_across_the_maths():
    data = {"shape": [5, 48, 48], "train": 100, "val": 10}
    saved = run_identity("siamese", PretrainConfig.from_config(SMALL), 1, data)
    runtime = PretrainConfig.from_config({**SMALL, "threads": 8, "prefetch": 2, "checkpoint_every": 7})
    assert resumable(saved, run_identity("siamese", runtime, 1, data))
    for key, value in (("learning_rate", 0.5), ("seed", 9), ("width", 0.25), ("flip", False), ("structure", "disc")):
        changed = PretrainConfig.from_config({**SMALL, key: value})
        assert not resumable(saved, run_identity("siamese", changed, 1, data)), key
    assert not resumable(saved, run_identity("siamese", PretrainConfig.from_config(SMALL), 2, data))
    assert not resumable(saved, run_identity("siamese", PretrainConfig.from_config(SMALL), 1, {**data, "train": 99}))


def test_the_prefetcher_reads_ahead_in_order_passes_errors_on_and_stops_when_left_early():
    from stages.training.store import Prefetcher
    assert list(Prefetcher(lambda i: i * i, list(range(10)), depth=2)) == [i * i for i in range(10)]

    def broken(i: int) -> int:
        if i == 3:
            raise OSError("unreadable batch")
        return i
    with pytest.raises(OSError, match="unreadable"):
        list(Prefetcher(broken, list(range(10)), depth=2))
    early = Prefetcher(lambda i: i, list(range(1000)), depth=2)
    for i in early:
        if i == 2:
            break
    early.close()
    assert not early._thread.is_alive()


def test_ddp_evaluation_with_fewer_validation_pairs_than_processes_does_not_hang(data, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(data, small)
    pairs = pd.read_parquet(small / "splits" / "pairs.parquet")
    pairs = pd.concat([pairs[pairs.part != "val"], pairs[pairs.part == "val"].head(1)])
    pairs.to_parquet(small / "splits" / "pairs.parquet", index=False)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *_stage(small, tmp_path / "out", "--max-steps", "1")[1:]], check=False,
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert int(metrics[metrics.split == "val"].samples.iloc[0]) == 1


@pytest.fixture(scope="module")
def disc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ssl_data(tmp_path_factory.mktemp("ssl_discs"), structure="disc")


def _cli(data: Path, out: Path, structure: str, *extra: str) -> list[str]:
    """stages.pretrain's arguments (in process) for a short siamese run on ``structure``."""
    argv = ["--method", "siamese", "--structure", structure]
    for option, path in {**store_files(data, structure), **dataclasses.asdict(Outputs.under(out))}.items():
        argv += [f"--{option.replace('_', '-')}", str(path)]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + list(extra)


def test_pretraining_on_discs_sizes_fc8_by_the_disc_levels_and_records_the_structure(disc_data, tmp_path):
    out = tmp_path / "run"
    assert pretrain.main(_cli(disc_data, out, "disc", "--max-steps", "3")) == 0
    encoder, saved = load_encoder(out / "encoder.pt")
    assert saved["structure"] == "disc" and saved["spec"]["n_levels"] == len(DISCS) == 6
    assert (encoder.spec.slices, encoder.spec.height, encoder.spec.width_px) == DISC_SHAPE
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["identity"]["config"]["structure"] == "disc"
    net = SiameseNet(EncoderSpec(**ckpt["encoder_spec"]))
    net.load_state_dict(ckpt["model"])
    assert net.fc8.out_features == 6 and tuple(ckpt["model"]["fc8.weight"].shape) == (6, SMALL["embedding_dim"])
    assert yaml.safe_load((out / "run_config.yaml").read_text())["pretrain"]["structure"] == "disc"
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics.level_accuracy.between(0, 1).all() and np.isfinite(metrics.loss).all()

    # the pretext evaluation reads the disc test pairs, scores the disc levels and names no paper figures
    evaluation = tmp_path / "pretext"
    argv = ["--checkpoint", str(out / "checkpoint.pt"), "--structure", "disc", "--evaluation",
            str(evaluation / "evaluation.json"), "--scores", str(evaluation / "distances.parquet"), "--scores-csv",
            str(evaluation / "distances.csv"), "--threads", "1"]
    for option, path in store_files(disc_data, "disc").items():
        argv += [f"--{option}", str(path)]
    assert pretext_eval.main(argv) == 0
    summary = json.loads((evaluation / "evaluation.json").read_text())
    volumes = pd.read_parquet(disc_data / "splits" / "volumes.parquet")
    pairs = pd.read_parquet(disc_data / "splits" / "pairs.parquet")
    assert summary["structure"] == "disc" and summary["paper"] is None and "test_bodies" not in summary
    assert summary["test_volumes"] == int(((volumes.kind == "disc") & (volumes.ssl_part == "test")).sum()) > 0
    assert set(summary["trained"]["level_accuracy_per_level"]) <= set(DISCS)
    assert len(pd.read_parquet(evaluation / "distances.parquet")) == int((pairs.part == "test").sum())
    with pytest.raises(ValueError, match="pretrained on disc volumes"):
        pretext_run(out / "checkpoint.pt", **store_files(disc_data, "disc"), evaluation=evaluation / "x.json",
                    scores=evaluation / "x.parquet", scores_csv=evaluation / "x.csv", structure="vertebra")


def test_the_disc_store_reads_only_allowed_disc_rows_and_refuses_rows_of_the_wrong_kind(disc_data, tmp_path):
    files = store_files(disc_data, "disc")
    store = VolumeStore(**files, structure="disc")
    volumes = pd.read_parquet(files["volumes"])
    discs = volumes[volumes.kind == "disc"].set_index("row")
    assert store.levels == DISCS and store.shape == DISC_SHAPE and len(store.table) == len(discs)
    assert (store.level[discs.index] == discs.level.map(DISCS.index)).all()
    readable = discs.ssl_part.isin(["train", "val"]) & ~discs.downstream_part.isin(["val", "test"])
    assert np.array_equal(np.flatnonzero(store.allowed), np.sort(discs.index[readable].to_numpy()))
    with pytest.raises(LeakageError, match="refusing to read"):
        store.load(discs.index[discs.downstream_part.eq("test")].to_numpy()[:2])

    # a disc the pairs reach but volumes.parquet lists only as a vertebral body (same row number, other array)
    forged = tmp_path / "unlisted"
    shutil.copytree(disc_data, forged)
    row = int(store.pairs["train"].a.iloc[0])
    assert ((volumes.kind == "vertebra") & (volumes.row == row)).any()
    volumes[~((volumes.kind == "disc") & (volumes.row == row))].to_parquet(
        forged / "splits" / "volumes.parquet", index=False)
    with pytest.raises(LeakageError, match="does not list as disc volumes"):
        VolumeStore(**store_files(forged, "disc"), structure="disc")

    # a disc pair reaching a downstream test subject's disc
    forged = tmp_path / "leak"
    shutil.copytree(disc_data, forged)
    pairs = pd.read_parquet(forged / "splits" / "pairs.parquet")
    test_row = int(discs.index[discs.downstream_part.eq("test")][0])
    pairs.loc[pairs.index[pairs.part == "train"][0], "b"] = test_row
    pairs.to_parquet(forged / "splits" / "pairs.parquet", index=False)
    with pytest.raises(LeakageError, match="must not read"):
        VolumeStore(**store_files(forged, "disc"), structure="disc")

    # disc pairs over the vertebral array, or a structure that does not exist
    with pytest.raises(ValueError, match="not vertebra levels"):
        VolumeStore(**store_files(disc_data, "vertebra"), structure="vertebra")
    with pytest.raises(ValueError, match="structure must be one of"):
        VolumeStore(**files, structure="facet")


def test_the_structure_of_the_config_and_of_the_store_must_agree(disc_data, tmp_path):
    store = VolumeStore(**store_files(disc_data, "disc"), structure="disc")
    with pytest.raises(ValueError, match="pretrain.structure is 'vertebra'"):
        train(SiameseMethod, PretrainConfig.from_config(SMALL), store, Outputs.under(tmp_path), max_steps=1)
    with pytest.raises(SystemExit):   # --vertebrae names the vertebral array: not with --structure disc
        argv = _cli(disc_data, tmp_path / "out", "disc", "--max-steps", "1")
        argv[argv.index("--array")] = "--vertebrae"
        pretrain.main(argv)
    assert not (tmp_path / "out" / "encoder.pt").exists()


def test_the_older_vertebrae_option_still_names_the_vertebral_array(data, tmp_path):
    argv = _cli(data, tmp_path / "run", "vertebra", "--max-steps", "1")
    argv[argv.index("--array")] = "--vertebrae"
    assert pretrain.main(argv) == 0
    encoder = torch.load(tmp_path / "run" / "encoder.pt", weights_only=False)
    assert encoder["structure"] == "vertebra" and encoder["spec"]["n_levels"] == 7
    out = tmp_path / "pretext"
    argv = ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--pairs", str(data / "splits" / "pairs.parquet"),
            "--volumes", str(data / "splits" / "volumes.parquet"), "--vertebrae",
            str(data / "extract" / "vertebrae.npy"), "--evaluation", str(out / "evaluation.json"), "--scores",
            str(out / "distances.parquet"), "--scores-csv", str(out / "distances.csv"), "--threads", "1"]
    assert pretext_eval.main(argv) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["structure"] == "vertebra" and summary["paper"]["auc"] == 0.946
