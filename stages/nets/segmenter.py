"""A segmentation network on a pretrained 3D encoder (Cao et al. 2022's segmentation downstream): the Siamese trunk
(stages/nets/siamese.py) as the encoder of a U-Net whose decoder is MONAI's (``monai.networks.nets.flexible_unet.
UNetDecoder``, FlexibleUNet's: upsample, concatenate the skip, two convolutions, at each scale).

The trunk reads ``(N, S, H, W)`` stacks of S sagittal slices; the network labels the middle slice, ``(N, classes, H,
W)``. The skips are the trunk's own maps at 1/2, 1/4, 1/8 and 1/16 of the input (after Conv1, the first pooling,
Conv2 and Conv3), each taken at the middle slice (Conv1 to Conv3 are 3D, so the middle slice's maps have seen its
neighbours); the bottom is Conv5 (before its pooling: Conv4 spans all slices), padded back to Conv3's extent (Conv4
is unpadded) and resized to 1/32. H and W must be multiples of 32, at least 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from stages.nets.siamese import VggM3dEncoder


def trunk_channels(encoder: VggM3dEncoder) -> list[int]:
    """The channels of :func:`trunk_features`' maps: the input's (1), Conv1's, the first pooling's, Conv2's, Conv3's
    and Conv5's."""
    convs = [m for m in encoder.conv if isinstance(m, nn.Conv3d)]
    c1, c2, c3 = (c.out_channels for c in convs[:3])
    return [1, c1, c1, c2, c3, encoder.conv5[0].out_channels]


def trunk_features(encoder: VggM3dEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    """The input's middle slice and the trunk's maps at 1/2 ... 1/32 of ``x`` ``(N, S, H, W)``, middle slice each."""
    if x.dim() != 4 or x.shape[1] != encoder.spec.slices:
        raise ValueError(f"expected stacks (N, {encoder.spec.slices}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % 32 or x.shape[3] % 32 or min(x.shape[2:]) < 64:
        raise ValueError(f"the segmentation network needs rows and columns that are multiples of 32 and at least 64 "
                         f"(the trunk's Conv4 needs 43), got {tuple(x.shape[2:])}")
    mid = (x.shape[1] - 1) // 2     # the middle slice, as the clips count it
    h = x.unsqueeze(1)
    features = [x[:, mid:mid + 1]]
    for i, layer in enumerate(encoder.conv):
        h = layer(h)
        if i in (2, 3, 6, 10):      # Conv1 (after its ReLU), the first pooling, Conv2, Conv3
            features.append(h[:, :, mid])
    # Conv4 is unpadded: its maps cover the interior of Conv3's grid, one pixel in from each edge; padded back by
    # one (edge values) they span Conv3's extent, and are then resized to half of it
    bottom = F.pad(encoder.conv5[:-1](h.squeeze(2)), (1, 1, 1, 1), mode="replicate")
    size = [(n + 1) // 2 for n in features[-1].shape[-2:]]
    features.append(F.interpolate(bottom, size=size, mode="bilinear", align_corners=False))
    return features


class TrunkUNet(nn.Module):
    """``encoder`` (a :class:`VggM3dEncoder`, pretrained or not) under MONAI's U-Net decoder with
    ``decoder_channels`` (five: 1/16 up to full size) and a 1 x 1 convolution to ``n_classes`` logits."""

    def __init__(self, encoder: VggM3dEncoder, n_classes: int, decoder_channels: tuple[int, ...]):
        super().__init__()
        if len(decoder_channels) != 5 or min(decoder_channels) < 1 or n_classes < 2:
            raise ValueError(f"need five decoder channel counts >= 1 and >= 2 classes, got {decoder_channels} and "
                             f"{n_classes}")
        self.encoder = encoder
        self.decoder = UNetDecoder(spatial_dims=2, encoder_channels=trunk_channels(encoder),
                                   decoder_channels=tuple(decoder_channels), act=("relu", {"inplace": True}),
                                   norm=("batch", {}), dropout=0.0, bias=True, upsample="nontrainable",
                                   pre_conv="default", interp_mode="bilinear", align_corners=False, is_pad=True)
        self.head = nn.Conv2d(decoder_channels[-1], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(trunk_features(self.encoder, x), skip_connect=4))
