"""The longitudinal Siamese network of Jamaludin, Kadir and Zisserman 2017 (sections 2.2-2.4): a VGG-M-like 3D CNN on
vertebral-body volumes, a contrastive loss on same-subject-years-apart pairs, and a class-balanced vertebral-level loss.

Shapes: a volume batch is ``(N, S, H, W)`` (slices, rows, columns; the paper's 9 x 224 x 224; at least 43 rows and
columns, see :meth:`EncoderSpec.conv5_size`). Conv1 to Conv4 are 3D; Conv4's kernel spans all S slices without
padding, which removes the slice axis; Conv5 is 2D; FC7 is the embedding (1024-d in the paper) and FC8 classifies the
levels: the paper's 7 vertebral levels T12 ... S1, or the 6 disc levels T12-L1 ... L5-S1 when the same network is
pretrained on disc volumes (``pretrain.structure: disc``; ``EncoderSpec.n_levels``).

Deviation from VGG-M, stated: local response normalisation is replaced by group normalisation. Both normalise each
sample on its own (unlike batch normalisation), which keeps a multi-process (DDP) step equal to a single-process step
on the same global batch; group normalisation trains more reliably from scratch on small cohorts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.levels import VERTEBRAE

BACKBONES = ("trunk", "resnet18")   # EncoderSpec.backbone: this module's VGG-M trunk, MONAI's 3D ResNet-18
N_LEVELS = len(VERTEBRAE)   # FC8 of the paper's network: T12, L1 ... L5, S1 (EncoderSpec.n_levels by default)
MIN_SIZE = 43               # fewest rows and columns a volume may have (EncoderSpec.conv5_size)
VGG_M_CHANNELS = (96, 256, 512, 512, 512)
VGG_M_FC6 = 4096


def scaled_channels(base: int, width: float) -> int:
    """VGG-M's channel count scaled by ``width``, rounded to a multiple of 8 (at least 8) for group normalisation."""
    return max(8, round(base * width / 8) * 8)


