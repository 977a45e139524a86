"""The Siamese network, its losses against naive loops written from the paper's equations, and the augmentation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages.core.levels import DISCS, VERTEBRAE
from stages.nets.encoders import load_encoder
from stages.nets.siamese import (
    MIN_SIZE,
    BalancedCrossEntropy,
    ContrastiveLoss,
    EncoderSpec,
    SiameseNet,
    VggM3dEncoder,
    class_balanced_weights,
)
from stages.training.augment import (
    AugmentRanges,
    affine_matrices,
    augment_pairs,
    sample_pair_params,
)


def test_contrastive_loss_matches_the_equation_written_as_a_loop():
    gen = torch.Generator().manual_seed(0)
    ea, eb = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    eb[:4] = ea[:4] + 0.01 * torch.randn(4, 8, generator=gen)     # some pairs inside the margin
    y = (torch.rand(16, generator=gen) < 0.5).float()
    y[:2] = 0                                                    # close negatives: the hinge is active
    margin = 3.0
    total = 0.0
    for n in range(16):
        d = math.sqrt(sum((float(ea[n, k]) - float(eb[n, k])) ** 2 for k in range(8)))
        total += float(y[n]) * d ** 2 + (1 - float(y[n])) * max(0.0, margin - d) ** 2
    assert float(ContrastiveLoss(margin)(ea, eb, y)) == pytest.approx(total / 16, rel=1e-5)


def test_contrastive_loss_is_zero_for_far_negatives_and_identical_positives():
    e = torch.randn(4, 5)
    assert float(ContrastiveLoss(1.0)(e, e.clone(), torch.ones(4))) == pytest.approx(0.0, abs=1e-10)
    assert float(ContrastiveLoss(1.0)(e, e + 10, torch.zeros(4))) == 0.0
    with pytest.raises(ValueError, match="margin must be > 0"):
        ContrastiveLoss(0.0)


def test_class_balanced_weights_and_loss_match_a_naive_loop():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3, 0, 1, 3, 3, 0])
    alpha = class_balanced_weights(labels, 5)
    counts = {c: int((labels == c).sum()) for c in range(5)}
    present = [c for c in range(5) if counts[c]]
    for c in range(5):
        expected = len(labels) / (len(present) * counts[c]) if counts[c] else 0.0
        assert float(alpha[c]) == pytest.approx(expected)
    # every present class carries the same total weight
    assert {round(float(alpha[c]) * counts[c], 6) for c in present} == {round(len(labels) / len(present), 6)}
    logits = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(1))
    total = 0.0
    for n, c in enumerate(labels.tolist()):
        z = logits[n].tolist()
        log_p = z[c] - math.log(sum(math.exp(v) for v in z))
        total += -float(alpha[c]) * log_p
    assert float(BalancedCrossEntropy(alpha)(logits, labels)) == pytest.approx(total / len(labels), rel=1e-5)


@pytest.mark.parametrize("size,width", [((9, 224, 224), 1.0), ((9, 64, 64), 0.125), ((5, 48, 48), 0.125)])
def test_network_shapes_and_conv4_removes_the_slice_axis(size, width):
    torch.manual_seed(0)
    spec = EncoderSpec(slices=size[0], height=size[1], width_px=size[2], width=width, embedding_dim=1024)
    net = SiameseNet(spec).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        conv4 = net.encoder.conv(x.unsqueeze(1))
        assert conv4.shape[2] == 1, "Conv4's kernel must span every slice without padding"
        conv4_layer = [m for m in net.encoder.conv if isinstance(m, torch.nn.Conv3d)][3]
        assert conv4_layer.kernel_size == (size[0], 3, 3) and conv4_layer.padding == (0, 0, 0)
        maps = net.encoder.feature_maps(x)
        assert maps.dim() == 4 and maps.shape[0] == 2           # Conv5 is 2D
        ea, eb, logits = net(x, x)
    assert ea.shape == eb.shape == (2, 1024)
    assert logits.shape == (4, 7)
    if width == 1.0:   # VGG-M's channel widths
        assert [m.out_channels for m in net.encoder.conv if hasattr(m, "out_channels")] == [96, 256, 512, 512]
        assert net.encoder.fc[1].out_features == 4096
        assert tuple(maps.shape[2:]) == (12, 12) and spec.conv5_size() == (6, 6)


def test_too_small_volumes_are_refused_with_the_size_needed():
    with pytest.raises(ValueError, match=r"at least 43 x 43 pixels \(the crop size: extract.vertebra_size / "
                                         r"extract.disc_size\)"):
        EncoderSpec(slices=9, height=32, width_px=32)
    # 43 is the true minimum, in either direction: Conv4 then sees 3 x 3, and 42 leaves it 2 x 2
    assert MIN_SIZE == 43
    for height, width_px in ((42, 64), (64, 42)):
        with pytest.raises(ValueError, match="too small"):
            EncoderSpec(slices=9, height=height, width_px=width_px)
    net = SiameseNet(EncoderSpec(slices=3, height=43, width_px=43, width=0.125, embedding_dim=8)).eval()
    with torch.no_grad():
        assert net.encoder(torch.zeros(1, 3, 43, 43)).shape == (1, 8)
    with pytest.raises(ValueError, match="expected volumes"):
        VggM3dEncoder(EncoderSpec(slices=5, height=48, width_px=48, width=0.125))(torch.zeros(1, 4, 48, 48))


def test_fc8_has_one_class_per_level_of_the_structure_and_the_encoder_does_not_depend_on_it():
    shape = {"slices": 5, "height": 43, "width_px": 48, "width": 0.125, "embedding_dim": 16}
    assert EncoderSpec(**shape).n_levels == len(VERTEBRAE) == 7
    torch.manual_seed(0)
    bodies = SiameseNet(EncoderSpec(**shape))
    torch.manual_seed(0)
    discs = SiameseNet(EncoderSpec(**shape, n_levels=len(DISCS)))
    assert bodies.fc8.out_features == 7 and discs.fc8.out_features == 6
    x = torch.randn(2, 5, 43, 48)
    with torch.no_grad():
        assert discs.eval()(x, x)[2].shape == (4, 6)
    # the encoder is drawn before FC8: the same seed gives the same initial encoder for bodies and discs
    assert all(torch.equal(v, discs.encoder.state_dict()[k]) for k, v in bodies.encoder.state_dict().items())
    with pytest.raises(ValueError, match="n_levels must be >= 1"):
        EncoderSpec(**shape, n_levels=0)


def test_an_encoder_saved_before_structures_existed_loads_as_a_vertebral_one(tmp_path):
    old_spec = {"slices": 5, "height": 48, "width_px": 48, "width": 0.125, "embedding_dim": 16,
                "dropout": 0.5}   # no n_levels
    encoder = VggM3dEncoder(EncoderSpec(**old_spec))
    torch.save({"method": "siamese", "spec": old_spec, "state_dict": encoder.state_dict()}, tmp_path / "encoder.pt")
    loaded, saved = load_encoder(tmp_path / "encoder.pt")
    assert saved["structure"] == "vertebra" and loaded.spec.n_levels == 7
    assert SiameseNet(EncoderSpec(**saved["spec"])).fc8.out_features == 7
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())


def test_augmentation_parameters_stay_within_the_stated_ranges():
    ranges = AugmentRanges()
    p = sample_pair_params(5000, ranges, torch.Generator().manual_seed(0))
    assert p.angle_deg.abs().max() <= 15 and p.angle_deg.abs().max() > 14
    assert p.scale.min() >= 0.9 and p.scale.max() <= 1.1
    assert p.shift_x.abs().max() <= 48 / 224 and p.shift_y.abs().max() <= 24 / 224
    assert set(p.shift_z.tolist()) == {-2, -1, 0, 1, 2}
    assert p.gain.min() >= 0.8 and p.gain.max() <= 1.2
    assert len(p.flip) == 5000 and 0.45 < float(p.flip.float().mean()) < 0.55
    assert len(p.angle_deg) == 10000   # one set per volume: a's then b's


def test_identity_when_every_range_is_zero():
    x = torch.randn(3, 9, 40, 56)
    y = torch.randn(3, 9, 40, 56)
    p = sample_pair_params(3, AugmentRanges.identity(), torch.Generator().manual_seed(0))
    a, b = augment_pairs(x, y, p)
    assert torch.allclose(a, x, atol=1e-4) and torch.allclose(b, y, atol=1e-4)


def test_identity_holds_under_bf16_autocast():
    # the harness augments inside the (autocast) training step; in bf16 a 224-px sampling grid is off by up to a
    # fifth of a pixel, so augmentation keeps its grid in float32
    x = torch.randn(2, 9, 224, 224)
    p = sample_pair_params(2, AugmentRanges.identity(), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = augment_pairs(x, x.clone(), p)
    assert a.dtype == torch.float32 and torch.allclose(a, x, atol=1e-3)   # bf16 would be off by ~3e-2


def test_the_same_flip_is_applied_to_both_volumes_of_a_pair():
    x = torch.zeros(64, 5, 16, 16)
    x[:, 0] = 1.0                                          # an asymmetric volume: only the first slice is bright
    flip_only = AugmentRanges(rotation_deg=0, shift_fraction=(0, 0), shift_slices=0, scale=(1, 1), intensity=0,
                              flip=True)
    p = sample_pair_params(64, flip_only, torch.Generator().manual_seed(3))
    a, b = augment_pairs(x, x.clone(), p)
    assert torch.allclose(a, b, atol=1e-6), "a pair's two volumes must be flipped together"
    flipped = p.flip.numpy()
    assert flipped.any() and (~flipped).any()
    assert np.allclose(a[flipped, -1].numpy(), 1) and np.allclose(a[~flipped, 0].numpy(), 1)


def test_shifts_move_the_content_by_the_stated_amount():
    x = torch.zeros(1, 7, 32, 32)
    x[0, 3, 10, 8] = 1.0
    zero = AugmentRanges.identity()
    p = sample_pair_params(1, zero, torch.Generator())
    p = dataclasses.replace(p, shift_x=torch.tensor([0.25, 0.0]), shift_y=torch.tensor([-0.125, 0.0]),
                            shift_z=torch.tensor([2, 0]))
    a, _ = augment_pairs(x, x.clone(), p)
    assert tuple(int(i) for i in np.unravel_index(int(a.argmax()), a.shape)) == (0, 5, 6, 16)  # z+2, y-4, x+8
    assert float(a.max()) == pytest.approx(1.0, abs=1e-5)


def test_rotation_is_rigid_on_non_square_volumes():
    p = sample_pair_params(1, AugmentRanges.identity(), torch.Generator())
    p = dataclasses.replace(p, angle_deg=torch.tensor([90.0, 90.0]))
    mats = affine_matrices(p, (1, 20, 40))
    # a 90-degree turn maps the point 5 px right of centre to 5 px above or below it (in pixels, not in the
    # normalised units, which differ between a 20-row and a 40-column axis)
    out_point = torch.tensor([5 / 20, 0.0, 0.0, 1.0])          # x normalised by W/2 = 20
    src = mats[0] @ out_point
    assert float(src[0]) == pytest.approx(0.0, abs=1e-6)
    assert abs(float(src[1])) * 10 == pytest.approx(5.0, abs=1e-5)   # y normalised by H/2 = 10
