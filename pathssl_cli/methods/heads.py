"""Projection heads: one generic `ProjectionHead` built from (in, out, batchnorm, activation, bias) blocks,
and a thin subclass per method with the official layer layout (sizes are options, so tiny specs use small
dimensions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathssl_cli.methods.base import all_reduce_sum, all_reduce_sum_with_grad, world_size


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch (all ranks), gradients included.

    What `nn.SyncBatchNorm` does, but also on CPU/gloo (SyncBatchNorm refuses non-GPU tensors). In a single
    process it is exactly `nn.BatchNorm1d`. Running statistics use the global mean and unbiased variance.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        count = all_reduce_sum(x.new_tensor(float(x.shape[0])))
        mean = all_reduce_sum_with_grad(x.sum(dim=0)) / count
        var = all_reduce_sum_with_grad(((x - mean) ** 2).sum(dim=0)) / count  # biased, as BN normalises
        running_mean, running_var, batches = self.running_mean, self.running_var, self.num_batches_tracked
        if running_mean is not None and running_var is not None and batches is not None:
            with torch.no_grad():
                n = float(count.item())
                batches.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(batches.item())
                running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1.0, 1.0), alpha=m)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class Block(NamedTuple):
    in_dim: int
    out_dim: int
    batch_norm: bool
    activation: nn.Module | None
    bias: bool = True


class ProjectionHead(nn.Module):
    """Linear → [BatchNorm] → [activation] for each block, in order."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for block in blocks:
            layers.append(nn.Linear(block.in_dim, block.out_dim, bias=block.bias))
            if block.batch_norm:
                layers.append(GlobalBatchNorm1d(block.out_dim))
            if block.activation is not None:
                layers.append(block.activation)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MoCoV2Head(ProjectionHead):
    """moco `builder.py` with `--mlp`: Linear(d, d) → ReLU → Linear(d, 128), biases, no BatchNorm."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__([Block(in_dim, hidden_dim, False, nn.ReLU()),
                          Block(hidden_dim, out_dim, False, None)])


class SwAVHead(ProjectionHead):
    """swav `src/resnet50.py` `projection_head`: Linear(2048, 2048) → BN → ReLU → Linear(2048, 128)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__([Block(in_dim, hidden_dim, True, nn.ReLU()),
                          Block(hidden_dim, out_dim, False, None)])


class BarlowTwinsHead(ProjectionHead):
    """barlowtwins `main.py` projector: (Linear no bias → BN → ReLU) × (n-1), then Linear no bias
    (8192-8192-8192)."""

    def __init__(self, in_dim: int, dims: Sequence[int] = (8192, 8192, 8192)) -> None:
        sizes = [in_dim, *dims]
        blocks = [Block(sizes[i], sizes[i + 1], True, nn.ReLU(), bias=False) for i in range(len(sizes) - 2)]
        blocks.append(Block(sizes[-2], sizes[-1], False, None, bias=False))
        super().__init__(blocks)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight W = g · v / ‖v‖ per output row (Salimans & Kingma 2016), as dino's
    `nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))` with g filled with 1.
    With `fixed_norm` (dino `norm_last_layer=True`) g stays 1 and is not trained."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's default init, as dino leaves it
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """dino `vision_transformer.py` `DINOHead`: MLP (Linear → [BN] → GELU, n_layers) to a bottleneck, L2
    normalisation, then a weight-normalised bias-free last layer to `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        n_layers = max(n_layers, 1)
        if n_layers == 1:
            blocks = [Block(in_dim, bottleneck_dim, False, None)]
        else:
            blocks = [Block(in_dim, hidden_dim, use_bn, nn.GELU())]
            blocks += [Block(hidden_dim, hidden_dim, use_bn, nn.GELU()) for _ in range(n_layers - 2)]
            blocks.append(Block(hidden_dim, bottleneck_dim, False, None))
        self.mlp = ProjectionHead(blocks)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):  # dino `_init_weights`
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
