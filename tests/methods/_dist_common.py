"""Shared by the 2-process torchrun script and the single-process reference: tiny methods on a BN-free
backbone
(vit_tiny; the heads' BatchNorm is global-batch), a fixed global batch per step, and a few plain SGD steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathssl_cli.backbones import create_backbone
from pathssl_cli.distributed import all_reduce_sum, gather_no_grad
from pathssl_cli.methods import (
    BarlowTwinsOptions,
    DINOOptions,
    DINOv2Options,
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
METHOD_NAMES = ("mocov2", "swav", "barlow_twins", "barlow_twins_exact", "dino", "dinov2", "dinov2_sinkhorn")


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
    if name.startswith("dinov2"):
        # KoLeo is off: dinov2 computes it within each rank's batch (nearest neighbours among local rows), so
        # it is not a function of the global batch; its parts are checked on their own (dinov2_pure_case)
        head = {"head_n_prototypes": 40, "head_hidden_dim": 32, "head_bottleneck_dim": 16}
        return DINOv2Options(dino={**head, "koleo_loss_weight": 0.0}, ibot={**head, "separate_head": True},
                             n_local_crops=2, teacher={"warmup_teacher_temp_epochs": 2, "momentum_teacher": 0.9},
                             clip_grad=0.05, centering="sinkhorn_knopp" if name.endswith("sinkhorn") else
                             "centering")
    raise ValueError(name)


class FixedMasks:
    """dinov2 masks that are the same whatever the world size: per global crop, a random pattern for half the
    global batch, repeated for the other half, so both ranks of a 2-process run hold as many masked patches
    (dinov2's iBOT centre averages per-rank means, which equals the global mean only then)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.calls = rank, world, 0

    def __call__(self, n_crops: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        generator = torch.Generator().manual_seed(50 + self.calls)
        self.calls += 1
        pattern = torch.rand(2, GLOBAL_BATCH // 2, grid[0] * grid[1], generator=generator) < 0.3
        local = GLOBAL_BATCH // self.world
        crops = [torch.cat([p, p])[self.rank * local:(self.rank + 1) * local] for p in pattern]
        return torch.cat(crops).to(device)


def build(name: str, rank: int = 0, world: int = 1) -> SSLMethod:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny")
    method = create_method(backbone, tiny_options(name), steps_per_epoch=1, total_steps=N_STEPS + 2)
    if name.startswith("dinov2"):
        method._masks = FixedMasks(rank, world)  # type: ignore[method-assign]
    return method


def dinov2_pure_case(rank: int = 0, world: int = 1) -> dict[str, Tensor]:
    """dinov2's world-size-aware pure functions on this rank's share of fixed inputs, gathered: Sinkhorn-Knopp
    of CLS logits (n = B × W) and of masked-patch logits split unevenly (6 + 4 rows, n = the all-reduced count),
    and both centres over two steps ((B, K) and (B, T, K), B rows per rank)."""
    from pathssl_cli.methods.dinov2 import sinkhorn_knopp_teacher, update_center

    generator = torch.Generator().manual_seed(3)
    cls = torch.randn(2, GLOBAL_BATCH, 6, generator=generator)
    patches = torch.randn(2, GLOBAL_BATCH, 5, 6, generator=generator)
    masked = torch.randn(10, 6, generator=generator)
    local = GLOBAL_BATCH // world
    mine = slice(rank * local, (rank + 1) * local)
    cuts = [0, 6, 10] if world == 2 else [0, 10]
    my_masked = masked[cuts[rank]:cuts[rank + 1]]
    n_masked = all_reduce_sum(torch.tensor([float(len(my_masked))]))
    sk_masked = sinkhorn_knopp_teacher(my_masked, 0.05, n_samples=n_masked)
    padded = torch.zeros(10, 6)  # all_gather needs equal shapes: pad each rank's rows to 10
    padded[:len(sk_masked)] = sk_masked
    gathered = gather_no_grad(padded).view(world, 10, 6)
    sk_masked_all = torch.cat([gathered[r, :cuts[r + 1] - cuts[r]] for r in range(world)])
    out = {"sk_cls": gather_no_grad(sinkhorn_knopp_teacher(cls[0, mine], 0.04)), "sk_masked": sk_masked_all}
    center, patch_center = torch.zeros(1, 6), torch.zeros(1, 1, 6)
    for step in range(2):
        center = update_center(center, cls[step, mine], 0.9)
        patch_center = update_center(patch_center, patches[step, mine], 0.9)
    out.update(center=center, patch_center=patch_center, n_masked=n_masked)
    return out


def global_views(method: SSLMethod, step: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    sizes = [32] * method.n_global_views + [16] * method.n_local_views
    return [torch.randn(GLOBAL_BATCH, 3, s, s, generator=generator) for s in sizes]


def run_steps(name: str, rank: int = 0, world: int = 1,
              wrap: type[nn.Module] | None = None, lr: float = LR) -> dict[str, object]:
    """N_STEPS of plain SGD (`lr`) on this rank's contiguous share of each global batch. Returns per-step
    global losses (mean over ranks of each rank's loss), the averaged gradients, and the final state dict."""
    method = build(name, rank, world)
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
