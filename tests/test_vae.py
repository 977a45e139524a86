"""The generative baseline, a 3D variational autoencoder: its loss against Kingma and Welling's equations, its
decoder's shapes, and a run through the pretraining stage with its pretext evaluation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from ssl_data import store_files, write_ssl_data

from stages.nets.encoders import load_encoder
from stages.training.harness import Outputs
from stages.training.methods.vae import Decoder, VaeMethod, kl_divergence, negative_elbo
from stages.training.store import VolumeStore


def test_kl_is_the_closed_form_of_a_diagonal_gaussian_from_the_standard_normal():
    # Kingma & Welling 2014, appendix B: -D_KL(q(z) || p(z)) = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl_divergence(mu, logvar), reference, atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))   # q = p


def test_negative_elbo_per_voxel_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, np.log(2.0)]])
    kl = -0.5 * ((1 + 0 - 1 - 1) + (1 + np.log(2.0) - 0 - 2))      # the paper's sum over the two dimensions
    loss, reconstruction, kl_term = negative_elbo(x, x_hat, mu, logvar, beta=2.0)
    assert reconstruction.item() == pytest.approx(5 / 4) and kl_term.item() == pytest.approx(kl / 4)
    assert loss.item() == pytest.approx((5 + 2 * kl) / 4)


@pytest.mark.parametrize("shape", [(5, 48, 48), (5, 43, 48), (9, 30, 17)])
def test_the_decoder_gives_the_volume_s_shape(shape):
    assert Decoder(8, shape, 16)(torch.randn(3, 8)).shape == (3, *shape)


def test_the_vae_trains_in_the_harness_and_its_pretext_evaluation_scores_the_reconstruction(tmp_path):
    data = write_ssl_data(tmp_path / "data", n_subjects=12)
    out = tmp_path / "vae"
    args = [sys.executable, "-m", "stages.pretrain", "--method", "vae", "--width", "0.125", "--embedding-dim", "16",
            "--threads", "1", "--device", "cpu", "--checkpoint-every", "2", "--vae-batch-size", "8",
            "--vae-latent-dim", "8", "--vae-decoder-channels", "8", "--vae-max-epochs", "4",
            "--vae-learning-rate", "0.003"]
    for option, path in {**store_files(data), **dataclasses.asdict(Outputs.under(out))}.items():
        args += [f"--{option.replace('_', '-')}", str(path)]
    run = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"loss", "reconstruction", "kl"} <= set(metrics.columns)
    train = metrics[metrics.split == "train"].sort_values("epoch")
    assert train.loss.iloc[-1] < train.loss.iloc[0]                      # it learns to reproduce the volumes
    assert np.allclose(train.loss, train.reconstruction + train.kl, rtol=1e-4)   # beta 1
    encoder, saved = load_encoder(out / "encoder.pt")
    assert saved["method"] == "vae" and encoder(torch.zeros(2, 5, 48, 48)).shape == (2, 16)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    store = VolumeStore(None, *list(store_files(data).values())[1:], structure="vertebra", allowed_parts=("test",))
    table, figures = VaeMethod.pretext(checkpoint, store, batch_size=8)
    assert len(table) == store.allowed.sum() > 0
    for name in ("trained", "untrained"):
        for column in ("view1_top1", "view2_top1"):
            assert table[f"{name}_{column}"].between(0, 1).all()
    assert figures["trained"]["reconstruction_r2"] > figures["untrained"]["reconstruction_r2"]
    assert figures["chance_top1"] == pytest.approx(1 / len(table))
