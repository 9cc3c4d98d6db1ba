"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

Matches facebookresearch/barlowtwins `main.py`: projector 8192-8192-8192 (Linear without bias → BN → ReLU,
last Linear without bias), each view projected separately, embeddings normalised by an affine-free BatchNorm
over the global batch, cross-correlation summed over ranks and divided by the global batch size, loss
Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij² with λ = 0.0051.
The LARS learning rates for weights / biases and norms are the optimiser's (`param_groups` marks the split).

Gradient under DDP with W processes (`ddp_gradient`):
- "official" (default): barlowtwins sums C with a raw `torch.distributed.all_reduce`, so each rank's backward
  sees only its own samples' share of C, and DDP's *average* of the ranks' gradients is the single-process
  gradient of the global-batch loss divided by W. The cited hyper-parameters (LARS lr 0.2 / 0.0048 per 256
  images, tuned on 32 GPUs) were tuned with that gradient; LARS normalises it away for weights, but biases
  and norm parameters (excluded from LARS adaptation) step with it as is. So this is the default, and the
  recipe means what it meant. One process: W = 1, both variants agree.
- "exact": a gradient-carrying all-reduce, whose backward sums the W identical upstream gradients, so DDP's
  averaged gradient equals the single-process gradient for any W (W × the official one).
The global-batch BatchNorm statistics carry gradients in both (as barlowtwins' SyncBatchNorm does).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.base import (
    METHODS,
    MethodOptions,
    SSLMethod,
    all_reduce_sum,
    all_reduce_sum_with_grad,
    without_autocast,
)
from pathssl_cli.methods.heads import BarlowTwinsHead

BN_EPS = 1e-5  # nn.BatchNorm1d's default, which barlowtwins' `self.bn` uses


class BarlowTwinsOptions(MethodOptions):
    name: Literal["barlow_twins"] = "barlow_twins"
    projector_dims: tuple[int, ...] = Field(
        default=(8192, 8192, 8192), min_length=1,
        description="Projector layer widths (features); barlowtwins `--projector 8192-8192-8192`.",
    )
    lambd: float = Field(
        default=0.0051, ge=0,
        description="Weight of the off-diagonal (redundancy) term (unitless); barlowtwins `--lambd 0.0051`.",
    )
    ddp_gradient: Literal["official", "exact"] = Field(
        default="official",
        description=(
            "Gradient under DDP with W processes: 'official' = barlowtwins' raw all_reduce of C, whose "
            "DDP-averaged gradient is the single-process gradient / W (what its hyper-parameters were tuned "
            "with); 'exact' = the single-process gradient for any W. Identical in one process."
        ),
    )


def global_batch_standardize(z: Tensor) -> Tensor:
    """(z − mean) / sqrt(var + 1e-5) per feature, mean and biased var over the global batch (all ranks), with
    gradients, i.e. `nn.BatchNorm1d(affine=False)` in training mode over the global batch. z: (B_local, D)."""
    count = all_reduce_sum(z.new_tensor(float(z.shape[0])))
    mean = all_reduce_sum_with_grad(z.sum(dim=0)) / count
    var = all_reduce_sum_with_grad(((z - mean) ** 2).sum(dim=0)) / count
    return (z - mean) / torch.sqrt(var + BN_EPS)


def off_diagonal(matrix: Tensor) -> Tensor:
    """The off-diagonal entries of a square (n, n) matrix, flattened (n·(n−1),)."""
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def all_reduce_sum_local_grad(x: Tensor) -> Tensor:
    """Sum of `x` over ranks whose gradient flows to this rank's `x` only, as a raw in-place
    `torch.distributed.all_reduce` inside a graph (barlowtwins `main.py`): value Σ_r x_r, gradient ∂/∂x_local."""
    return x + (all_reduce_sum(x) - x).detach()


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float,
                      ddp_gradient: Literal["official", "exact"] = "official") -> Tensor:
    """Barlow Twins loss (barlowtwins `main.py` `BarlowTwins.forward`).

    z1, z2 (B_local, D): projector outputs of the two views on this rank. C = BN(z1)ᵀ BN(z2) / N summed over
    ranks (N the global batch), loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². The same scalar on every rank.
    `ddp_gradient` (see the module docstring): "official" sums C as barlowtwins' raw all_reduce (DDP's
    averaged gradient = single-process gradient / W); "exact" keeps the other ranks' gradient paths.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with without_autocast(z1):  # D² sums of N products: float32 even under bf16/fp16 autocast
        z1 = global_batch_standardize(z1.to(dtype))
        z2 = global_batch_standardize(z2.to(dtype))
        count = all_reduce_sum(z1.new_tensor(float(z1.shape[0])))
        reduce = all_reduce_sum_with_grad if ddp_gradient == "exact" else all_reduce_sum_local_grad
        c = reduce(z1.T @ z2) / count
        on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
        return on_diagonal + lambd * off_diagonal(c).pow(2).sum()


@METHODS.register("barlow_twins")
class BarlowTwins(SSLMethod):
    options_model = BarlowTwinsOptions
    options: BarlowTwinsOptions

    def __init__(self, backbone: Backbone, options: BarlowTwinsOptions, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.n_global_views, self.n_local_views = 2, 0
        self.projector = BarlowTwinsHead(backbone.feature_dim, options.projector_dims)

    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_views(views)
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        return barlow_twins_loss(z1, z2, self.options.lambd, self.options.ddp_gradient), {}
