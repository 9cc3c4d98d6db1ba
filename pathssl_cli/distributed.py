"""torchrun environment → process group, and the collectives SSL losses need.

Gathers that feed a loss must keep gradients (`gather_with_grad`, `all_reduce_sum_with_grad`): a raw
`all_gather` silently drops the gradient of the other ranks' samples, which changes the loss gradient (lightly
found this the hard way).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' picks this rank's GPU when CUDA is present, else the CPU; 'cuda' is this rank's GPU.

    This rank's GPU is `local_rank`, by default torchrun's LOCAL_RANK (0 outside torchrun): every command
    resolves its device here, so N ranks on a node use N GPUs, not all cuda:0. An explicit 'cuda:K' is kept.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30),
                                device_id=target if target.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cleanup_distributed(*, synchronise: bool = True) -> None:
    """Tear down the process group; with `synchronise`, after a barrier.

    Without the barrier a rank that finishes first can destroy its gloo/nccl group while a peer's last
    collective is still in flight, which aborts the peer at exit ("terminate called without an active
    exception", SIGABRT) under load even though its work succeeded. After a failure pass `synchronise=False`:
    the other ranks may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[DistInfo]:
    """`init_distributed` for the block; on leaving it, the group is torn down (synchronised only on success)."""
    info = init_distributed(device)
    try:
        yield info
    except BaseException:
        cleanup_distributed(synchronise=False)
        raise
    cleanup_distributed()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's slice
    (SimCLR's and solo-learn's GatherLayer). Only all_gather and all_reduce, which every backend has: torch's
    `torch.distributed.nn` version (deprecated) emulates gloo's missing reduce-scatter with chains of scatters,
    and 2-process gloo runs using it aborted at exit in 4 of 10 tries ("terminate called without an active
    exception")."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's loss depends on every input, so the gradient is the sum over ranks too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping the gradient path to every rank's input."""
    if not is_distributed():
        return x
    gathered: torch.Tensor = _GatherWithGrad.apply(x.contiguous())
    return gathered.flatten(0, 1)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (for queues and statistics; no gradient)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks as a new tensor (no gradient): for Sinkhorn sums, DINO centres, statistics."""
    if not is_distributed():
        return x.clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (e.g. Barlow Twins' cross-correlation summed over the global batch)."""
    if not is_distributed():
        return x
    summed: torch.Tensor = _AllReduceSumWithGrad.apply(x)
    return summed


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """One autocast context for every precision: fp32 is a no-op, so the loop has no duplicated branches."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Let rank 0 do a one-time job (cache, download-free preparation) before the other ranks read it."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()
