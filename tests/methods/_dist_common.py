"""Shared by the 2-process torchrun script and the single-process reference: tiny methods on a BN-free
backbone
(vit_tiny; the heads' BatchNorm is global-batch), a fixed global batch per step, and a few plain SGD steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathssl_cli.backbones import create_backbone
from pathssl_cli.methods import (
    BarlowTwinsOptions,
    DINOOptions,
    MethodOptions,
    MoCoV2Options,
    SSLMethod,
    SwAVOptions,
    create_method,
)

GLOBAL_BATCH = 8
N_STEPS = 2
LR = 0.5
# barlow_twins: barlowtwins' raw all_reduce (the default), 1/W of the single-process gradient under DDP;
# barlow_twins_exact: the gradient-carrying variant, equal to the single-process gradient
METHOD_NAMES = ("mocov2", "swav", "barlow_twins", "barlow_twins_exact", "dino")


def tiny_options(name: str) -> MethodOptions:
    """Small heads; every stateful feature switched on within two steps (queues used at step 1, frozen
    prototypes / last layer at step 0 only, teacher temperature changing between epochs)."""
    if name == "mocov2":
        return MoCoV2Options(hidden_dim=32, out_dim=16, queue_size=12, momentum=0.9, symmetric=True)
    if name == "swav":
        return SwAVOptions(hidden_dim=32, out_dim=16, n_prototypes=10, n_local_crops=2, queue_length=8,
                           queue_start_epoch=0, freeze_prototypes_epochs=1)
    if name == "barlow_twins":
        return BarlowTwinsOptions(projector_dims=(32, 24))
    if name == "barlow_twins_exact":
        return BarlowTwinsOptions(projector_dims=(32, 24), ddp_gradient="exact")
    if name == "dino":
        return DINOOptions(out_dim=40, hidden_dim=32, bottleneck_dim=16, n_local_crops=2, use_bn_in_head=True,
                           norm_last_layer=False, warmup_teacher_temp_epochs=2, momentum_teacher=0.9,
                           clip_grad=0.05)
    raise ValueError(name)


def build(name: str) -> SSLMethod:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny")
    return create_method(backbone, tiny_options(name), steps_per_epoch=1, total_steps=N_STEPS + 2)


def global_views(method: SSLMethod, step: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    sizes = [32] * method.n_global_views + [16] * method.n_local_views
    return [torch.randn(GLOBAL_BATCH, 3, s, s, generator=generator) for s in sizes]


def run_steps(name: str, rank: int = 0, world: int = 1,
              wrap: type[nn.Module] | None = None, lr: float = LR) -> dict[str, object]:
    """N_STEPS of plain SGD (`lr`) on this rank's contiguous share of each global batch. Returns per-step
    global losses (mean over ranks of each rank's loss), the averaged gradients, and the final state dict."""
    method = build(name)
    model = wrap(method) if wrap is not None else method
    local = GLOBAL_BATCH // world
    losses, grads = [], []
    for step in range(N_STEPS):
        views = [v[rank * local:(rank + 1) * local] for v in global_views(method, step)]
        loss, _ = model(views, step)
        loss.backward()
        method.on_before_optimizer_step(step)
        step_grads = {}
        with torch.no_grad():
            for pname, p in method.named_parameters():
                if p.grad is not None:
                    step_grads[pname] = p.grad.clone()
                    p.sub_(lr * p.grad)
                    p.grad = None
        method.on_after_optimizer_step(step)
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
        grads.append(step_grads)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state}


def shuffle_bn_case() -> tuple[SSLMethod, Tensor]:
    """MoCo v2 on a BatchNorm backbone and a fixed global batch of images, for the shuffle-BN check."""
    torch.manual_seed(0)
    method = create_method(create_backbone("resnet_tiny"), tiny_options("mocov2"), steps_per_epoch=1,
                           total_steps=N_STEPS)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return method, images
