"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Matches facebookresearch/swav `main_swav.py` and `src/resnet50.py`: backbone → projection head (BN) → L2
normalisation → prototypes (a bias-free linear layer, rows L2-normalised every step); codes from
Sinkhorn-Knopp (ε 0.05, 3 iterations, sums all-reduced) on the crops in `crops_for_assign`, optionally with
a feature queue; swapped prediction at temperature 0.1 from every other crop; prototypes frozen for the first
epoch.

Queue: swav keeps a per-rank queue of `queue_length / world_size` features. Here every rank keeps the same
global queue (features gathered from all ranks, newest first) and feeds Sinkhorn its own 1/W slice of it. The
Sinkhorn input over all ranks is the same set of columns as swav's, so the codes are identical, while the
buffer stays the same on every rank (DDP's buffer broadcast is harmless) and checkpoints do not depend on
the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.base import (
    METHODS,
    MethodOptions,
    SSLMethod,
    all_reduce_max,
    all_reduce_sum,
    backbone_multicrop,
    gather_no_grad,
    rank,
    without_autocast,
    world_size,
)
from pathssl_cli.methods.heads import SwAVHead


class SwAVOptions(MethodOptions):
    name: Literal["swav"] = "swav"
    hidden_dim: int = Field(
        default=2048, gt=0,
        description="Projection head hidden width (features); swav `hidden_mlp` 2048 for ResNet-50.",
    )
    out_dim: int = Field(
        default=128, gt=0,
        description="Embedding width (features); swav `--feat_dim` 128.",
    )
    n_prototypes: int = Field(
        default=3000, gt=0,
        description="Number of prototypes (clusters); swav `--nmb_prototypes` 3000 for ImageNet.",
    )
    temperature: float = Field(
        default=0.1, gt=0,
        description="Softmax temperature of the swapped prediction (unitless); swav `--temperature 0.1`.",
    )
    epsilon: float = Field(
        default=0.05, gt=0,
        description="Entropic regularisation of Sinkhorn-Knopp (unitless); swav `--epsilon 0.05`.",
    )
    sinkhorn_iterations: int = Field(
        default=3, ge=1,
        description="Sinkhorn-Knopp iterations; swav default 3.",
    )
    n_global_crops: int = Field(
        default=2, ge=2,
        description="High-resolution crops per image (views); swav `--nmb_crops 2 6`.",
    )
    n_local_crops: int = Field(
        default=6, ge=0,
        description="Low-resolution crops per image (views); swav `--nmb_crops 2 6` (2×224 + 6×96).",
    )
    crops_for_assign: tuple[int, ...] = Field(
        default=(0, 1), min_length=1,
        description="Indices of the crops whose codes are computed (views); swav `--crops_for_assign 0 1`.",
    )
    queue_length: int = Field(
        default=3840, ge=0,
        description=(
            "Features kept for Sinkhorn over all ranks (features; 0 = no queue); swav `--queue_length 3840` "
            "for batch 256."
        ),
    )
    queue_start_epoch: int = Field(
        default=15, ge=0,
        description=(
            "Epoch from which the queue is filled and, once full, used (epochs); swav `--epoch_queue_starts "
            "15`."
        ),
    )
    freeze_prototypes_epochs: float = Field(
        default=1.0, ge=0,
        description=(
            "Epochs during which prototypes get no update (epochs); swav freezes them for 313 iterations = 1 "
            "epoch at batch 4096."
        ),
    )

    @model_validator(mode="after")
    def _assign_global_crops(self) -> SwAVOptions:
        if any(not 0 <= c < self.n_global_crops for c in self.crops_for_assign):
            raise ValueError(f"crops_for_assign {list(self.crops_for_assign)} must index the global crops "
                             f"0..{self.n_global_crops - 1}; set crops_for_assign = [0, 1]")
        return self


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float, n_iterations: int) -> Tensor:
    """Soft codes by Sinkhorn-Knopp (Cuturi 2013; swav `distributed_sinkhorn`).

    scores (B, K): prototype scores of this rank's B samples. Q = exp(scores / ε)ᵀ is scaled, `n_iterations`
    times, so prototypes (rows) get equal mass 1/K, then samples (columns) equal mass 1/B_total; all sums are
    over all ranks' samples (all-reduced). Returns (B, K) codes whose rows sum to 1. Computed in float32 (or
    wider), after subtracting the global maximum score, which the first normalisation cancels exactly.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float32 at least, as under AMP
    top = all_reduce_max(scores.max())
    q = torch.exp((scores - top) / epsilon).T  # (K, B)
    n_prototypes = q.shape[0]
    n_samples_total = all_reduce_sum(q.new_tensor(float(q.shape[1])))
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q *= (1.0 / n_prototypes / all_reduce_sum(q.sum(dim=1))).unsqueeze(1)
        q *= (1.0 / n_samples_total / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).T


def swav_loss(scores: Tensor, codes: Tensor, crops_for_assign: Sequence[int], temperature: float) -> Tensor:
    """Swapped prediction (swav `main_swav.py` `train`).

    scores (V, B, K): prototype scores of every crop; codes (A, B, K): Sinkhorn codes of the crops
    `crops_for_assign` (len A). For each assigned crop a, the mean over the other V−1 crops v of
    −mean_b Σ_k codes[a,b,k] log softmax(scores[v,b] / T)_k; then the mean over assigned crops.
    """
    log_probs = F.log_softmax(scores / temperature, dim=-1)
    n_views = scores.shape[0]
    total = scores.new_zeros(())
    for a, crop in enumerate(crops_for_assign):
        others = [v for v in range(n_views) if v != crop]
        cross = -(codes[a].unsqueeze(0) * log_probs[others]).sum(dim=-1)  # (V-1, B)
        total = total + cross.mean()
    return total / len(crops_for_assign)


@METHODS.register("swav")
class SwAV(SSLMethod):
    options_model = SwAVOptions
    options: SwAVOptions
    # swav `main_swav.py`: LARC(SGD(model.parameters(), weight_decay=wd)) decays and adapts every parameter
    exclude_bias_and_norm = False
    queue: Tensor  # (len(crops_for_assign), queue_length, out_dim) embeddings of all ranks, newest first

    def __init__(self, backbone: Backbone, options: SwAVOptions, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.n_global_views, self.n_local_views = options.n_global_crops, options.n_local_crops
        self.head = SwAVHead(backbone.feature_dim, options.hidden_dim, options.out_dim)
        self.prototypes = nn.Linear(options.out_dim, options.n_prototypes, bias=False)
        self.normalize_prototypes()
        n_assign = len(options.crops_for_assign)
        self.register_buffer("queue", torch.zeros(n_assign, options.queue_length, options.out_dim))
        self.freeze_prototypes_steps = round(options.freeze_prototypes_epochs * steps_per_epoch)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))

    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_views(views)
        batch = views[0].shape[0]
        embedding = F.normalize(self.head(backbone_multicrop(self.backbone, views)), dim=1, p=2)
        scores = self.prototypes(embedding)  # (V·B, K)
        fill_queue = (self.training and self.options.queue_length > 0
                      and self.epoch_of(step) >= self.options.queue_start_epoch)
        codes, used_queue = [], False
        with torch.no_grad():
            for a, crop in enumerate(self.options.crops_for_assign):
                crop_scores = scores[crop * batch:(crop + 1) * batch].detach()
                queue = self.queue[a]
                if fill_queue and not torch.all(queue[-1] == 0):  # swav: used once full
                    mine = torch.tensor_split(queue, world_size())[rank()]
                    with without_autocast(mine):
                        queue_scores = mine @ self.prototypes.weight.T
                    crop_scores = torch.cat([queue_scores, crop_scores.to(queue_scores.dtype)])
                    used_queue = True
                codes.append(sinkhorn_knopp(crop_scores, self.options.epsilon,
                                            self.options.sinkhorn_iterations)[-batch:])
                if fill_queue:
                    newest = gather_no_grad(embedding[crop * batch:(crop + 1) * batch].detach())
                    queue.copy_(torch.cat([newest, queue])[:queue.shape[0]])
        loss = swav_loss(scores.view(len(views), batch, -1), torch.stack(codes),
                         self.options.crops_for_assign, self.options.temperature)
        return loss, {"queue_used": float(used_queue)}

    def on_before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def on_after_optimizer_step(self, step: int) -> None:
        self.normalize_prototypes()
