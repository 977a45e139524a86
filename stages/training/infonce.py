"""The losses of the momentum-encoder family, with keys gathered from every training process.

InfoNCE with a queue (Oord et al. 2018; MoCo, He et al. 2020, eq. 1; the loss Cao et al. 2022 write as
L_N(v1, v2) = -E[ log e^{h(v1^i, v2^i)} / sum_{j=1}^{K+1} e^{h(v1^i, v2^j)} ]): for each query, the logits are its
similarity to its own key (the positive) and to the K keys of the queue (the negatives); h(u, v) = cos(u, v) / tau,
MoCo v2's (the seed leaves h open). A queue entry may be excluded from a query's negatives (:func:`own_keys`: a key of
the query's own sample from an earlier epoch, which is not a negative of it); an excluded entry does not enter the
denominator.

Supervised contrastive InfoNCE (Khosla et al. 2020, L_out, eq. 2), the longitudinal loss: each query has a set of
positive keys P(i) among its candidates A(i) (the keys of the batch and of the queue),
L_i = -1/|P(i)| sum_{p in P(i)} log( e^{h(q_i, k_p)} / sum_{a in A(i)} e^{h(q_i, k_a)} ), with the same h.

BYOL (Grill et al. 2020, eq. 2): L = 2 - 2 cos(p, z'), the online prediction against the target projection.

Several processes (DDP): the keys of every process are gathered (:func:`gather_keys`, no gradient: keys come from
the target network) in rank order before they enter the queue, so every process holds the same queue and the run
equals one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.training.ntxent import gather


def gather_keys(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` (no gradient) concatenated in rank order; ``x`` itself with one process."""
    return gather(x.detach())[0]


def own_keys(query_ids: torch.Tensor, queue_ids: torch.Tensor) -> torch.Tensor:
    """``(n, K)``: whether queue entry k came from query i's own sample (a key of it from an earlier step)."""
    return query_ids.view(-1, 1) == queue_ids.view(1, -1)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean InfoNCE loss of queries ``q`` ``(n, D)`` with positive keys ``k`` ``(n, D)`` (row i of each is one
    sample) against the negatives ``queue`` ``(K, D)``, with h = cosine / ``temperature``; ``exclude`` ``(n, K)``
    takes queue entries out of a query's denominator. Returns the loss and the share of queries whose positive has
    the highest logit (top-1; a tie goes to the positive)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.shape != k.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"expected q and k (n, D) and a queue (K, D), got {tuple(q.shape)}, {tuple(k.shape)} and "
                         f"{tuple(queue.shape)}")
    q, k, queue = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1), F.normalize(queue.float(), dim=1)
    positive = (q * k).sum(1, keepdim=True)                   # (n, 1)
    negative = q @ queue.T                                    # (n, K)
    if exclude is not None:
        negative = negative.masked_fill(exclude, float("-inf"))
    logits = torch.cat([positive, negative], 1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target)
    top1 = (logits[:, 1:].max(1).values <= logits[:, 0]).float().mean() if queue.shape[0] else torch.ones(())
    return loss, top1


def supervised_info_nce(q: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, temperature: float,
                        exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean supervised-contrastive loss (Khosla et al. 2020, L_out) of queries ``q`` ``(n, D)`` over the
    candidate ``keys`` ``(M, D)``: ``positive`` ``(n, M)`` marks each query's positives (at least one per query),
    ``exclude`` ``(n, M)`` candidates that are neither positive nor negative (left out of the denominator); h =
    cosine / ``temperature``. Returns the loss and the share of queries whose most similar candidate is a positive."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if positive.shape != (len(q), len(keys)) or not positive.any(1).all():
        raise ValueError("every query needs at least one positive among the candidates")
    logits = F.normalize(q.float(), dim=1) @ F.normalize(keys.float(), dim=1).T / temperature
    if exclude is not None:
        if (exclude & positive).any():
            raise ValueError("a candidate cannot be both positive and excluded")
        logits = logits.masked_fill(exclude, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = -(log_p.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()
    top1 = positive.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return loss, top1


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(p_i, z_i) over the rows (Grill et al. 2020, eq. 2); ``z`` carries no gradient."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"expected predictions and targets (n, D) of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def batch_top1(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The share of rows i whose most similar row of ``z`` (by cosine) is z_i: retrieval of the other view within the
    batch (a pretext figure for a method without negatives)."""
    sim = F.normalize(p.float(), dim=1) @ F.normalize(z.float(), dim=1).T
    return (sim.argmax(1) == torch.arange(len(p), device=p.device)).float().mean()
