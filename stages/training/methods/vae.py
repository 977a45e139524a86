"""Pretraining method ``vae``: a 3D variational autoencoder (Kingma and Welling 2014), the generative baseline the
population programme asks for ("benchmark unsupervised and self-supervised deep learning methods, as well as deep
generative models"), on the same volumes (``pretrain.structure``) and the same backbone as the other methods, and
evaluated like them: its encoder is what the probes, the segmentation downstream and the population analysis read.

The encoder q(z | x): the backbone (the Siamese trunk or MONAI's 3D ResNet-18, ``vae.backbone``) and two linear
layers to the posterior's mean mu and log-variance log sigma^2 (``latent_dim`` each). The decoder p(x | z): a linear
layer to a coarse grid (the volume's slices, an eighth of its rows and columns) and three blocks of in-plane 2x
upsampling, 3D convolution and ReLU, then a last convolution, cut to the volume's size. The loss is the negative
evidence lower bound per voxel with a Gaussian likelihood of fixed variance 1/2 and the closed-form KL divergence of
a diagonal Gaussian posterior from the N(0, I) prior (Kingma and Welling 2014, appendix B, eq. 10):

    L = [ sum_voxels (x - x_hat)^2  +  beta * KL ] / voxels,    KL = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)

with z = mu + sigma * eps (the reparameterisation; eps from the step's seeded generator, so a run resumes exactly;
z = mu in evaluation). ``beta`` (1 by default) weighs the KL term as in a beta-VAE. Adam (``vae.learning_rate``).
No augmentation: the model learns to reproduce the volumes as they are.

Pretext evaluation on the self-supervision test part, trained and untrained: whether a volume's posterior mean is
nearer to that of its own augmented view (the ``pretrain`` section's augmentation) than to any other test volume's
(top-1, chance 1 in the test volumes), and the share of the volume's variance its reconstruction explains (R^2, cut
to [0, 1]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.nets.encoders import build_encoder
from stages.nets.siamese import EncoderSpec
from stages.training.config import PretrainConfig
from stages.training.methods.momentum import two_views
from stages.training.methods.pretext import PretextMethod, TaskConfig
from stages.training.protocol import AugmentDraw
from stages.training.store import VolumeStore


@dataclass(frozen=True)
class VaeConfig(TaskConfig):
    latent_dim: int = 64
    beta: float = 1.0
    decoder_channels: int = 32
    learning_rate: float = 0.001
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.latent_dim, self.decoder_channels) < 1 or self.beta < 0:
            raise ValueError(f"latent_dim and decoder_channels must be >= 1 and beta >= 0, got {self}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample: -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


class Decoder(nn.Module):
    """z -> a volume ``(n, S, H, W)``: a linear layer to ``channels`` x S x ceil(H/8) x ceil(W/8), three blocks of
    in-plane 2x upsampling, 3x3x3 convolution and ReLU (channels halving), a last convolution, cut to H x W."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], channels: int):
        super().__init__()
        self.shape = shape
        slices, height, width = shape
        self.grid = (channels, slices, -(-height // 8), -(-width // 8))
        self.project = nn.Linear(latent_dim, int(np.prod(self.grid)))
        blocks: list[nn.Module] = []
        c = channels
        for _ in range(3):
            out = max(c // 2, 4)
            blocks += [nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"), nn.Conv3d(c, out, 3, padding=1),
                       nn.ReLU(inplace=True)]
            c = out
        blocks.append(nn.Conv3d(c, 1, 3, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.project(z)).view(len(z), *self.grid))
        slices, height, width = self.shape
        return x[:, 0, :slices, :height, :width]


class VaeNet(nn.Module):
    """The backbone (``encoder``, handed on), the posterior's two heads and the decoder."""

    def __init__(self, spec: EncoderSpec, tc: VaeConfig):
        super().__init__()
        self.encoder = build_encoder(spec)
        self.mu = nn.Linear(spec.embedding_dim, tc.latent_dim)
        self.logvar = nn.Linear(spec.embedding_dim, tc.latent_dim)
        self.decoder = Decoder(tc.latent_dim, (spec.slices, spec.height, spec.width_px), tc.decoder_channels)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Reconstruction, mu and log-variance; ``eps`` (like mu) samples z, None takes z = mu."""
        mu, logvar = self.posterior(x)
        z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z), mu, logvar


def negative_elbo(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the loss [sum (x - x_hat)^2 + beta KL] / voxels, its reconstruction and KL terms (per voxel)."""
    voxels = x[0].numel()
    reconstruction = (x.float() - x_hat.float()).pow(2).flatten(1).sum(1) / voxels
    kl = kl_divergence(mu.float(), logvar.float()) / voxels
    return reconstruction + beta * kl, reconstruction, kl


class VaeMethod(PretextMethod):
    """The 3D variational autoencoder (see the module's docstring)."""

    name = "vae"
    section = "vae"
    settings = VaeConfig
    columns: ClassVar[tuple[str, ...]] = ("loss", "reconstruction", "kl")
    volumes_per_sample = 2
    views = {"vae_top1": "posterior mean finds its augmented view's (top-1)",
             "reconstruction_r2": "variance explained by the reconstruction"}
    chance = "chance (top-1): 1 of the test volumes"

    @classmethod
    def configure(cls, cfg: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
        """As every pretext task's, with Adam."""
        return dataclasses.replace(super().configure(cfg, values), optimiser="adam")

    @classmethod
    def network(cls, spec: EncoderSpec, tc: TaskConfig) -> nn.Module:
        assert isinstance(tc, VaeConfig)
        return VaeNet(spec, tc)

    def terms(self, model: nn.Module, batch: dict[str, torch.Tensor],
              draw: AugmentDraw | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert isinstance(self.tc, VaeConfig)
        x = batch["x"]
        eps = None
        if draw is not None:   # eps for the global batch from the step's generator; this process's share
            eps = torch.randn(draw.n_global, self.tc.latent_dim, generator=draw.generator,
                              device=draw.generator.device)[draw.mine].to(x.device)
        x_hat, mu, logvar = model(x, eps)
        return negative_elbo(x, x_hat, mu, logvar, self.tc.beta)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, reconstruction, kl = self.terms(model, batch, draw)
        return loss.mean(), {"volumes": len(loss), "loss": float(loss.detach().sum()),
                             "reconstruction": float(reconstruction.detach().sum()), "kl": float(kl.detach().sum())}

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draw: AugmentDraw | None) -> tuple[torch.Tensor, int, int]:
        loss, _, _ = self.terms(model, batch, draw)
        return loss.mean(), 0, 0

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        volumes = sums.get("volumes", 0.0)
        return {k: sums.get(k, 0.0) / volumes if volumes else float("nan") for k in self.columns} | {"samples": volumes}

    def progress(self, stats: dict[str, float]) -> dict[str, str]:
        n = max(stats["volumes"], 1)
        return {"loss": f"{stats['loss'] / n:.4f}", "kl": f"{stats['kl'] / n:.5f}"}

    def describe(self, row: dict[str, Any]) -> str:
        return f"loss {row['loss']:.4f} (reconstruction {row['reconstruction']:.4f}, KL {row['kl']:.5f} per voxel)"

    @classmethod
    def item_scores(cls, net: nn.Module, store: VolumeStore, rows: np.ndarray, tc: TaskConfig, ranges: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        r2, first, second = [], [], []
        for start in range(0, len(rows), batch_size):
            x = torch.from_numpy(store.load(rows[start:start + batch_size])).float()
            x_hat, mu, _ = net(x, None)
            residual = (x - x_hat).pow(2).flatten(1).sum(1)
            spread = (x - x.flatten(1).mean(1).view(-1, 1, 1, 1)).pow(2).flatten(1).sum(1).clamp_min(1e-12)
            r2.append((1 - residual / spread).clamp(0, 1).numpy())
            a, _ = two_views(x, torch.arange(start, start + len(x)), ranges, None)
            first.append(mu)
            second.append(net.posterior(a)[0])
        if not len(rows):
            return np.zeros(0), np.zeros(0)
        distance = torch.cdist(torch.cat(second), torch.cat(first))   # each augmented view against every volume
        found = (distance.min(dim=1).values >= distance.diagonal()).float().numpy()   # a tie counts as found
        return found, np.concatenate(r2)

    @classmethod
    def chance_of(cls, tc: TaskConfig, n: int) -> float | None:
        return 1 / n if n else None
