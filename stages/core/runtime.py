"""Where a training loop runs: the one device choice of every loop of the project (pretraining, end-to-end probes,
the supervised encoder, the localiser)."""

from __future__ import annotations

import torch


def select_device(requested: str, key: str = "device", local_rank: int = 0) -> torch.device:
    """CUDA (GPU ``local_rank``) when ``requested`` is ``cuda`` or, with ``auto``, when one is present; else the CPU.
    ``key`` names the config key in the error raised when ``cuda`` is asked for and PyTorch sees no GPU."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{key} must be auto, cuda or cpu, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key} is cuda but PyTorch sees no GPU (torch.cuda.is_available() is False)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
