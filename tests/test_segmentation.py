"""The segmentation downstream (Cao et al. 2022, Table 2): the U-Net on the Siamese trunk (its skips are the trunk's own
maps, MONAI's decoder brings them back to full size), the mid-sagittal stacks and their label classes, nested label
subsets, no test subject in any training set, and the stage end to end on synthetic regions: a pretrained encoder is
the network's starting point, every subset and structure is scored, and a network that sees the labels beats chance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

from stages import segment as segment_stage
from stages.core.errors import LeakageError
from stages.lumbar_regions import TABLE_COLUMNS
from stages.nets.encoders import load_encoder
from stages.nets.segmenter import TrunkUNet, trunk_features
from stages.nets.siamese import EncoderSpec, VggM3dEncoder
from stages.segment import parts, segment
from stages.training.segmenter import (
    SegmentationConfig,
    classes_of,
    fit,
    mid_sagittal,
    nested_subsets,
)

SPEC = EncoderSpec(slices=5, height=64, width_px=64, width=0.125, embedding_dim=16)


def test_the_unet_reads_the_trunk_s_maps_and_labels_the_middle_slice_at_full_size():
    encoder = VggM3dEncoder(SPEC)
    x = torch.rand(2, 5, 64, 96)
    features = trunk_features(encoder, x)
    assert [tuple(f.shape[-2:]) for f in features] == [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in features] == encoder.skip_channels() == [1, 16, 16, 32, 64, 64]
    assert torch.equal(features[0][:, 0], x[:, 2])                      # the middle slice
    with torch.no_grad():                                                # Conv1's maps, at the middle slice
        conv1 = encoder.conv[:3](x.unsqueeze(1))[:, :, 2]
    assert torch.allclose(features[1], conv1)
    net = TrunkUNet(encoder, 3, (32, 16, 16, 8, 8))
    assert net(x).shape == (2, 3, 64, 96)
    assert net.encoder is encoder
    even = VggM3dEncoder(EncoderSpec(slices=4, height=64, width_px=64, width=0.125, embedding_dim=16))
    x4 = torch.rand(1, 4, 64, 64)
    assert torch.equal(trunk_features(even, x4)[0][:, 0], x4[:, 1])     # (S - 1) // 2, as the truth is cut
    with pytest.raises(ValueError, match="multiples of 32"):
        trunk_features(encoder, torch.rand(1, 5, 48, 64))
    with pytest.raises(ValueError, match="at least 64"):
        trunk_features(encoder, torch.rand(1, 5, 32, 64))


def test_classes_merge_the_levels_and_the_stacks_are_the_regions_mid_sagittal_slices():
    assert classes_of(np.array([0, 19, 22, 25, 26, 119, 124, 7])).tolist() == [0, 1, 1, 1, 1, 2, 2, 0]
    rng = np.random.default_rng(0)
    regions = rng.random((3, 64, 64, 11)).astype(np.float32)
    labels = rng.choice([0, 20, 120], size=(3, 64, 64, 11)).astype(np.uint8)
    cfg = SegmentationConfig(size=(64, 64), stride=2)
    x, y = mid_sagittal(regions, labels, 5, cfg)
    assert x.shape == (3, 5, 64, 64) and y.shape == (3, 64, 64)
    for j, k in enumerate((1, 3, 5, 7, 9)):                         # the middle voxel 5, slices 2 apart
        assert torch.allclose(x[:, j], torch.from_numpy(regions[:, :, :, k]), atol=1e-6)
    assert torch.equal(y, torch.from_numpy(classes_of(labels[:, :, :, 5])))
    x, y = mid_sagittal(regions, labels, 5, SegmentationConfig(size=(32, 32), stride=1))
    assert set(np.unique(y.numpy())) <= {0, 1, 2}                      # nearest: no blend of two labels


def test_label_subsets_are_nested_and_drawn_from_the_seed():
    subjects = [f"sub-{i:02d}" for i in range(20)]
    subsets = nested_subsets(subjects, (0.1, 0.3, 0.7, 1.0), seed=3)
    assert [len(s) for s in subsets.values()] == [2, 6, 14, 20]
    assert set(subsets[0.1]) <= set(subsets[0.3]) <= set(subsets[0.7]) <= set(subsets[1.0]) == set(subjects)
    assert subsets == nested_subsets(list(reversed(subjects)), (0.1, 0.3, 0.7, 1.0), seed=3)
    assert subsets != nested_subsets(subjects, (0.1, 0.3, 0.7, 1.0), seed=4)


def synthetic_regions(n_subjects: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Regions (SI 64, AP 32, LR 9) with a column of bright vertebrae and darker discs (labelled) in noise, one scan
    per subject; 10 downstream training, 3 validation and 3 test subjects."""
    rng = np.random.default_rng(seed)
    regions = 0.2 * rng.normal(size=(n_subjects, 64, 32, 9)).astype(np.float32)
    labels = np.zeros(regions.shape, np.uint8)
    for i in range(n_subjects):
        top, front = rng.integers(2, 8), rng.integers(6, 12)
        for level, row in enumerate(range(top, 58, 10)):
            labels[i, row:row + 7, front:front + 12, 2:7] = 20 + level
            labels[i, row + 7:row + 10, front:front + 12, 2:7] = 120 + level
    regions += np.where(classes_of(labels) == 1, 1.0, np.where(classes_of(labels) == 2, 0.5, 0.0))
    part = ["train"] * 10 + ["val"] * 3 + ["test"] * 3
    table = pd.DataFrame({"array": "regions", "row": np.arange(n_subjects),
                          "scan_id": [f"scan-{i:02d}" for i in range(n_subjects)],
                          "subject_id": [f"sub-{i:02d}" for i in range(n_subjects)], "study_id": "ses-0",
                          "days_since_first_study": 0.0, "kind": "region", "level": "T12-S1", "family_id": "fam",
                          "ssl_part": "train", "downstream_part": part[:n_subjects], "top": "T12", "bottom": "S1",
                          "spacing_mm": 3.0, "has_labels": True})[TABLE_COLUMNS]
    return regions, labels, table


