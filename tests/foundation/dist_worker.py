"""Run under torchrun with 2 gloo processes: checks the distributed helpers against single-process maths."""

from __future__ import annotations

import sys

import torch

from pathssl_cli.distributed import (
    all_reduce_sum,
    all_reduce_sum_with_grad,
    cleanup_distributed,
    gather_with_grad,
    init_distributed,
)


def main() -> None:
    info = init_distributed("cpu")
    assert info.world_size == 2 and info.enabled and info.device.type == "cpu"
    torch.manual_seed(0)
    full = torch.randn(4, 3)  # the same global batch on both ranks
    weights = torch.randn(8, 3)
    local = full[info.rank * 2:(info.rank + 1) * 2].clone().requires_grad_(True)
    gathered = gather_with_grad(local)
    assert torch.equal(gathered.detach(), full)
    # loss over the global batch; each rank back-propagates its own copy, so local grads sum over ranks
    loss = (gathered.repeat(2, 1) * weights).sum() ** 2 / 2
    loss.backward()
    reference = full.clone().requires_grad_(True)
    ((reference.repeat(2, 1) * weights).sum() ** 2 / 2).backward()
    expected = reference.grad[info.rank * 2:(info.rank + 1) * 2] * 2  # both ranks' losses contribute
    assert torch.allclose(local.grad, expected, atol=1e-5), (local.grad, expected)
    total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    assert total.item() == 3.0
    x = torch.tensor([float(info.rank + 1)], requires_grad=True)
    (all_reduce_sum_with_grad(x) * 2).sum().backward()
    assert x.grad.item() == 4.0  # d/dx of 2 * sum over ranks, summed over both ranks' losses
    cleanup_distributed()
    print(f"rank {info.rank} ok")


if __name__ == "__main__":
    sys.exit(main())
