"""A pretraining run killed part way: started, watched through its rolling checkpoint, and killed with SIGKILL once
the checkpoint has reached a step (tests/test_pretrain.py and tests/test_simclr.py resume it)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch


def kill_at_step(args: list[str], resume: Path, step: int, cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 300) -> int:
    """Run ``args``; SIGKILL it as soon as ``resume`` (its rolling checkpoint) records ``step`` optimiser steps or
    more, and return that step. Fails the test when the run finishes or times out first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if resume.exists():
                try:
                    reached = torch.load(resume, weights_only=False)["state"]["step"]
                except (EOFError, RuntimeError):   # replaced while being read
                    continue
                if reached >= step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    assert proc.returncode == -signal.SIGKILL
                    return reached
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError("the run finished (or timed out) before it could be killed")
