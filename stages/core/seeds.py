"""Every seed the project derives, written down once, and the one helper that seeds PyTorch.

A training loop never computes a seed in place: it calls one of the functions below with the config's seed and feeds
the result to :func:`seed_torch` (the global generator: initial weights, dropout masks) or :func:`generator` (a
private ``torch.Generator``: an order, an augmentation draw). Each derivation keeps the numbers of the runs made
before it was written down here; changing one changes every result downstream of it.

Pretraining (``pretrain.seed``, stages/training/harness.py) uses four: the initial weights, the dropout masks of each
process, the sample order of each epoch and the augmentation of each step. Each is a function of the seed and of
where the run stands (process, epoch, step) alone, so a resumed run, or one split among processes, draws the same.

Not here: the subsets chosen by a seeded hash where they are chosen (the probes' label subsets,
stages/evaluation/probe_data.py; the localiser's withheld subjects, stages/anatomy/localiser.py), and the numpy
generators of the demo cohort and the splits, which draw data, not training.
"""

from __future__ import annotations

from typing import Any

# Grad-CAM's seed (stages/gradcam.py): fixed, not a config key; it seeds the global generator before the explained
# model is loaded, so a re-run draws whatever it draws the same way.
GRADCAM = 0


def initial_weights(seed: int) -> int:
    """Pretraining's initial weights: the same on every process. Also the untrained network of the pretext
    evaluation and the random encoder of the probes (:func:`random_encoder`), built exactly as pretraining builds it."""
    return seed


def dropout(seed: int, rank: int) -> int:
    """Pretraining's dropout masks (the global generator after the model is built): one stream per process ``rank``,
    so processes draw different masks."""
    return seed + 1 + rank


def epoch_order(seed: int, epoch: int) -> int:
    """Pretraining's sample order of ``epoch`` (0-based): a function of (seed, epoch) alone, so a resumed run sees the
    same order."""
    return seed * 100_003 + epoch


def augmentation(seed: int, step: int) -> int:
    """Pretraining's augmentation of optimiser step ``step`` (0-based): drawn for the global batch, so every process
    (and a resumed run) draws the same."""
    return seed * 1_000_003 + step


def evaluation_views(first_sample: int) -> int:
    """The fixed views of an evaluation batch of a view-based method (simclr's validation and pretext test top-1):
    a function of the batch's first sample alone, so every epoch, and the trained and untrained networks, see the
    same views."""
    return 2_000_003 + first_sample


def random_encoder(seed: int) -> int:
    """The frozen random encoder of the probes (``pretrain.seed``): pretraining's network at its initial weights."""
    return initial_weights(seed)


def probe_job(seed: int, subset_seed: int) -> int:
    """A probe job (stages/probe.py): ``probes.seed`` and the job's label-subset seed; seeds its head (linear or MLP
    folds) and, for a model trained end to end, :func:`end_to_end`."""
    return seed * 1000 + subset_seed


def end_to_end(seed: int) -> int:
    """A network trained end to end (stages/nets/disc_net.py): its new layers' initial weights and, in a private
    generator, its epochs' sample order. ``seed`` is the fit's seed (:func:`probe_job`, or
    :func:`supervised_encoder`)."""
    return seed


def classifier_augmentation(seed: int) -> int:
    """A downstream classifier's on-the-fly augmentation (stages/training/classify.py, end to end), in a private
    generator; ``seed`` is the fit's seed."""
    return seed * 1_000_003 + 500_009


def view_choice(seed: int) -> int:
    """Which cached view each training sample of a transfer head reads per epoch (stages/training/classify.py)."""
    return seed * 1_000_003 + 700_001


def cached_views(seed: int) -> int:
    """The augmented views of every disc volume cached by stages/disc_features.py (``probe_training.seed``)."""
    return seed * 1_000_003 + 900_007


def supervised_encoder(seed: int) -> int:
    """The supervised-transfer encoder (stages/supervised.py, ``probes.seed``): its initial weights and its fit."""
    return seed


def localiser(seed: int) -> int:
    """The localiser (stages/anatomy/localiser.py, ``localise.seed``): its initial weights and, in a private
    generator, its epochs' sample order and intensity augmentation."""
    return seed


def seed_torch(seed: int) -> None:
    """Seed PyTorch's global generator (every device): what initial weights and dropout masks draw from."""
    import torch

    torch.manual_seed(seed)


def generator(seed: int, device: Any = None) -> Any:
    """A private ``torch.Generator`` on ``device`` (default: the CPU) seeded with ``seed``: draws from it leave the
    global generator alone."""
    import torch

    return torch.Generator(device=device or "cpu").manual_seed(seed)
