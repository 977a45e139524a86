"""The disc classifier of Jamaludin et al. 2017 (section 4.2, Fig. 7): a classification CNN whose input is the disc
volume, with the pretraining network's convolutional layers and new fully connected layers.

"We transfer and freeze convolutional weights of the Siamese network and only train the randomly-initialized
fully-connected layers." :class:`DiscClassifier` is Conv1-Conv5 of the pretraining encoder (stages/nets/siamese.py,
the same layers and channel widths; or, for an encoder with the ResNet-18 backbone, its convolutional stages and
global average pooling: stages/nets/encoders.py) followed by FC6 (sized for the disc volume's Conv5 output, not the
body's), FC7 and FC8 (one output per class). The downstream models differ only in where Conv1-Conv5 come from and
whether they train:

- ``transfer``: a pretrained encoder's convolutions, frozen; FC6-FC8 trained (the paper's protocol);
- ``finetune``: the same start, everything trained;
- ``scratch``: random convolutions, everything trained;
- ``random-frozen``: random convolutions (the pretraining network's initial ones), frozen; FC6-FC8 trained.

With frozen convolutions, the FC6 input (Conv5's pooled maps, flattened: :meth:`DiscClassifier.conv_features`) is
all FC6-FC8 ever see, so it is computed once per encoder (stages/disc_features.py) and FC6-FC8 train on it alone
(:class:`FcHead`, the same layers). The linear and MLP probes read :func:`pooled_features` instead: Conv5's maps
averaged and maximised over positions (the modern frozen-feature protocol).

Shapes: a disc batch is ``(N, S, H, W)`` (the paper's 9 x 112 x 224). Slices must equal the pretraining volumes'
(Conv4 spans them); height and width may differ (FC6 is sized here).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.nets.encoders import HEAD, build_encoder
from stages.nets.siamese import EncoderSpec, VggM3dEncoder

TRUNK = "encoder."   # the classifier's convolutional part in its state_dict: its encoder's, less the encoder's HEAD


class FcHead(nn.Module):
    """FC6-FC8 of the disc classifier: ``(N, conv_dim)`` -> ``(N, n_classes)`` logits; dropout after FC6 and FC7."""

    def __init__(self, conv_dim: int, fc6: int, fc7: int, n_classes: int, dropout: float):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        # FC6's input standardised per feature (batch statistics in training, running ones in evaluation, no
        # parameters): Conv5's pooled maps of small crops differ little between discs against their means (demo:
        # between-disc standard deviation 0.07 for a mean of 0.5), which SGD on raw inputs did not learn from.
        self.norm = nn.BatchNorm1d(conv_dim, affine=False)
        self.layers = nn.Sequential(nn.Linear(conv_dim, fc6), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                    nn.Linear(fc6, fc7), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                    nn.Linear(fc7, n_classes))
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.norm(features))


def is_trunk(key: str) -> bool:
    """Whether a classifier's ``state_dict`` key is of its convolutional part (its encoder's, less FC6-FC7)."""
    return key.startswith(TRUNK) and not key.startswith(TRUNK + HEAD)


class DiscClassifier(nn.Module):
    """The convolutional part of the pretraining encoder of ``spec`` (``encoder``; its own FC layers unused) +
    :class:`FcHead` on a disc volume."""

    def __init__(self, spec: EncoderSpec, n_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = build_encoder(spec)   # at the pretraining network's initialisation
        self.spec = spec
        self.head = FcHead(self.encoder.pooled_dim(), self.encoder.fc6_units(), spec.embedding_dim, n_classes,
                           dropout)
        del self.encoder.fc   # the encoder's own FC layers are not the classifier's (its weights are drawn: same start)

    @property
    def n_classes(self) -> int:
        return self.head.layers[-1].out_features

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Conv5's maps before pooling, ``(N, C, h, w)`` (for Grad-CAM and the pooled features)."""
        if x.dim() != 4 or x.shape[1] != self.spec.slices:
            raise ValueError(f"expected disc volumes (N, {self.spec.slices}, H, W), got {tuple(x.shape)}")
        return self.encoder.feature_maps(x)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """FC6's input: Conv5's maps pooled, flattened (the ResNet's: globally averaged), ``(N, C h' w')``."""
        return self.encoder.pool(self.feature_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_features(x))

    def as_encoder(self) -> VggM3dEncoder:
        """This classifier's Conv1-Conv5 and FC6-FC7 as a pretraining encoder of its spec (what ``encoder.pt``
        holds): FcHead's first two layers are the encoder's FC6 and FC7, of the same sizes (the trunk's only)."""
        if self.spec.backbone != "trunk":
            raise ValueError(f"only a trunk classifier is an encoder with its FC layers, not a {self.spec.backbone}")
        encoder = VggM3dEncoder(self.spec)
        state = encoder.state_dict()
        own = self.state_dict()
        state.update({k.removeprefix(TRUNK): v for k, v in own.items() if is_trunk(k)})
        for fc, layer in (("fc.1", "head.layers.0"), ("fc.4", "head.layers.3")):
            for part in ("weight", "bias"):
                state[f"{fc}.{part}"] = own[f"{layer}.{part}"]
        encoder.load_state_dict(state)
        return encoder

    def load_trunk(self, encoder_state: dict[str, torch.Tensor], source: str = "the encoder") -> None:
        """Copy the convolutional part from an encoder's state dict (an encoder's of this backbone, a
        :class:`VggM3dEncoder`'s or a ResNet-18's); its FC layers are not copied."""
        own = self.state_dict()
        trunk = {TRUNK + k: v for k, v in encoder_state.items() if not k.startswith(HEAD)}
        missing = sorted(k for k in own if is_trunk(k) and k not in trunk)
        unknown = sorted(k for k in trunk if k not in own)
        if missing or unknown:
            raise ValueError(f"{source} is not a pretraining encoder of the {self.spec.backbone} backbone: it lacks "
                             f"{missing[:3]} and has {unknown[:3]}")
        for k, v in trunk.items():
            if own[k].shape != v.shape:
                raise ValueError(
                    f"{source}'s {k} has shape {tuple(v.shape)} but the disc classifier needs {tuple(own[k].shape)}: "
                    "the encoder was trained on volumes of another slice count or at another width "
                    "(extract.disc_size's slices must equal the pretraining volumes'; pretrain.width the same)")
        own.update(trunk)
        self.load_state_dict(own)


