"""MLSSCL (Cao et al. 2022): the lumbar region's isotropic resampling against a linear image, the clips (shapes,
strides, the four views cut through one centre), the loss against a loop over the paper's equations, the queue
(first-in first-out, no key of the step's own regions among its negatives, the keys of every process: 2 gloo
processes equal 1), and a short run of mlsscl and an ablation that resumes exactly after SIGKILL and hands on the
trunk the downstream stages load."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import ROOT
from kill_run import kill_at_step
from ssl_data import write_ssl_data
from test_momentum import _env, _run, naive_info_nce

from stages.anatomy.regions import (
    TOO_FEW_BODIES,
    RegionConfig,
    lumbar_frame,
    lumbar_region,
    region_points,
    resample_region,
)
from stages.lumbar_regions import TABLE_COLUMNS, placed_scans
from stages.nets.encoders import Resnet3dEncoder, load_encoder
from stages.nets.siamese import VggM3dEncoder
from stages.training.clips import AXES, ClipSpec, cut_clips, draw_centres, mlsscl_clips
from stages.training.config import PretrainConfig
from stages.training.harness import TIMING_COLUMNS, Outputs
from stages.training.infonce import own_keys
from stages.training.methods.mlsscl import MlssclConfig, MlssclMethod
from stages.training.protocol import configured
from stages.training.store import VolumeStore

REGION = (14, 12, 12)   # SI, AP, LR voxels of the test regions


# ---- the lumbar region


def _structures(centres: np.ndarray, ap: np.ndarray,
                names=("T12", "L1", "L2", "L3", "L4", "L5", "S1")) -> pd.DataFrame:
    rows = [{"kind": "vertebra", "level": n, "x": c[0], "y": c[1], "z": c[2], "ap_x": ap[0], "ap_y": ap[1],
             "ap_z": ap[2], "axis_x": 0.0, "axis_y": 0.0, "axis_z": -1.0, "depth_mm": 30.0, "k": 0.0}
            for n, c in zip(names, centres)]
    return pd.DataFrame(rows)


def test_the_region_frame_runs_from_the_highest_to_the_lowest_body_and_is_right_handed():
    centres = np.array([[0.0, 0.0, 100.0 - 30 * i] for i in range(7)]) + np.array([[0, 2.0 * i, 0] for i in range(7)])
    frame = lumbar_frame(_structures(centres, np.array([0.0, -1.0, 0.1])))
    down = (centres[-1] - centres[0]) / np.linalg.norm(centres[-1] - centres[0])
    assert np.allclose(frame.down, down) and np.allclose(frame.centre, (centres[0] + centres[-1]) / 2)
    assert abs(frame.posterior @ frame.down) < 1e-12 and frame.posterior[1] > 0.9   # LPS: +y is posterior
    assert np.allclose(np.cross(frame.down, frame.posterior), frame.lateral)
    assert (frame.top, frame.bottom) == ("T12", "S1")
    assert lumbar_frame(_structures(centres[:1], np.array([0.0, -1.0, 0.0]), names=("L3",))) is None


def test_the_region_is_the_scan_resampled_on_an_isotropic_grid_trilinearly():
    """A scan whose value is a linear function of the position (LPS mm) is resampled exactly by trilinear
    interpolation: every region voxel holds the function at its centre, wherever the region's frame lies."""
    image = sitk.Image([64, 64, 16], sitk.sitkFloat32)   # 16 sagittal slices 4 mm apart, in-plane 1.5 mm
    image.SetSpacing((1.5, 1.5, 4.0))
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))   # i along +y (A->P), j along -z (down), k along +x
    image.SetOrigin((-30.0, -48.0, 48.0))
    k, j, i = np.meshgrid(*(np.arange(n) for n in (16, 64, 64)), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    world = np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ np.array(
        image.GetDirection()).reshape(3, 3).T

    def f(p: np.ndarray) -> np.ndarray:
        return 2.0 + 0.01 * p[..., 0] - 0.02 * p[..., 1] + 0.015 * p[..., 2]

    volume = f(world).reshape(16, 64, 64).astype(np.float32)
    centres = np.array([[0.0, 0.0, 30.0 - 10 * n] for n in range(7)])
    frame = lumbar_frame(_structures(centres, np.array([0.0, -1.0, 0.0])))
    cfg = RegionConfig(spacing_mm=2.0, size_mm=(40.0, 30.0, 20.0))
    region = resample_region(volume, image, frame, cfg)
    assert region.shape == (20, 15, 10) == cfg.shape
    points = region_points(frame, cfg.shape, cfg.spacing_mm)
    assert np.allclose(np.linalg.norm(points[1, 0, 0] - points[0, 0, 0]), 2.0)     # isotropic: 2 mm every way
    assert np.allclose(np.linalg.norm(points[0, 1, 0] - points[0, 0, 0]), 2.0)
    assert np.allclose(np.linalg.norm(points[0, 0, 1] - points[0, 0, 0]), 2.0)
    assert np.allclose(region, f(points), atol=1e-4)
    # rows run down the spine: the value falls with z by 0.015 per mm, 2 mm a row
    assert np.allclose(np.diff(region[:, 7, 5]), -0.015 * 2.0, atol=1e-4)


def test_a_scan_with_one_body_gets_no_region_and_says_why():
    image = sitk.Image([8, 8, 4], sitk.sitkFloat32)
    region, frame, flag = lumbar_region(np.ones((4, 8, 8), np.float32), image,
                                        _structures(np.zeros((1, 3)), np.array([0.0, -1.0, 0.0]), names=("L3",)),
                                        RegionConfig(spacing_mm=2.0, size_mm=(8.0, 8.0, 8.0)))
    assert frame is None and flag == TOO_FEW_BODIES and region.shape == (4, 4, 4) and not region.any()


# ---- the clips


def _coordinates(shape: tuple[int, int, int]) -> torch.Tensor:
    """A region whose voxel (z, y, x) holds 10000 z + 100 y + x."""
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    return 10000 * z + 100 * y + x


def test_clips_are_c_slices_at_their_stride_cut_through_one_centre():
    spec = ClipSpec(slices=5, long_stride=3, short_stride=1, size=(20, 20))
    region = _coordinates((20, 20, 20))
    regions = torch.stack([region, region + 0.5])
    centres = torch.tensor([[10, 7, 12], [6, 13, 9]])
    clips = mlsscl_clips(regions.float(), centres, spec)
    assert set(clips) == {"axial", "coronal", "sagittal", "short"}
    offsets = np.array([-2, -1, 0, 1, 2])
    for b in range(2):
        z, y, x = centres[b].tolist()
        for j, o in enumerate(offsets):
            # the slices' size equals the planes': the bilinear resize is the identity, the values are exact
            assert torch.allclose(clips["axial"][b, j].double(), regions[b, z + 3 * o, :, :], atol=0.02)
            assert torch.allclose(clips["coronal"][b, j].double(), regions[b, :, y + 3 * o, :], atol=0.02)
            assert torch.allclose(clips["sagittal"][b, j].double(), regions[b, :, :, x + 3 * o], atol=0.02)
            assert torch.allclose(clips["short"][b, j].double(), regions[b, z + o, :, :], atol=0.02)
        # every view's middle slice passes through the centre voxel
        centre = float(regions[b, z, y, x])
        assert float(clips["axial"][b, 2, y, x]) == pytest.approx(centre, abs=0.02)
        assert float(clips["coronal"][b, 2, z, x]) == pytest.approx(centre, abs=0.02)
        assert float(clips["sagittal"][b, 2, z, y]) == pytest.approx(centre, abs=0.02)


def test_clips_are_resized_to_the_backbone_s_volume_shape():
    spec = ClipSpec(slices=9, long_stride=2, short_stride=1, size=(48, 40))
    regions = torch.rand(3, 40, 24, 20)
    centres = draw_centres(3, (40, 24, 20), spec, torch.Generator().manual_seed(0))
    for view in AXES:
        assert cut_clips(regions, centres, view, 2, spec).shape == (3, 9, 48, 40)
    with pytest.raises(ValueError, match="view must be"):
        cut_clips(regions, centres, "oblique", 2, spec)


def test_centres_leave_room_for_every_clip_and_reach_every_place_that_does():
    spec = ClipSpec(slices=4, long_stride=3, short_stride=2, size=(8, 8))
    shape = (20, 14, 11)
    centres = draw_centres(4000, shape, spec, torch.Generator().manual_seed(1))
    # offsets -3, 0, 3, 6: the centre must lie in [3, n - 7]
    for axis, n in enumerate(shape):
        assert int(centres[:, axis].min()) == 3 and int(centres[:, axis].max()) == n - 7
    spec.check_fits(shape)
    with pytest.raises(ValueError, match="spans 10 voxels"):
        spec.check_fits((20, 9, 11))
    with pytest.raises(ValueError, match="short stride"):
        MlssclConfig(long_stride=2, short_stride=2)


# ---- the method: loss and queue


def write_region_data(root: Path) -> dict[str, Path]:
    """The ssl data set of tests/ssl_data.py, and a lumbar region per scan (a subject texture plus noise) listed as the
    lumbar_regions stage lists them; returns the pretraining stage's --pairs, --volumes and --array."""
    write_ssl_data(root, n_subjects=24)
    scans = placed_scans(pd.read_parquet(root / "splits" / "volumes.parquet"))
    rng = np.random.default_rng(0)
    textures = {s: rng.normal(size=REGION) for s in scans.subject_id.unique()}
    regions = np.stack([0.6 * textures[s] + 0.4 * rng.normal(size=REGION) for s in scans.subject_id])
    np.save(root / "regions.npy", regions.astype(np.float16))
    table = scans.assign(array="regions", row=np.arange(len(scans)), kind="region", level="T12-S1", top="T12",
                         bottom="S1", spacing_mm=3.0, has_labels=False)[TABLE_COLUMNS]
    table.to_parquet(root / "regions.parquet", index=False)
    return {"pairs": root / "splits" / "pairs.parquet", "volumes": root / "regions.parquet",
            "array": root / "regions.npy"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_region_data(tmp_path_factory.mktemp("mlsscl"))


SECTION = {"batch_size": 8, "hidden_dim": 16, "projection_dim": 4, "queue_size": 40, "clip_slices": 5,
           "clip_size": [44, 44], "long_stride": 2, "short_stride": 1, "alpha": 0.7, "beta": 1.3}


def _method(data: dict[str, Path], **section) -> MlssclMethod:
    cfg = configured(MlssclMethod, PretrainConfig(width=0.125, embedding_dim=16, device="cpu"),
                     {"mlsscl": {**SECTION, **section}})
    assert cfg.structure == "region"
    store = VolumeStore(None, data["volumes"], data["array"], structure=cfg.structure)
    torch.manual_seed(0)
    return MlssclMethod(cfg, store)


def test_the_loss_is_alpha_multiview_plus_beta_long_short_against_the_queue_before_the_step(data):
    """Cao et al. 2022: L_N(v1, v2) = -E[log e^{h(v1^i, v2^i)} / sum_{j=1}^{K+1} e^{h(v1^i, v2^j)}];
    L_multiview = L_N(v_a, v_c) + L_N(v_a, v_s) + L_N(v_c, v_s); L_long-short = L_N(v_S, v_L);
    L = alpha L_multiview + beta L_long-short. v1 through the online network (predictor included), v2 through the
    target, the K negatives the queue's (naive_info_nce: a loop over that equation, tests/test_momentum.py)."""
    method = _method(data)
    model, queue = method.model, method.model.queue
    batch = method.load("train", np.arange(6))
    rows = batch["row"]
    queue.enqueue(F.normalize(torch.randn(3, 4), dim=1), rows[:3])   # stale keys of three of the batch's regions
    before_keys, before_ids = queue.keys.clone(), queue.ids.clone()
    clips = mlsscl_clips(batch["x"], draw_centres(6, method.store.shape, method.clip_spec,
                                                  torch.Generator().manual_seed(3)), method.clip_spec)
    loss, figures = method.step(model, clips, rows, train=True)
    with torch.no_grad():
        q = {v: model.online(clips[v]).numpy() for v in ("axial", "coronal", "short")}
        k = {v: model.target(clips[v]).numpy() for v in ("coronal", "sagittal", "axial")}
    mine = own_keys(rows, before_ids).numpy()
    assert mine.sum() == 3
    tau, negatives = method.mc.temperature, before_keys.numpy()
    multiview = sum(naive_info_nce(q[a], k[b], negatives, tau, mine)
                    for a, b in (("axial", "coronal"), ("axial", "sagittal"), ("coronal", "sagittal")))
    long_short = naive_info_nce(q["short"], k["axial"], negatives, tau, mine)
    assert float(loss.detach()) == pytest.approx(0.7 * multiview + 1.3 * long_short, rel=1e-5)
    assert float(figures["multiview"]) == pytest.approx(multiview, rel=1e-5)
    assert float(figures["long_short"]) == pytest.approx(long_short, rel=1e-5)
    # the step's keys entered after its loss, oldest first: coronal, sagittal, then long axial, each in batch order
    keys, ids = queue.ordered()
    assert ids[-18:].tolist() == rows.tolist() * 3
    newest = np.concatenate([k[v] for v in ("coronal", "sagittal", "axial")])
    assert np.allclose(keys[-18:].numpy(), newest / np.linalg.norm(newest, axis=1, keepdims=True), atol=1e-6)


def test_the_ablations_fix_alpha_or_beta_and_read_only_self_supervision_regions(data):
    from stages.training.registry import METHODS
    for name, alpha, beta in (("mlsscl_multiview", 0.7, 0.0), ("mlsscl_long_short", 0.0, 1.3)):
        cfg = configured(METHODS[name], PretrainConfig(width=0.125, embedding_dim=16, device="cpu"),
                         {"mlsscl": SECTION})
        assert (cfg.method_config["alpha"], cfg.method_config["beta"]) == (alpha, beta)
    method = _method(data)
    table = method.store.table
    for part in ("train", "val"):
        rows = method.samples[part]
        assert len(rows) and set(table.loc[rows, "ssl_part"]) == {part}
        assert not set(table.loc[rows, "downstream_part"]) & {"val", "test"}
    assert method.spec.slices == 5 and (method.spec.height, method.spec.width_px) == (44, 44)
    with pytest.raises(ValueError, match="along its shortest axis"):
        _method(data, clip_slices=7, long_stride=2)        # 13 voxels > the regions' 12


# ---- end to end


def _stage(method: str, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "stages.pretrain", "--method", method]
    for option, path in {**data, **dataclasses.asdict(Outputs.under(out))}.items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    args += ["--width", "0.125", "--embedding-dim", "16", "--threads", "1", "--device", "cpu",
             "--checkpoint-every", "2"]
    for key, value in SECTION.items():
        args += [f"--mlsscl-{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return args + list(extra)


@pytest.mark.parametrize("backbone", ["trunk", "resnet18"])
def test_keys_of_every_process_enter_the_queue_two_gloo_processes_equal_one(backbone, data, tmp_path):
    extra = ("--max-steps", "2", "--mlsscl-backbone", backbone)
    _run(_stage("mlsscl", data, tmp_path / "one", *extra))
    _run(_stage("mlsscl", data, tmp_path / "two", *extra), torchrun=True)
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("one", "two"))
    assert one["identity"]["world_size"] == 1 and two["identity"]["world_size"] == 2
    m1, m2 = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    columns = [c for c in m1.columns if c not in TIMING_COLUMNS and c not in ("epoch", "split")]
    assert {"loss", "top1", "multiview", "long_short", "long_short_top1"} <= set(columns)
    assert np.allclose(m1[columns], m2[columns], rtol=1e-4)
    # 2 steps x 8 regions x 3 keys = 48 keys through a queue of 40, in the same slots and order
    assert torch.equal(one["model"]["queue.ids"], two["model"]["queue.ids"])
    assert int(one["model"]["queue.pointer"]) == 48 % 40
    assert torch.allclose(one["model"]["queue.keys"], two["model"]["queue.keys"], atol=1e-5)
    for name, weight in one["model"].items():
        assert torch.allclose(weight.float(), two["model"][name].float(), rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("method, backbone", [("mlsscl", "trunk"), ("mlsscl_long_short", "trunk"),
                                              ("mlsscl", "resnet18")])
def test_a_run_killed_with_sigkill_resumes_exactly_and_hands_on_the_backbone(method, backbone, data, tmp_path):
    extra = ("--mlsscl-max-epochs", "3", "--mlsscl-backbone", backbone)
    _run(_stage(method, data, tmp_path / "whole", *extra))
    out = tmp_path / "killed"
    kill_at_step(_stage(method, data, out, *extra), out / "resume" / "last.pt", 3, cwd=ROOT, env=_env())
    assert not (out / "encoder.pt").exists()
    again = _run(_stage(method, data, out, *extra))
    assert "resuming from" in again.stderr
    a, b = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    numbers = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert len(a) == 6 and a[numbers].notna().all().all()
    pd.testing.assert_frame_equal(a[numbers], b[numbers], check_exact=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    killed = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("predictor.") for k in whole) and any(k.startswith("target_") for k in whole)
    assert all(torch.equal(whole[k], killed[k]) for k in whole)   # online, predictor, target and queue
    encoder, saved = load_encoder(out / "encoder.pt")
    assert saved["method"] == method and saved["structure"] == "region" and encoder.spec.backbone == backbone
    assert isinstance(encoder, Resnet3dEncoder if backbone == "resnet18" else VggM3dEncoder)
    assert (encoder.spec.slices, encoder.spec.height, encoder.spec.width_px) == (5, 44, 44)
    assert encoder(torch.rand(2, 5, 44, 44)).shape == (2, 16)      # reads volumes of the clips' shape
    evaluation = tmp_path / "evaluation.json"
    _run([sys.executable, "-m", "stages.pretext_eval", "--checkpoint", str(out / "checkpoint.pt"),
          *sum(([f"--{k}", str(v)] for k, v in data.items()), []), "--evaluation", str(evaluation),
          "--scores", str(tmp_path / "scores.parquet"), "--scores-csv", str(tmp_path / "scores.csv"),
          "--threads", "1"])
    figures = json.loads(evaluation.read_text())
    assert figures["structure"] == "region" and figures["chance_top1"] == pytest.approx(1 / figures["test_volumes"])
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert len(scores) == figures["test_volumes"] > 1
    for network in ("trained", "untrained"):
        for view, key in (("view1", "multiview_top1"), ("view2", "long_short_top1")):
            assert figures[network][key] == pytest.approx(scores[f"{network}_{view}_top1"].mean())
    test = pd.read_parquet(data["volumes"]).query("ssl_part == 'test'")
    assert set(scores.scan_id) == set(test.scan_id[~test.downstream_part.isin(["val", "test"])])



def test_the_stage_flags_a_scan_without_a_spine_and_keeps_every_array_row_aligned(tmp_path):
    """Two placed scans, one with seven bodies and a label map, one with a single body: one region with its label map
    (has_labels), one flag with the reason; both arrays hold the one region."""
    from stages.lumbar_regions import lumbar_regions

    for folder in ("volumes", "labels"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    for scan in ("scan-a", "scan-b"):
        image = sitk.GetImageFromArray((100 + rng.normal(size=(8, 32, 32))).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 4.0))
        sitk.WriteImage(image, str(tmp_path / "volumes" / f"{scan}.nii.gz"))
    labels = np.zeros((8, 32, 32), np.uint8)
    labels[2:6, 8:14, 10:22] = 21
    labels[2:6, 14:16, 10:22] = 121
    label_map = sitk.GetImageFromArray(labels)
    label_map.SetSpacing((2.0, 2.0, 4.0))
    sitk.WriteImage(label_map, str(tmp_path / "labels" / "scan-a.nii.gz"))
    pd.DataFrame({"scan_id": ["scan-a", "scan-b"], "volume": ["volumes/scan-a.nii.gz", "volumes/scan-b.nii.gz"],
                  "label_map": ["labels/scan-a.nii.gz", ""]}).to_parquet(tmp_path / "manifest.parquet")
    names = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
    centres = np.array([[32.0, 6.0 + 8 * i, 16.0] for i in range(7)])
    bodies = _structures(centres, np.array([0.0, 0.0, 1.0]), names).assign(
        scan_id="scan-a", axis_x=0.0, axis_y=1.0, axis_z=0.0, depth_mm=10.0, k=4.0)
    single = bodies.iloc[[3]].assign(scan_id="scan-b")
    pd.concat([bodies, single]).to_parquet(tmp_path / "structures.parquet")
    pd.DataFrame({"scan_id": ["scan-a", "scan-a", "scan-b"], "subject_id": ["sub-a", "sub-a", "sub-b"],
                  "study_id": "ses-0", "days_since_first_study": 0.0, "family_id": ["fam-a", "fam-a", "fam-b"],
                  "ssl_part": "train", "downstream_part": "train"}).to_parquet(tmp_path / "volumes.parquet")
    cfg = RegionConfig(spacing_mm=4.0, size_mm=(60.0, 24.0, 16.0))
    out = tmp_path / "out"
    table = lumbar_regions(tmp_path / "manifest.parquet", tmp_path / "volumes", tmp_path / "structures.parquet",
                           tmp_path / "volumes.parquet", out / "regions.npy", out / "regions.parquet",
                           out / "flags.csv", cfg, labels=tmp_path / "labels", labels_array=out / "labels.npy")
    flags = pd.read_csv(out / "flags.csv")
    assert table.scan_id.tolist() == ["scan-a"] and table.row.tolist() == [0] and table.has_labels.tolist() == [True]
    assert flags.scan_id.tolist() == ["scan-b"] and flags.reason.tolist() == [TOO_FEW_BODIES]
    regions, region_labels = np.load(out / "regions.npy"), np.load(out / "labels.npy")
    assert regions.shape == region_labels.shape == (1, 15, 6, 4)
    assert np.median(regions[0].astype(float)) == pytest.approx(0.5, abs=0.05)   # the bodies' median scaled to 0.5
    assert set(np.unique(region_labels)) <= {0, 21, 121} and {21, 121} <= set(np.unique(region_labels))
    assert (table.columns.tolist() == TABLE_COLUMNS) and (table.level == "T12-S1").all()