def _norm(channels: int, dims: int) -> nn.Module:
    return nn.GroupNorm(channels // 8, channels) if dims else nn.Identity()


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder from its weights (saved next to them in ``encoder.pt``), and the
    pretraining network around it: ``n_levels``, FC8's classes (7 vertebral levels; 6 for discs). A spec saved
    before ``n_levels`` existed rebuilds with the default, the vertebral levels it was trained on."""

    slices: int
    height: int
    width_px: int
    width: float = 1.0
    embedding_dim: int = 1024
    dropout: float = 0.5
    n_levels: int = N_LEVELS
    backbone: str = "trunk"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")
        if self.backbone == "resnet18":
            first = round(64 * self.width)
            if self.slices < 1 or self.height < 1 or self.width_px < 1 or first < 8 or first % 8:
                raise ValueError(f"the ResNet-18 needs volumes of at least one voxel and 64 x width first-stage "
                                 f"channels that are a multiple of 8 (group normalisation), got "
                                 f"{(self.slices, self.height, self.width_px)} and width {self.width}")
            return
        rows, cols = self.conv5_size()
        if rows < 1 or cols < 1:
            raise ValueError(
                f"volumes of {self.height} x {self.width_px} pixels are too small for this network: after Conv1-Conv3 "
                "and two poolings Conv4 (3 x 3, unpadded) needs at least 3 x 3; use crops of at least "
                f"{MIN_SIZE} x {MIN_SIZE} pixels (the crop size: extract.vertebra_size / extract.disc_size)")

    def conv5_size(self) -> tuple[int, int]:
        """Rows and columns after Conv5's pooling, for this input size. Conv4 needs 3 rows (columns) after the second
        pooling, so 6 after Conv2, 11 after the first pooling, 22 after Conv1: at least 43 (``MIN_SIZE``) in the
        input. 43 to 74 give a 1 x 1 map after Conv5's pooling, the paper's 224 gives 6 x 6."""
        def side(n: int) -> int:
            n = (n - 1) // 2 + 1       # conv1, stride 2, padding 3, kernel 7
            n //= 2                    # pool
            n = (n - 1) // 2 + 1       # conv2, stride 2, padding 2, kernel 5
            n //= 2                    # pool
            n -= 2                     # conv4, 3 x 3 unpadded (conv3 and conv5 keep the size)
            return (n + 1) // 2        # pool after conv5 (ceil mode: a 1 x 1 map survives)
        return side(self.height), side(self.width_px)

    def to_dict(self) -> dict:
        return asdict(self)


class VggM3dEncoder(nn.Module):
    """Conv1-Conv5 and FC6-FC7: ``(N, S, H, W)`` -> ``(N, embedding_dim)``."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        c1, c2, c3, c4, c5 = (scaled_channels(c, spec.width) for c in VGG_M_CHANNELS)
        self.conv = nn.Sequential(
            nn.Conv3d(1, c1, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)), _norm(c1, 3), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(c1, c2, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)), _norm(c2, 3), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(c2, c3, 3, padding=1), _norm(c3, 3), nn.ReLU(inplace=True),
            nn.Conv3d(c3, c4, (spec.slices, 3, 3)), _norm(c4, 3), nn.ReLU(inplace=True),   # removes the slice axis
        )
        self.conv5 = nn.Sequential(nn.Conv2d(c4, c5, 3, padding=1), _norm(c5, 2), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(2, ceil_mode=True))
        rows, cols = spec.conv5_size()
        fc6 = scaled_channels(VGG_M_FC6, spec.width)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c5 * rows * cols, fc6), nn.ReLU(inplace=True),
                                nn.Dropout(spec.dropout), nn.Linear(fc6, spec.embedding_dim))   # FC6, FC7
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        # FC7 starts small, with an embedding norm of about 1 whatever its size, so that the first pairs lie mostly
        # within the contrastive margin: a large first loss pushes the ReLUs below into a dead, constant embedding,
        # while a much smaller start starves the layers below of the contrastive gradient.
        fc7 = self.fc[-1]
        nn.init.normal_(fc7.weight, std=2.8 / math.sqrt(fc7.in_features * fc7.out_features))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Conv5's output before pooling, ``(N, C, h, w)``: the deepest convolutional maps (for Grad-CAM)."""
        if x.dim() != 4 or x.shape[1] != self.spec.slices:
            raise ValueError(f"expected volumes (N, {self.spec.slices}, H, W), got {tuple(x.shape)}")
        h = self.conv(x.unsqueeze(1)).squeeze(2)
        return self.conv5[:-1](h)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """FC6's input: Conv5's maps (:meth:`feature_maps`) pooled, flattened, ``(N, C h' w')``."""
        return self.conv5[-1](maps).flatten(1)

    def pooled_dim(self) -> int:
        rows, cols = self.spec.conv5_size()
        return self.conv5[0].out_channels * rows * cols

    def fc6_units(self) -> int:
        return self.fc[1].out_features

    def layer(self, name: str) -> nn.Module:
        """The module whose output Grad-CAM reads: ``conv5``, Conv5's ReLU ``(N, C, h, w)``; ``conv3``, Conv3's ReLU
        ``(N, C, S, h, w)``."""
        return {"conv5": self.conv5[-2], "conv3": self.conv[10]}[name]

    def skip_channels(self) -> list[int]:
        """The channels of :meth:`skips`' maps: the input's (1), Conv1's, the first pooling's, Conv2's, Conv3's and
        Conv5's."""
        convs = [m for m in self.conv if isinstance(m, nn.Conv3d)]
        c1, c2, c3 = (c.out_channels for c in convs[:3])
        return [1, c1, c1, c2, c3, self.conv5[0].out_channels]

    def skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input's middle slice (``(S - 1) // 2``) and the maps at 1/2, 1/4, 1/8, 1/16 and 1/32 of ``x``
        ``(N, S, H, W)`` (H, W multiples of 32): after Conv1, the first pooling, Conv2 and Conv3, each at the middle
        slice (Conv1 to Conv3 are 3D, so the middle slice's maps have seen its neighbours), and Conv5 (before its
        pooling: Conv4 spans all slices), padded back to Conv3's extent (Conv4 is unpadded) and resized to 1/32."""
        mid = (x.shape[1] - 1) // 2
        h = x.unsqueeze(1)
        features = [x[:, mid:mid + 1]]
        for i, layer in enumerate(self.conv):
            h = layer(h)
            if i in (2, 3, 6, 10):      # Conv1 (after its ReLU), the first pooling, Conv2, Conv3
                features.append(h[:, :, mid])
        # Conv4 is unpadded: its maps cover the interior of Conv3's grid, one pixel in from each edge; padded back by
        # one (edge values) they span Conv3's extent, and are then resized to half of it
        bottom = F.pad(self.conv5[:-1](h.squeeze(2)), (1, 1, 1, 1), mode="replicate")
        size = [(n + 1) // 2 for n in features[-1].shape[-2:]]
        features.append(F.interpolate(bottom, size=size, mode="bilinear", align_corners=False))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.feature_maps(x)))


