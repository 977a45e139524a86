"""The 3D encoders behind one interface (stages/nets/encoders.py): MONAI's 3D ResNet-18, Cao et al. 2022's backbone,
beside the Siamese trunk, and every downstream network that reads an encoder (the disc classifier, Grad-CAM, the
segmentation U-Net, the feature stages) on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import resnet18
from torch import nn

from stages import disc_features, features
from stages.gradcam import explain_inputs, layer_module
from stages.nets.disc_cnn import DiscClassifier, disc_spec
from stages.nets.encoders import Resnet3dEncoder, _middle, build_encoder, load_encoder, random_encoder
from stages.nets.segmenter import TrunkUNet, trunk_features
from stages.nets.siamese import EncoderSpec, VggM3dEncoder

SPEC = EncoderSpec(slices=9, height=64, width_px=64, width=0.25, embedding_dim=32, dropout=0.0, backbone="resnet18")


def _encoder(spec: EncoderSpec = SPEC, seed: int = 0) -> Resnet3dEncoder:
    torch.manual_seed(seed)
    encoder = build_encoder(spec)
    assert isinstance(encoder, Resnet3dEncoder)
    return encoder.eval()


def test_the_resnet_is_monai_s_resnet18_with_group_norm_in_place_of_batch_norm():
    ours = _encoder().resnet
    theirs = resnet18(spatial_dims=3, n_input_channels=1, feed_forward=False, widen_factor=0.25, conv1_t_size=7,
                      conv1_t_stride=(1, 2, 2))
    def convs(net: nn.Module) -> list:
        return [(n, m.weight.shape, m.stride) for n, m in net.named_modules() if isinstance(m, nn.Conv3d)]
    assert convs(ours) == convs(theirs)                       # the same convolutions, shapes and strides
    assert [len(getattr(ours, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    norms = [m for m in ours.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm3d) for m in theirs.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    assert {(m.num_groups, m.num_channels) for m in norms} >= {(2, 16), (2, 128)}
    with pytest.raises(ValueError, match="multiple of 8"):
        EncoderSpec(slices=9, height=64, width_px=64, width=0.1, backbone="resnet18")
    with pytest.raises(ValueError, match="backbone must be one of"):
        EncoderSpec(slices=9, height=64, width_px=64, backbone="resnet50")


def test_the_resnet_s_maps_halve_at_each_stage_and_its_embedding_pools_the_last():
    encoder = _encoder()
    x = torch.rand(3, 9, 64, 96)
    with torch.no_grad():
        stages = encoder.stages(x)
        maps = encoder.feature_maps(x)
        emb = encoder(x)
    # the stem keeps the slices (stride 1 across them) and halves rows and columns; every later stage halves all three
    assert [tuple(s.shape[1:]) for s in stages] == [(16, 9, 32, 48), (16, 5, 16, 24), (32, 3, 8, 12),
                                                     (64, 2, 4, 6), (128, 1, 2, 3)]
    assert torch.allclose(maps, stages[-1].mean(dim=2))
    assert encoder.pooled_dim() == 128 and encoder.pool(maps).shape == (3, 128)
    assert torch.allclose(emb, encoder.fc(stages[-1].mean(dim=(2, 3, 4))), atol=1e-6)   # global average, then FC
    assert emb.shape == (3, 32)
    with pytest.raises(ValueError, match="expected volumes"):
        encoder(torch.rand(2, 5, 64, 64))


def test_each_sample_is_embedded_on_its_own_whatever_the_batch():
    """Group normalisation: a sample's embedding does not depend on the rest of its batch (in training mode too), so
    a step split over processes equals one process's step."""
    encoder = _encoder().train()
    x = torch.rand(4, 9, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[:1], encoder(x[:1]), atol=1e-5)


def test_middle_slice_maps_are_the_middle_one_or_the_mean_of_the_two_central():
    maps = torch.arange(2 * 3 * 4 * 1 * 1, dtype=torch.float32).view(2, 3, 4, 1, 1)
    assert torch.equal(_middle(maps), (maps[:, :, 1] + maps[:, :, 2]) / 2)
    assert torch.equal(_middle(maps[:, :, :3]), maps[:, :, 1])
    encoder = _encoder()
    x = torch.rand(2, 9, 64, 64)
    with torch.no_grad():
        skips = trunk_features(encoder, x)
        stages = encoder.stages(x)
    assert [tuple(s.shape[-2:]) for s in skips] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert [s.shape[1] for s in skips] == encoder.skip_channels() == [1, 16, 16, 32, 64, 128]
    assert torch.equal(skips[0][:, 0], x[:, 4])                         # the input's middle slice
    assert torch.equal(skips[1], stages[0][:, :, 4])                    # the stem keeps all 9 slices: the 5th
    assert torch.equal(skips[4], stages[3][:, :, 0:2].mean(dim=2))      # layer3's 2 slices: their mean
    net = TrunkUNet(encoder, 3, (32, 16, 16, 8, 8))
    assert net(x).shape == (2, 3, 64, 64)


def test_a_saved_resnet_rebuilds_exactly_and_random_ones_follow_their_seed(tmp_path):
    encoder = _encoder(seed=5)
    torch.save({"method": "mlsscl", "spec": SPEC.to_dict(), "state_dict": encoder.state_dict(),
                "structure": "region"}, tmp_path / "encoder.pt")
    loaded, saved = load_encoder(tmp_path / "encoder.pt")
    assert isinstance(loaded, Resnet3dEncoder) and saved["method"] == "mlsscl"
    x = torch.rand(2, 9, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), encoder(x))
    a, b, c = (random_encoder((9, 64, 64), seed, 0.25, 32, "resnet18") for seed in (1, 1, 2))
    assert isinstance(a, Resnet3dEncoder)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()["resnet.conv1.weight"], c.state_dict()["resnet.conv1.weight"])
    assert isinstance(random_encoder((9, 64, 64), 1, 0.25, 32), VggM3dEncoder)   # the trunk by default


