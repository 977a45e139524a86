"""A segmentation network on a pretrained 3D encoder (Cao et al. 2022's segmentation downstream): the encoder
(stages/nets/encoders.py: the Siamese trunk or the ResNet-18) as the encoder of a U-Net whose decoder is MONAI's
(``monai.networks.nets.flexible_unet.UNetDecoder``, FlexibleUNet's: upsample, concatenate the skip, two convolutions,
at each scale).

The encoder reads ``(N, S, H, W)`` stacks of S sagittal slices; the network labels the middle slice, ``(N, classes,
H, W)``. The skips are the encoder's own maps at 1/2 ... 1/32 of the input, each at the middle slice (its ``skips``:
the trunk's after Conv1, the first pooling, Conv2, Conv3 and Conv5; the ResNet's after its stem and each of its four
stages); 3D convolutions below them, so the middle slice's maps have seen its neighbours. H and W must be multiples
of 32, at least 64.
"""

from __future__ import annotations

import torch
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from stages.nets.encoders import Encoder


def trunk_features(encoder: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """The input's middle slice and the encoder's maps at 1/2 ... 1/32 of ``x`` ``(N, S, H, W)``, middle slice each."""
    if x.dim() != 4 or x.shape[1] != encoder.spec.slices:
        raise ValueError(f"expected stacks (N, {encoder.spec.slices}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % 32 or x.shape[3] % 32 or min(x.shape[2:]) < 64:
        raise ValueError(f"the segmentation network needs rows and columns that are multiples of 32 and at least 64 "
                         f"(the trunk's Conv4 needs 43), got {tuple(x.shape[2:])}")
    return encoder.skips(x)


class TrunkUNet(nn.Module):
    """``encoder`` (either backbone, pretrained or not) under MONAI's U-Net decoder with
    ``decoder_channels`` (five: 1/16 up to full size) and a 1 x 1 convolution to ``n_classes`` logits."""

    def __init__(self, encoder: Encoder, n_classes: int, decoder_channels: tuple[int, ...]):
        super().__init__()
        if len(decoder_channels) != 5 or min(decoder_channels) < 1 or n_classes < 2:
            raise ValueError(f"need five decoder channel counts >= 1 and >= 2 classes, got {decoder_channels} and "
                             f"{n_classes}")
        self.encoder = encoder
        self.decoder = UNetDecoder(spatial_dims=2, encoder_channels=encoder.skip_channels(),
                                   decoder_channels=tuple(decoder_channels), act=("relu", {"inplace": True}),
                                   norm=("batch", {}), dropout=0.0, bias=True, upsample="nontrainable",
                                   pre_conv="default", interp_mode="bilinear", align_corners=False, is_pad=True)
        self.head = nn.Conv2d(decoder_channels[-1], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(trunk_features(self.encoder, x), skip_connect=4))
