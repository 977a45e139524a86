"""The 3D encoders a pretraining method can hand on, behind one interface, and how to rebuild one from ``encoder.pt``.

``EncoderSpec.backbone`` names the architecture:

- ``trunk``: the Siamese network's VGG-M-like trunk (stages/nets/siamese.py, Jamaludin et al. 2017), Conv1 to FC7;
- ``resnet18``: MONAI's 3D ResNet-18 (``monai.networks.nets.ResNet`` with ``resnet18``'s blocks: basic blocks, two a
  stage; one input channel; a 7 x 7 x 7 stem convolution and a max pooling), the paper's backbone in Cao et al.
  2022, with ``width`` x its channels (64-128-256-512 at 1.0) and a linear layer from its global average pooling to
  the ``embedding_dim`` embedding (the counterpart of the trunk's FC7).

Deviations from the library's network, stated: the stem's stride is 1 across slices and 2 in-plane (MONAI's default
is 1 in all three), so that the maps halve in-plane at every stage (the U-Net's skips at 1/2 ... 1/32) while the few
slices are kept at the stem, as in the 3D ResNets of Hara et al. 2018; and group normalisation (the first stage's
channels / 8 groups, in every stage: stages/nets/norms.py) replaces batch normalisation, for the trunk's reason
(stages/nets/siamese.py): it normalises each sample on its own, so a multi-process step equals a single-process step
on the same global batch, and small batches train reliably.

What every encoder offers the downstream stages (volumes ``(N, S, H, W)``):

- ``forward(x)``: the embedding ``(N, embedding_dim)``;
- ``feature_maps(x)``: the deepest maps before the last pooling, ``(N, C, h, w)`` (the ResNet's last stage averaged
  over its slice axis), the maps the pooled probe features and Grad-CAM read;
- ``pool(maps)``, ``pooled_dim()``: the flattened input of the disc classifier's FC6; ``fc6_units()``: FC6's width;
- ``layer(name)``: the module whose output Grad-CAM reads (``conv5``: the deepest stage; ``conv3``: one stage up);
- ``skip_channels()``, ``skips(x)``: the input's middle slice and five maps at 1/2 ... 1/32 of the input at the middle
  slice, for the U-Net decoder of the segmentation downstream (stages/nets/segmenter.py);
- ``HEAD``: the prefix of the encoder's own fully connected layers in its ``state_dict``; everything else is the
  convolutional part that a disc classifier takes over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from stages.core import seeds
from stages.nets.norms import with_norm
from stages.nets.siamese import (
    VGG_M_FC6,
    EncoderSpec,
    SiameseNet,
    VggM3dEncoder,
    scaled_channels,
)

HEAD = "fc."
RESNET18_BLOCKS = [2, 2, 2, 2]   # basic blocks a stage: monai.networks.nets.resnet18's


def _middle(maps: torch.Tensor) -> torch.Tensor:
    """``(N, C, d, h, w)`` -> ``(N, C, h, w)`` at the middle of the slice axis: the middle map for an odd ``d``, the
    mean of the two central ones for an even ``d`` (the middle slice lies half-way between them)."""
    d = maps.shape[2]
    return maps[:, :, d // 2] if d % 2 else maps[:, :, d // 2 - 1:d // 2 + 1].mean(dim=2)


class Resnet3dEncoder(nn.Module):
    """MONAI's 3D ResNet-18 and a linear embedding: ``(N, S, H, W)`` -> ``(N, embedding_dim)`` (see the module's
    docstring)."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        if spec.backbone != "resnet18":
            raise ValueError(f"a ResNet-18 encoder needs backbone resnet18, got {spec.backbone!r}")
        self.spec = spec
        from monai.networks.nets import (
            ResNet,  # imported here: monai's import is slow and only networks need it
        )
        first = round(64 * spec.width)
        stages = [first, 2 * first, 4 * first, 8 * first]
        norm = ("group", {"num_groups": first // 8})
        self.resnet = with_norm(ResNet("basic", RESNET18_BLOCKS, stages, spatial_dims=3, n_input_channels=1,
                                       conv1_t_size=7, conv1_t_stride=(1, 2, 2), feed_forward=False, norm=norm),
                                norm, spatial_dims=3)   # MONAI normalises only the stem as ``norm`` says
        self.channels = [first, *stages]   # the stem, layer1 ... layer4
        self.fc = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(self.channels[-1], spec.embedding_dim))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.spec.slices:
            raise ValueError(f"expected volumes (N, {self.spec.slices}, H, W), got {tuple(x.shape)}")

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's maps (after its ReLU, before the max pooling) and layer1 ... layer4's, ``(N, C, d, h, w)``."""
        self._check(x)
        net = self.resnet
        h = net.act(net.bn1(net.conv1(x.unsqueeze(1))))
        maps = [h]
        h = net.maxpool(h)
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = stage(h)
            maps.append(h)
        return maps

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's maps averaged over their slice axis, ``(N, C, h, w)``."""
        self._check(x)
        net = self.resnet
        h = net.maxpool(net.act(net.bn1(net.conv1(x.unsqueeze(1)))))
        return net.layer4(net.layer3(net.layer2(net.layer1(h)))).mean(dim=2)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """The network's global average pooling, ``(N, C)``."""
        return maps.mean(dim=(2, 3))

    def pooled_dim(self) -> int:
        return self.channels[-1]

    def fc6_units(self) -> int:
        return scaled_channels(VGG_M_FC6, self.spec.width)

    def layer(self, name: str) -> nn.Module:
        """``conv5``: layer4 (``(N, C, d, h, w)``); ``conv3``: layer3."""
        return {"conv5": self.resnet.layer4, "conv3": self.resnet.layer3}[name]

    def skip_channels(self) -> list[int]:
        return [1, *self.channels]

    def skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input's middle slice (``(S - 1) // 2``) and the stem's and layer1 ... layer4's maps at the middle of
        their slice axis (:func:`_middle`): 1/2 ... 1/32 of the input's rows and columns."""
        mid = (x.shape[1] - 1) // 2
        return [x[:, mid:mid + 1], *(_middle(h) for h in self.stages(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.feature_maps(x)))


Encoder = Union[VggM3dEncoder, Resnet3dEncoder]


def build_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder ``spec.backbone`` names, at the weights the current random state draws."""
    return Resnet3dEncoder(spec) if spec.backbone == "resnet18" else VggM3dEncoder(spec)


def load_encoder(path: Path) -> tuple[Encoder, dict]:
    """An encoder saved as ``encoder.pt`` (by pretraining or the supervised stage) and what was saved with it:
    ``method``, ``spec``, ``state_dict`` and, from pretraining, ``structure``, the volumes it was trained on
    (``vertebra`` or ``disc``; files written before pretraining could read discs have none: ``vertebra``)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("method") != "supervised":
        saved.setdefault("structure", "vertebra")
    encoder = build_encoder(EncoderSpec(**saved["spec"]))
    encoder.load_state_dict(saved["state_dict"])
    return encoder, saved


def random_encoder(shape: tuple[int, int, int], seed: int, width: float, embedding_dim: int,
                   backbone: str = "trunk") -> Encoder:
    """The encoder of ``backbone`` at the initial weights of ``seed``: the trunk as the Siamese pretraining network
    builds it; the ResNet-18 as :func:`build_encoder` does after the same seeding."""
    slices, height, width_px = shape
    seeds.seed_torch(seeds.random_encoder(seed))
    spec = EncoderSpec(slices=slices, height=height, width_px=width_px, width=width, embedding_dim=embedding_dim,
                       backbone=backbone)
    return SiameseNet(spec).encoder if backbone == "trunk" else build_encoder(spec)