FAST = SegmentationConfig(label_fractions=(0.3, 1.0), epochs=12, batch_size=4, learning_rate=0.003,
                          decoder_channels=(32, 16, 16, 8, 8), size=(64, 64), bootstrap=50)


def test_test_and_validation_subjects_never_train_and_every_subset_is_scored(monkeypatch):
    regions, labels, table = synthetic_regions()
    torch.manual_seed(0)
    encoder = VggM3dEncoder(EncoderSpec(slices=5, height=64, width_px=64, width=0.125, embedding_dim=16))
    seen = []

    def recording_fit(net, x, y, cfg, seed):   # what each network is trained on, and the weights it starts from
        seen.append((x.clone(), {k: v.clone() for k, v in net.encoder.state_dict().items()}, net.encoder))
        return fit(net, x, y, cfg, seed)

    monkeypatch.setattr(segment_stage, "fit", recording_fit)
    scores, summary, history, examples = segment(encoder, regions, labels, table, FAST, "siamese")
    stacks, _ = mid_sagittal(regions, labels, 5, FAST)
    train_rows = set(table.row[table.downstream_part == "train"])
    assert len(seen) == 2 and [len(x) for x, _, _ in seen] == [3, 10]
    for x, weights, copy in seen:
        for stack in x:     # every training stack is a training subject's, none a validation or test subject's
            matches = {int(r) for r in np.flatnonzero([torch.equal(stack, other) for other in stacks])}
            assert matches and matches <= train_rows
        # each network starts from the given encoder's weights, in a copy of its own
        assert copy is not encoder and all(torch.equal(weights[k], v) for k, v in encoder.state_dict().items())
    test_subjects = set(table.subject_id[table.downstream_part == "test"])
    assert set(scores.subject_id) == test_subjects
    assert set(summary.fraction) == {0.3, 1.0} and set(summary.structure) == {"vertebra", "disc"}
    assert summary.groupby("fraction").n_subjects.first().tolist() == [3, 10]
    assert summary.value.between(0, 1).all() and (summary.ci_low <= summary.value + 1e-9).all()
    assert len(history) == 2 * FAST.epochs and history.loss.notna().all()
    assert examples["image"].shape == (3, 64, 64) and set(examples) >= {"predicted_0.3", "predicted_1"}
    # with every training label the network finds the vertebrae well above what labelling nothing would score
    full = summary[(summary.fraction == 1.0) & (summary.metric == "dice")].set_index("structure").value
    assert full["vertebra"] > 0.6
    # a subject in both parts stops the stage
    leaked = table.copy()
    leaked.loc[leaked.downstream_part == "test", "subject_id"] = table.subject_id.iloc[0]
    with pytest.raises(LeakageError):
        parts(leaked)


def test_the_stage_starts_from_the_pretrained_encoder_or_from_scratch(tmp_path):
    regions, labels, table = synthetic_regions()
    np.save(tmp_path / "regions.npy", regions.astype(np.float16))
    np.save(tmp_path / "labels.npy", labels)
    table.to_parquet(tmp_path / "regions.parquet", index=False)
    encoder = VggM3dEncoder(SPEC)
    torch.save({"method": "siamese", "spec": SPEC.to_dict(), "state_dict": encoder.state_dict(),
                "structure": "vertebra"}, tmp_path / "encoder.pt")
    loaded, _ = load_encoder(tmp_path / "encoder.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))

    def run(name: str, *source: str) -> subprocess.CompletedProcess:
        out = tmp_path / name
        args = [sys.executable, "-m", "stages.segment", "--regions", str(tmp_path / "regions.npy"), "--labels",
                str(tmp_path / "labels.npy"), "--table", str(tmp_path / "regions.parquet"), *source,
                "--out-scores", str(out / "scores.parquet"), "--out-summary", str(out / "summary.parquet"),
                "--out-history", str(out / "history.csv"), "--out-examples", str(out / "examples.npz"),
                "--label-fractions", "1.0", "--epochs", "2", "--bootstrap", "20", "--size", "64", "64",
                "--decoder-channels", "16", "8", "8", "8", "8"]
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)

    pretrained = run("pretrained", "--encoder", str(tmp_path / "encoder.pt"))
    assert pretrained.returncode == 0, pretrained.stderr[-2000:]
    assert set(pd.read_parquet(tmp_path / "pretrained" / "scores.parquet").model) == {"siamese"}
    scratch = run("scratch", "--scratch", "--slices", "5", "--width", "0.125", "--embedding-dim", "16",
                  "--encoder-seed", "0")
    assert scratch.returncode == 0, scratch.stderr[-2000:]
    assert set(pd.read_csv(tmp_path / "scratch" / "summary.csv").model) == {"scratch"}
    resnet = run("resnet", "--scratch", "--slices", "5", "--width", "0.125", "--embedding-dim", "16",
                 "--encoder-seed", "0", "--backbone", "resnet18")
    assert resnet.returncode == 0, resnet.stderr[-2000:]
    assert set(pd.read_csv(tmp_path / "resnet" / "summary.csv").model) == {"scratch_resnet18"}
    missing = run("bad", "--scratch", "--slices", "5")
    assert missing.returncode == 2 and "--scratch needs --width" in missing.stderr