def disc_spec(encoder_spec: EncoderSpec, disc_shape: tuple[int, int, int]) -> EncoderSpec:
    """The spec of a disc classifier with ``encoder_spec``'s widths for disc volumes of ``disc_shape``
    (slices, rows, columns)."""
    slices, height, width_px = disc_shape
    if slices != encoder_spec.slices:
        raise ValueError(f"disc volumes have {slices} slices but the encoder was trained on {encoder_spec.slices}: "
                         "Conv4 spans every slice, so extract.disc_size must have the pretraining volumes' slices")
    try:
        return EncoderSpec(slices=slices, height=height, width_px=width_px, width=encoder_spec.width,
                           embedding_dim=encoder_spec.embedding_dim, dropout=0.0, backbone=encoder_spec.backbone)
    except ValueError as err:
        raise ValueError(f"disc volumes of {height} x {width_px} pixels: {err} (extract.disc_size)") from err


def pooled_features(maps: torch.Tensor) -> torch.Tensor:
    """Conv5's maps ``(N, C, h, w)`` averaged and maximised over positions: ``(N, 2C)`` (differentiable, for
    Grad-CAM of a head on them)."""
    return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)


def save_classifier(net: DiscClassifier, prefix: str = "cnn") -> dict[str, np.ndarray]:
    """A :class:`DiscClassifier` as named arrays (for ``np.savez``; :func:`load_classifier` rebuilds it)."""
    arrays = {f"{prefix}/{k}": v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    arrays[f"{prefix}/spec"] = np.array(json.dumps(net.spec.to_dict()))
    arrays[f"{prefix}/n_classes"] = np.array(net.n_classes)
    arrays[f"{prefix}/dropout"] = np.array(net.head.layers[2].p)
    return arrays


def load_classifier(arrays: Any, prefix: str = "cnn") -> DiscClassifier:
    """The classifier written by :func:`save_classifier`, in eval mode (a trunk saved without FC6-FC8, as the
    disc_features stage writes it, gets a random head: use its convolutions only)."""
    if f"{prefix}/spec" not in arrays:
        raise KeyError(f"the saved model holds no disc classifier {prefix!r}")
    facts = {f"{prefix}/{k}" for k in ("spec", "n_classes", "dropout")}
    net = DiscClassifier(EncoderSpec(**json.loads(str(arrays[f"{prefix}/spec"]))), int(arrays[f"{prefix}/n_classes"]),
                         float(arrays[f"{prefix}/dropout"]))
    state = {k.removeprefix(f"{prefix}/"): torch.from_numpy(np.asarray(arrays[k])) for k in arrays
             if k.startswith(f"{prefix}/") and k not in facts}
    net.load_state_dict(state, strict=any(k.startswith("head.") for k in state))
    return net.eval()


def save_head(net: DiscClassifier, prefix: str) -> dict[str, np.ndarray]:
    """FC6-FC8 of ``net`` and its spec as named arrays: the trained part of a transfer head (its Conv1-Conv5 are the
    encoder's, in the disc_features stage's disc_trunk.npz; :func:`load_transfer` joins the two)."""
    return {k: v for k, v in save_classifier(net, prefix).items() if not is_trunk(k.removeprefix(f"{prefix}/"))}


def load_transfer(trunk: Any, model: Any, prefix: str = "transfer") -> DiscClassifier:
    """The transfer classifier: Conv1-Conv5 of ``trunk`` (disc_trunk.npz) and FC6-FC8 of ``model`` (a probe job's
    model.npz, head ``prefix``), in eval mode."""
    if f"{prefix}/spec" not in model:
        raise KeyError(f"the saved model holds no {prefix!r} head (keys: {sorted(model.keys())[:6]} ...)")
    arrays = {f"{prefix}/{k.removeprefix('trunk/')}": trunk[k] for k in trunk
              if is_trunk(k.removeprefix("trunk/"))}
    arrays.update({k: model[k] for k in model if k.startswith(f"{prefix}/")})
    if str(arrays[f"{prefix}/spec"]) != str(trunk["trunk/spec"]):
        raise ValueError("the transfer head was trained on another encoder's features than this trunk's")
    return load_classifier(arrays, prefix)
