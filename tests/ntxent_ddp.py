"""Run by tests/test_simclr.py under torchrun (2 gloo processes): each process takes its half of a fixed global batch,
computes the NT-Xent loss with the views of every process as negatives through a DDP-wrapped network, and steps
backward; rank 0 saves its loss and the (DDP-averaged) gradient beside the loss of rank 1 to ``argv[1]``."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from stages.training.ntxent import NTXentLoss


def batch_and_model() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The global batch (two views of 8 images, 6 features) and the network, the same on every process."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
    torch.manual_seed(1)
    return a, b, nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    a, b, net = batch_and_model()
    model = nn.parallel.DistributedDataParallel(net)
    share = slice(rank * len(a) // size, (rank + 1) * len(a) // size)
    z = model(torch.cat([a[share], b[share]]))
    n = share.stop - share.start
    loss, top1 = NTXentLoss(0.5)(z[:n], z[n:], gather_views=True)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(size)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "grads": {k: p.grad for k, p in net.named_parameters()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
