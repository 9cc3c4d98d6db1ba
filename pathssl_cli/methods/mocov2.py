"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; He et al. 2020).

Matches facebookresearch/moco `moco/builder.py` and `main_moco.py` with `--mlp --moco-t 0.2 --aug-plus --cos`:
a query encoder and a momentum key encoder (backbone + 2-layer MLP head), a queue of 65,536 L2-normalised keys
gathered from all ranks, and InfoNCE with the positive logit at index 0.

Shuffle-BN: we do moco's gather → shuffle → encode → gather → unshuffle of the key batch across ranks
(`_batch_shuffle_ddp` / `_batch_unshuffle_ddp`), because it is what the paper and its numbers use, and SyncBN
would not stop the intra-batch leak that shuffle-BN exists to prevent (SyncBN statistics still come from the
same images as the positives). The permutation is drawn from a generator seeded with the step, so every rank
draws the same one without a broadcast, and a resumed run draws the same ones. In a single process shuffling
the batch cannot change BatchNorm statistics, so it is skipped (as moco, which only runs under DDP). With a
BN-free backbone (ViT) shuffle-BN is a no-op either way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.base import (
    METHODS,
    MethodOptions,
    SSLMethod,
    at_step,
    ema_update,
    frozen_copy,
    gather_no_grad,
    momentum_schedule,
    rank,
    without_autocast,
    world_size,
)
from pathssl_cli.methods.heads import MoCoV2Head


class MoCoV2Options(MethodOptions):
    name: Literal["mocov2"] = "mocov2"
    hidden_dim: int = Field(
        default=2048, gt=0,
        description="Head hidden width (features). moco `--mlp` uses the backbone width, 2048 for ResNet-50.",
    )
    out_dim: int = Field(
        default=128, gt=0,
        description="Embedding width (features); moco `--moco-dim` 128.",
    )
    queue_size: int = Field(
        default=65536, gt=0,
        description="Negative keys kept (keys); moco `--moco-k` 65536.",
    )
    temperature: float = Field(
        default=0.2, gt=0,
        description="InfoNCE temperature (unitless); MoCo v2 uses 0.2 (`--moco-t 0.2`).",
    )
    momentum: float = Field(
        default=0.999, ge=0, le=1,
        description="Key-encoder EMA momentum per step (unitless); moco `--moco-m` 0.999.",
    )
    momentum_cosine: bool = Field(
        default=False,
        description=(
            "Raise the momentum from `momentum` to 1 on a cosine over the run (MoCo v3 / BYOL); off in MoCo "
            "v2."
        ),
    )
    symmetric: bool = Field(
        default=False,
        description=(
            "Also contrast view 2's queries with view 1's keys and average the two losses (MoCo v3 paper's "
            "symmetrised MoCo v2); both key sets are enqueued. Off in MoCo v2."
        ),
    )
    shuffle_bn: bool = Field(
        default=True,
        description=(
            "Shuffle the key batch across ranks before the key encoder (moco's shuffle-BN); no effect in a "
            "single process or on BN-free backbones."
        ),
    )


def infonce_loss(query: Tensor, positive_key: Tensor, negative_keys: Tensor, temperature: float) -> Tensor:
    """InfoNCE (van den Oord et al. 2018; moco `builder.py` + cross-entropy with label 0).

    query (B, D), positive_key (B, D), negative_keys (K, D): L2-normalised rows. Returns the scalar
    mean over i of −log softmax([q_i·k_i+, q_i·n_1, …, q_i·n_K] / T)[0], computed in float32.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)  # float32 at least, also under autocast
    with without_autocast(query):
        query, positive_key, negative_keys = (t.to(dtype) for t in (query, positive_key, negative_keys))
        positive_logits = (query * positive_key).sum(dim=1, keepdim=True)
        negative_logits = query @ negative_keys.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels)


@torch.no_grad()
def enqueue(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    """Write `keys` (N, D) into the ring buffer `queue` (K, D) from `pointer` (a 1-element long tensor),
    wrapping around, and advance the pointer by N mod K: moco's `_dequeue_and_enqueue` without its
    `K % N == 0` assert, so any batch size works (N > K keeps the newest K, as writing one by one would)."""
    size, n_keys = queue.shape[0], keys.shape[0]
    end = int(pointer.item()) + n_keys
    kept = keys[-size:]  # more keys than slots: the older ones would be overwritten within this call
    slots = (end - kept.shape[0] + torch.arange(kept.shape[0], device=queue.device)) % size
    queue[slots] = kept.to(queue.dtype)
    pointer[0] = end % size


@METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    options_model = MoCoV2Options
    options: MoCoV2Options
    # moco `main_moco.py`: SGD(model.parameters(), weight_decay=1e-4) decays every parameter
    exclude_bias_and_norm = False
    queue: Tensor  # (queue_size, out_dim) L2-normalised keys, a ring buffer
    queue_pointer: Tensor  # (1,) long: the next slot to write

    def __init__(self, backbone: Backbone, options: MoCoV2Options, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.n_global_views, self.n_local_views = 2, 0
        self.head = MoCoV2Head(backbone.feature_dim, options.hidden_dim, options.out_dim)
        self.key_backbone = frozen_copy(backbone)
        self.key_head = frozen_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(options.queue_size, options.out_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros(1, dtype=torch.long))
        self.momentum = momentum_schedule(options.momentum, total_steps, options.momentum_cosine)

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)

    @torch.no_grad()
    def _key(self, x: Tensor, step: int) -> Tensor:
        def encode(images: Tensor) -> Tensor:
            return F.normalize(self.key_head(self.key_backbone(images)), dim=1)

        n_ranks = world_size()
        if not self.options.shuffle_bn or n_ranks == 1:
            return encode(x)
        x_all = gather_no_grad(x)
        generator = torch.Generator().manual_seed(1_000_003 * step + 12_345)  # same on every rank
        shuffle = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
        keys_shuffled = gather_no_grad(encode(x_all[shuffle.view(n_ranks, -1)[rank()]]))
        keys_all = keys_shuffled[torch.argsort(shuffle)]
        return keys_all.view(n_ranks, -1, keys_all.shape[-1])[rank()]

    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_views(views)
        negatives = self.queue.clone().detach()
        q1, k2 = self._query(views[0]), self._key(views[1], step)
        loss = infonce_loss(q1, k2, negatives, self.options.temperature)
        keys = [k2]
        if self.options.symmetric:
            q2, k1 = self._query(views[1]), self._key(views[0], step)
            loss = 0.5 * (loss + infonce_loss(q2, k1, negatives, self.options.temperature))
            keys.append(k1)
        if self.training:  # gathered per view so the queue order does not depend on the world size
            enqueue(self.queue, self.queue_pointer, torch.cat([gather_no_grad(k) for k in keys]))
        logs = {"momentum": at_step(self.momentum, step),
                "positive_similarity": float((q1.detach() * k2).sum(dim=1).mean())}
        return loss, logs

    def on_after_optimizer_step(self, step: int) -> None:
        # moco updates the key encoder at the start of the next forward with that iteration's momentum
        momentum = at_step(self.momentum, step + 1)
        ema_update(self.key_backbone, self.backbone, momentum)
        ema_update(self.key_head, self.head, momentum)
