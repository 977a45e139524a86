"""The NT-Xent loss of SimCLR as Hou et al. 2023 write it (their eqs. 5-6), with the negatives of every training
process.

Eq. 5: P_ij = exp(<x_i, x_j> / tau) / sum_{k != i} exp(<x_i, x_k> / tau), over the 2n views x_1 .. x_2n of a batch of
n images (two views each). Eq. 6: L = -sum over positive pairs (i, j) of log P_ij, both orders of each pair. Their
similarity is the inner product, not the cosine of the original SimCLR: the vectors are not normalised here, and tau
is their Table 1's (100) unless configured. The sum is divided by the 2n ordered positive pairs (a mean), so the loss
and the learning rate do not scale with the batch.

Several processes (DDP): each process holds n_r images; the views of every process are gathered (with gradients, by
:class:`GatherWithGradients`) and serve as the k of eq. 5, so the denominators are those of the global batch. Each
process returns the mean over its own anchors; DDP averages the gradients, which gives exactly the gradient of the
global mean (tested: two gloo processes equal one process on the same global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class GatherWithGradients(torch.autograd.Function):
    """``all_gather`` of equal-shaped tensors whose backward hands each process the sum, over every process, of the
    gradients that reached its own slice (``torch.distributed``'s own ``all_gather`` keeps no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.size, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``x`` concatenated in rank order (with gradients), and where this process's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return GatherWithGradients.apply(x), dist.get_rank() * x.shape[0]


class NTXentLoss(nn.Module):
    """Eqs. 5-6 of Hou et al. 2023 (see the module's docstring).

    ``forward(a, b)``: ``a`` and ``b`` ``(n, D)``, the two views of this process's n images (row i of ``a`` and row i
    of ``b`` are one image); ``gather_views``: take the k of eq. 5 from every process (training under DDP). Returns
    the mean of -log P_ij over this process's 2n anchors, and the share of them whose positive has the highest
    similarity among all k != i (the top-1 of the pretext task)."""

    def __init__(self, temperature: float):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                gather_views: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"expected two views (n, D) of the same shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        n = a.shape[0]
        views = torch.cat([a, b]).float()                  # anchors: rows 0 .. n-1 view 1, n .. 2n-1 view 2
        keys, start = gather(views) if gather_views else (views, 0)
        logits = views @ keys.T / self.temperature         # (2n, K): <x_i, x_k> / tau
        anchors = torch.arange(2 * n, device=views.device)
        self_index = start + anchors
        logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float("-inf"))   # k != i
        positive = start + (anchors + n) % (2 * n)
        loss = F.cross_entropy(logits, positive)
        top1 = (logits.argmax(1) == positive).float().mean()
        return loss, top1