class SiameseNet(nn.Module):
    """One encoder applied to both volumes of a pair (shared weights), and FC8 over the ``spec.n_levels`` levels of
    the structure (7 vertebral levels, or 6 disc levels). The encoder's weights are drawn before FC8's: the same seed
    gives the same initial encoder whatever the number of levels."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.encoder = VggM3dEncoder(spec)
        self.fc8 = nn.Linear(spec.embedding_dim, spec.n_levels)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the FC7 embeddings of ``a`` and ``b`` (``(n, D)`` each) and the level logits of both,
        ``(2n, n_levels)`` (``a`` first)."""
        emb = self.encoder(torch.cat([a, b]))
        ea, eb = emb.chunk(2)
        return ea, eb, self.levels(emb)

    def levels(self, emb: torch.Tensor) -> torch.Tensor:
        """FC8's level logits from FC7 embeddings. The embedding is standardised per sample first (no parameters):
        FC7 is kept small for the contrastive loss, and FC8 would otherwise learn from near-zero inputs."""
        return level_logits(self.fc8, emb)


def level_logits(fc8: nn.Linear, emb: torch.Tensor) -> torch.Tensor:
    """FC8's level logits from FC7 embeddings standardised per sample (no parameters), through a ReLU."""
    return fc8(F.relu(F.layer_norm(emb, emb.shape[-1:])))


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006; Jamaludin et al. 2017, eq. 1), averaged over the pairs:

        L_C = 1/N sum_n [ y_n d_n^2 + (1 - y_n) max(0, m - d_n)^2 ],   d_n = ||e_a,n - e_b,n||_2

    ``ea``, ``eb``: ``(N, D)`` embeddings; ``y``: ``(N,)``, 1 for a positive (same subject) pair, 0 for a negative.
    The mean (not the sum) keeps the loss independent of the batch size, and equal across processes under DDP.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = margin

    def forward(self, ea: torch.Tensor, eb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        squared = (ea.float() - eb.float()).pow(2).sum(dim=1)
        d = squared.clamp_min(1e-12).sqrt()
        y = y.float()
        return (y * squared + (1 - y) * F.relu(self.margin - d).pow(2)).mean()


def class_balanced_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """alpha_c = N / (C' n_c) for each class present (C' classes present, n_c samples of class c among N), 0 for an
    absent class: every present class then carries the same total weight, and sum_n alpha_{y_n} = N."""
    counts = torch.bincount(labels.long(), minlength=n_classes).double()
    present = counts > 0
    if not present.any():
        raise ValueError("no labels to weight")
    weights = torch.zeros(n_classes, dtype=torch.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.float()


class BalancedCrossEntropy(nn.Module):
    """Class-balanced classification loss (Jamaludin et al. 2017, eq. 2): L_cls = 1/N sum_n -alpha_{y_n} log p_n(y_n).

    ``logits``: ``(N, C)``; ``target``: ``(N,)`` class indices; ``alpha``: ``(C,)`` from :func:`class_balanced_weights`
    over the training set. Normalised by N (not by the sum of the batch's weights) so that it is a plain mean over
    samples: equal under DDP to one process on the global batch.
    """

    def __init__(self, alpha: torch.Tensor):
        super().__init__()
        self.register_buffer("alpha", alpha.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits.float(), target, reduction="none")
        return (self.alpha[target] * per_sample).mean()