def test_the_disc_classifier_takes_the_resnet_s_convolutions_and_refuses_another_backbone():
    encoder = _encoder(seed=3)
    spec = disc_spec(encoder.spec, (9, 48, 64))
    assert spec.backbone == "resnet18"
    net = DiscClassifier(spec, n_classes=4).eval()
    net.load_trunk(encoder.state_dict())
    theirs = encoder.state_dict()
    copied = [k for k in net.state_dict() if k.startswith("encoder.resnet.")]
    assert len(copied) == sum(k.startswith("resnet.") for k in theirs) > 40
    assert all(torch.equal(net.state_dict()[k], theirs[k.removeprefix("encoder.")]) for k in copied)
    x = torch.rand(5, 9, 48, 64)
    with torch.no_grad():
        assert torch.allclose(net.conv_features(x), encoder.feature_maps(x).mean(dim=(2, 3)), atol=1e-6)
        assert net(x).shape == (5, 4)
    assert net.head.layers[0].in_features == 128
    trunk = VggM3dEncoder(EncoderSpec(slices=9, height=64, width_px=64, width=0.25, embedding_dim=32))
    with pytest.raises(ValueError, match="not a pretraining encoder of the resnet18 backbone"):
        net.load_trunk(trunk.state_dict(), "the trunk")
    with pytest.raises(ValueError, match="only a trunk classifier"):
        net.as_encoder()


def test_grad_cam_reads_the_resnet_s_last_stage_with_its_slice_axis():
    net = DiscClassifier(disc_spec(SPEC, (9, 64, 64)), n_classes=3).eval()
    assert layer_module(net, "conv5") is net.encoder.resnet.layer4
    assert layer_module(net.encoder, "conv3") is net.encoder.resnet.layer3
    result = explain_inputs(net, net, [torch.rand(2, 9, 64, 64)], "conv5")
    assert result["cam"].shape == (2, 1, 1, 2, 2)                      # layer4: 1 slice of 2 x 2
    assert torch.isfinite(result["cam"]).all() and float(result["cam"].amax()) == pytest.approx(1.0)
    layer3 = explain_inputs(net, net, [torch.rand(2, 9, 64, 64)], "conv3")
    assert layer3["cam"].shape == (2, 1, 2, 4, 4)


def test_the_feature_stages_embed_with_a_saved_resnet(tmp_path):
    encoder = _encoder(seed=7)
    torch.save({"method": "mlsscl", "spec": SPEC.to_dict(), "state_dict": encoder.state_dict(),
                "structure": "region"}, tmp_path / "encoder.pt")
    rng = np.random.default_rng(0)
    bodies = rng.random((6, 9, 64, 64)).astype(np.float16)
    np.save(tmp_path / "vertebrae.npy", bodies)
    meta = features.run(tmp_path / "vertebrae.npy", tmp_path / "f.npy", tmp_path / "f.json", tmp_path / "encoder.pt",
                        seed=0, width=0.25, embedding_dim=32, threads=1)
    assert meta["spec"]["backbone"] == "resnet18" and meta["dim"] == 32
    with torch.no_grad():
        expected = encoder(torch.from_numpy(bodies.astype(np.float32))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected, atol=1e-5)
    net, source = disc_features.classifier_of((9, 48, 64), tmp_path / "encoder.pt", 0, 0.25, 32)
    assert source["encoder"] == "mlsscl" and net.spec.backbone == "resnet18"
    discs = rng.random((4, 9, 48, 64)).astype(np.float16)
    maps, pooled = disc_features.compute(net, discs, 1, None, 0, tmp_path / "maps.npy", tmp_path / "pooled.npy")
    assert maps.shape == (4, 1, 128) and pooled.shape == (4, 256)
    with torch.no_grad():
        fmaps = encoder.feature_maps(torch.from_numpy(discs.astype(np.float32)))
    np.testing.assert_allclose(maps[:, 0], fmaps.mean(dim=(2, 3)).numpy(), atol=2e-3)   # view 0: float16, unaugmented
    np.testing.assert_allclose(pooled[:, :128], fmaps.mean(dim=(2, 3)).numpy(), atol=1e-5)


@pytest.mark.parametrize("norm, kind", [("group", nn.GroupNorm), ("instance", nn.InstanceNorm2d),
                                        ("batch", nn.BatchNorm2d)])
def test_the_simclr_resnet_normalises_every_block_as_its_norm_says(norm, kind):
    """MONAI's ResNet hands its norm to the stem only; every block's normalisation must follow simclr.norm (group and
    instance normalise each image on its own: several processes then equal one)."""
    from stages.nets.simclr import SimclrSpec, resnet
    net = resnet(SimclrSpec(height=64, width_px=64, depth=10, widen_factor=0.25, norm=norm))
    norms = [m for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase))]
    assert len(norms) == 1 + 4 * 2 + 3 and all(type(m) is kind for m in norms)   # stem, 4 blocks, 3 shortcuts
    if norm != "batch":
        x = torch.rand(3, 1, 64, 64)
        with torch.no_grad():
            assert torch.allclose(net.train()(x)[:1], net(x[:1]), atol=1e-5)
