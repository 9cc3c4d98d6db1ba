"""DINOv2 (Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without Supervision", TMLR): DINO's
CLS objective + iBOT's masked-patch objective + the KoLeo regulariser, student and EMA teacher ViTs.

The pure functions below have the semantics of facebookresearch/dinov2 `dinov2/loss/` (`DINOLoss`,
`iBOTPatchLoss`, `KoLeoLoss`), float32 in and out, world-size aware where the official code all-reduces, and
no state: a centre goes in and the new centre comes out. `DINOv2.forward` assembles them as
`dinov2/train/ssl_meta_arch.py` `forward_backward` does:
- teacher: the unmasked global crops; its CLS outputs are chunked per crop and swapped (crop A's teacher
  target is matched to student crop B); its patch outputs are taken at the masked positions only;
- student: the masked global crops (mask token in place of masked patch embeddings) and the local crops;
- loss = w_dino (L_local + L_global) + w_koleo Σ_crops KoLeo(backbone CLS of the crop) + w_ibot L_ibot, with
  L_local = dino_cls_loss(local crops, both teacher crops) / T, L_global = 2 dino_cls_loss(global crops, the
  swapped teacher crops) / T, T = 2 + max(2 n_local, 1), and L_ibot = ibot_patch_loss(...) (× 2 × ½).
The centres update after the targets are made (dinov2 applies the pending update at the next step), in
"centering" mode only. Masks come from `masking.py`, drawn from torch's per-step seeded RNG (exact resume).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.base import (
    METHODS,
    SSLMethod,
    all_reduce_max,
    all_reduce_sum,
    at_step,
    ema_update,
    frozen_copy,
    warn_if_warmup_outlasts_run,
    without_autocast,
    world_size,
)
from pathssl_cli.methods.dinov2_options import DINOv2HeadOptions, DINOv2Options
from pathssl_cli.methods.heads import DINOHead
from pathssl_cli.methods.masking import batch_masks, mask_weights
from pathssl_cli.optim import cosine_schedule, layerwise_param_groups

KOLEO_PDIST_EPS = 1e-8  # dinov2 KoLeoLoss: nn.PairwiseDistance(2, eps=1e-8), whatever forward's eps
EXP_LIMIT = 80.0  # exp(80) ≈ 5.5e34 < float32 max: Sinkhorn-Knopp shifts logits / τ above this (see below)


# ------------------------------------------------------------------------------------------- pure functions
@torch.no_grad()
def softmax_center_teacher(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Teacher targets softmax((t − c) / τ_t) over the last dim (dinov2 `softmax_center_teacher`).
    teacher_logits (B, K) or (B, T, K); center (1, K) or (1, 1, K); same shape out."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """The new centre, of `center`'s shape: m · c + (1 − m) · batch mean of `teacher_logits` over all ranks.

    (B, K) logits: the mean over rows (dinov2 `DINOLoss.reduce_center_update`); (B, T, K): the mean over T, then
    over B (`iBOTPatchLoss.reduce_center_update`). Sums are all-reduced and divided by B × world size, as
    dinov2 does (it assumes every rank holds B rows).
    """
    logits = teacher_logits.float()
    batch_sum = torch.sum(logits.mean(1) if logits.ndim == 3 else logits, dim=0, keepdim=True)
    batch_center = all_reduce_sum(batch_sum) / (len(logits) * world_size())
    return (center * momentum + batch_center * (1 - momentum)).reshape(center.shape)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3,
                           n_samples: int | Tensor | None = None) -> Tensor:
    """Teacher targets (B, K) by Sinkhorn-Knopp over the global batch (dinov2 `sinkhorn_knopp_teacher`).

    Q = exp(t / τ)ᵀ is normalised to sum 1, then `n_iterations` times: rows (prototypes, sums all-reduced) to
    1/K, columns (samples) to 1/n; the result is n · Qᵀ (rows sum to 1). n = B × world size for CLS tokens;
    for iBOT pass `n_samples` = the global number of masked patches (dinov2 all-reduces its local count).
    Logits with t / τ > 80 anywhere (global max) are shifted by a constant first, which the normalisation
    cancels, so exp cannot overflow (dinov2 does not shift: its cosine logits stay below ~3 / 0.04 in
    practice); below 80 nothing is shifted and the arithmetic is dinov2's exactly.
    """
    scaled = teacher_logits.float() / teacher_temp
    peak = all_reduce_max(scaled.max() if scaled.numel() else scaled.new_tensor(-torch.inf))
    q = torch.exp(scaled - (peak - EXP_LIMIT).clamp(min=0.0)).t()  # (K, B): prototypes × samples
    n = q.shape[1] * world_size() if n_samples is None else n_samples
    k = q.shape[0]
    sum_q = all_reduce_sum(torch.sum(q))
    q /= sum_q
    for _ in range(n_iterations):
        sum_of_rows = all_reduce_sum(torch.sum(q, dim=1, keepdim=True))
        q /= sum_of_rows
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


def dino_cls_loss(student_outputs: Sequence[Tensor], teacher_probs: Sequence[Tensor],
                  student_temp: float) -> Tensor:
    """Σ over every (student s, teacher t) pair of −mean_b Σ_k t log softmax(s / τ_s) (dinov2
    `DINOLoss.forward`, no pair skipped and no division: the caller scales). Each tensor (B, K)."""
    total: Tensor | int = 0
    for s in student_outputs:
        log_probs = F.log_softmax(s.float() / student_temp, dim=-1)
        for t in teacher_probs:
            total -= torch.sum(t * log_probs, dim=-1).mean()
    if not isinstance(total, Tensor):
        raise ValueError("dino_cls_loss needs at least one student and one teacher output")
    return total


def ibot_patch_loss(student_masked: Tensor, teacher_probs_masked: Tensor, masks_weight: Tensor, n_images: int,
                    student_temp: float) -> Tensor:
    """−Σ_patches w · Σ_k t log softmax(s / τ_s) / n_images (dinov2 `iBOTPatchLoss.forward_masked`).
    student_masked (M, K) logits and teacher_probs_masked (M, K) at the M masked patches of this rank;
    masks_weight (M,) = 1 / the masked count of each patch's crop; n_images = crops in the batch (masked or
    not), so the loss is the mean over crops of each crop's mean patch cross-entropy."""
    log_probs = F.log_softmax(student_masked.float() / student_temp, dim=-1)
    loss = torch.sum(teacher_probs_masked * log_probs, dim=-1) * masks_weight
    return -loss.sum() / n_images


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2019; dinov2 `KoLeoLoss.forward`):
    −mean_i log(‖x̂_i − x̂_nn(i) + ε_d‖ + eps), x̂ = L2-normalised rows (eps), nn(i) = the row of largest dot
    product other than i, ε_d = 1e-8 added to every coordinate of the difference (`nn.PairwiseDistance`), so
    a duplicate row gives log(1e-8 √D + eps) with a finite gradient. x (B, D), B ≥ 2, in float32."""
    with without_autocast(x):
        x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
        with torch.no_grad():
            dots = torch.mm(x, x.t())
            dots.view(-1)[::x.shape[0] + 1].fill_(-1)  # never one's own neighbour
            _, nearest = torch.max(dots, dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=KOLEO_PDIST_EPS)
        return -torch.log(distances + eps).mean()


def teacher_temperature_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Per-step teacher temperature: linspace(start, end, warmup_steps), then `end` (dinov2 `CosineScheduler`
    with base = final = teacher_temp). A warm-up longer than the run keeps its rate and is cut at the run's end,
    as DINO's per-epoch warm-up is (dinov2 asserts instead); `warn_if_warmup_outlasts_run` says so."""
    warmup = np.linspace(start, end, warmup_steps)[:total_steps]
    return np.concatenate([warmup, np.full(max(total_steps - len(warmup), 1), end)])


# -------------------------------------------------------------------------------------------------- method
def _head(in_dim: int, options: DINOv2HeadOptions) -> DINOHead:
    """dinov2 `DINOHead`: no BatchNorm, trainable weight norm g (filled with 1, `norm_last_layer` off)."""
    return DINOHead(in_dim, options.head_n_prototypes, options.head_hidden_dim, options.head_bottleneck_dim,
                    options.head_nlayers, use_bn=False, norm_last_layer=False)


def _uniform_drop_path(backbone: Backbone) -> None:
    """Every block drops paths at the backbone's largest rate (dinov2 `drop_path_uniform`); timm ramps it."""
    from timm.layers import DropPath

    rate = max((m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)), default=0.0)
    if rate > 0:
        for block in getattr(backbone.timm_model, "blocks", []):
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)


@METHODS.register("dinov2")
class DINOv2(SSLMethod):
    options_model = DINOv2Options
    options: DINOv2Options
    dino_center: Tensor  # (1, K) EMA of the teacher's CLS outputs
    ibot_center: Tensor  # (1, 1, K') EMA of the teacher's masked-patch outputs

    def __init__(self, backbone: Backbone, options: DINOv2Options, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        if backbone.info.family != "vit" or backbone.patch_size is None:
            raise ValueError(f"dinov2 needs a ViT backbone (patch tokens, a mask token); {backbone.name} is not")
        self.n_global_views, self.n_local_views = options.n_global_crops, options.n_local_crops
        if options.drop_path_uniform:
            _uniform_drop_path(backbone)
        dim = backbone.feature_dim
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # dinov2 backbone's mask_token, zeros
        self.dino_head = _head(dim, options.dino)
        self.ibot_head = _head(dim, options.ibot) if options.ibot.separate_head else None
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_dino_head = frozen_copy(self.dino_head)
        self.teacher_ibot_head = frozen_copy(self.ibot_head) if self.ibot_head is not None else None
        ibot_dim = (options.ibot if options.ibot.separate_head else options.dino).head_n_prototypes
        self.register_buffer("dino_center", torch.zeros(1, options.dino.head_n_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, 1, ibot_dim))
        teacher = options.teacher
        warmup_steps = round(teacher.warmup_teacher_temp_epochs * steps_per_epoch)
        warn_if_warmup_outlasts_run("method.teacher.warmup_teacher_temp_epochs", warmup_steps, total_steps,
                                    teacher.warmup_teacher_temp, teacher.teacher_temp)
        self.teacher_temp = teacher_temperature_schedule(
            teacher.warmup_teacher_temp, teacher.teacher_temp, warmup_steps, total_steps)
        self.teacher_momentum = cosine_schedule(teacher.momentum_teacher, teacher.final_momentum_teacher,
                                                total_steps)
        self.freeze_last_layer_steps = round(options.freeze_last_layer_epochs * steps_per_epoch)

    def _student_modules(self) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """(module, named parameters) of each student module as dinov2 has them: the backbone (with its
        mask token), the DINO head and the iBOT head."""
        backbone = [*self.backbone.timm_model.named_parameters(), ("mask_token", self.mask_token)]
        modules = [("backbone", backbone), ("dino_head", list(self.dino_head.named_parameters()))]
        if self.ibot_head is not None:
            modules.append(("ibot_head", list(self.ibot_head.named_parameters())))
        return modules

    def param_groups(self) -> list[dict]:
        """dinov2 `get_params_groups`: layer-wise lr decay and the patch-embed lr factor on the backbone, no
        weight decay on biases / norms / LayerScale, lr 0 on the heads' last layers while they are frozen."""
        n_blocks = len(getattr(self.backbone.timm_model, "blocks", []))
        groups = []
        for module, named in self._student_modules():
            groups += layerwise_param_groups(
                named, n_blocks=n_blocks if module == "backbone" else 0, decay=self.options.layerwise_decay,
                patch_embed_lr_mult=self.options.patch_embed_lr_mult,
                frozen_until_step=self.freeze_last_layer_steps)
        return groups

    def _masks(self, n_crops: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        ibot = self.options.ibot
        if ibot.loss_weight <= 0:
            return torch.zeros(n_crops, grid[0] * grid[1], dtype=torch.bool, device=device)
        # one draw of torch's RNG, which the training loop seeds per (seed, rank, step): exact resume
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return batch_masks(n_crops, grid, ibot.mask_ratio_min_max, ibot.mask_sample_probability,
                           rng).to(device)

    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_views(views)
        options, n_local = self.options, self.n_local_views
        batch = views[0].shape[0]
        global_crops = torch.cat(views[:2])
        patch = int(self.backbone.patch_size)  # type: ignore[arg-type]  # checked in __init__
        grid = (global_crops.shape[-2] // patch, global_crops.shape[-1] // patch)
        masks = self._masks(2 * batch, grid, global_crops.device)  # (2B, N) bool
        mask_indices = masks.flatten().nonzero().flatten()
        masks_weight = mask_weights(masks)
        n_masked_global = all_reduce_sum(masks.new_tensor([mask_indices.numel()], dtype=torch.float32))
        do_ibot = options.ibot.loss_weight > 0
        teacher_temp = at_step(self.teacher_temp, step)

        with torch.no_grad():  # ------------------------------------------------------------------ teacher
            t_cls, t_patches = self.teacher_backbone.forward_tokens(global_crops)  # type: ignore[operator]
            t_cls = torch.cat((t_cls[batch:], t_cls[:batch]))  # swapped: A's target is B's teacher output
            t_masked = t_patches.flatten(0, 1).index_select(0, mask_indices)
            if self.teacher_ibot_head is None:
                t_out = self.teacher_dino_head(torch.cat((t_cls, t_masked)))
                t_cls_out, t_masked_out = t_out[:2 * batch], t_out[2 * batch:]
            else:
                t_cls_out, t_masked_out = self.teacher_dino_head(t_cls), self.teacher_ibot_head(t_masked)
            if options.centering == "centering":
                t_cls_probs = softmax_center_teacher(t_cls_out, self.dino_center, teacher_temp)
                t_masked_probs = softmax_center_teacher(t_masked_out.unsqueeze(0), self.ibot_center,
                                                        teacher_temp).squeeze(0)
                if self.training:
                    self.dino_center.copy_(update_center(self.dino_center, t_cls_out, options.center_momentum))
                    if do_ibot:
                        self.ibot_center.copy_(self._ibot_center_update(t_masked_out))
            else:
                t_cls_probs = sinkhorn_knopp_teacher(t_cls_out, teacher_temp)
                t_masked_probs = sinkhorn_knopp_teacher(t_masked_out, teacher_temp, n_samples=n_masked_global)

        # ------------------------------------------------------------------------------------------ student
        s_cls, s_patches = self.backbone.forward_tokens(global_crops, masks, self.mask_token)
        s_local_cls = (self.backbone.forward_tokens(torch.cat(views[2:]))[0] if n_local
                       else s_cls.new_zeros(0, s_cls.shape[1]))
        s_masked = s_patches.flatten(0, 1).index_select(0, mask_indices)
        n_local_rows, n_global_rows = len(s_local_cls), len(s_cls)
        if self.ibot_head is None:
            s_out = self.dino_head(torch.cat((s_local_cls, s_cls, s_masked)))
            s_masked_out = s_out[n_local_rows + n_global_rows:]
        else:
            s_out = self.dino_head(torch.cat((s_local_cls, s_cls)))
            s_masked_out = self.ibot_head(s_masked)
        s_local_out, s_global_out = s_out[:n_local_rows], s_out[n_local_rows:n_local_rows + n_global_rows]

        # ------------------------------------------------------------------------------------------- losses
        n_terms = 2 * (2 - 1) + max(2 * n_local, 1)  # dinov2 n_global_crops_loss_terms + n_local_...
        zero = s_cls.new_zeros((), dtype=torch.float32)
        parts = {"dino_local_crops_loss": zero, "dino_global_crops_loss": zero, "koleo_loss": zero,
                 "ibot_loss": zero}
        total = zero
        if options.dino.loss_weight > 0:
            teacher_chunks = list(t_cls_probs.chunk(2))
            if n_local:
                parts["dino_local_crops_loss"] = dino_cls_loss(
                    s_local_out.chunk(n_local), teacher_chunks, options.student_temp) / n_terms
            parts["dino_global_crops_loss"] = dino_cls_loss(
                [s_global_out], [t_cls_probs], options.student_temp) * 2 / n_terms
            # accumulated term by term in dinov2's order, so the float32 sum is the same
            total = total + options.dino.loss_weight * parts["dino_local_crops_loss"]
            total = total + options.dino.loss_weight * parts["dino_global_crops_loss"]
            if options.dino.koleo_loss_weight > 0:
                crop_a, crop_b = s_cls.chunk(2)  # not across the two crops of an image
                parts["koleo_loss"] = options.dino.koleo_loss_weight * (koleo_loss(crop_a) + koleo_loss(crop_b))
                total = total + parts["koleo_loss"]
        if do_ibot:
            parts["ibot_loss"] = ibot_patch_loss(s_masked_out, t_masked_probs, masks_weight, 2 * batch,
                                                 options.student_temp) * 2 * 0.5  # loss_scales · 1/n_global
            total = total + options.ibot.loss_weight * parts["ibot_loss"]
        return total, self._logs(parts, t_cls_probs, masks, teacher_temp, step)

    def _ibot_center_update(self, t_masked_out: Tensor) -> Tensor:
        """The iBOT centre update on (1, M, K) as dinov2 passes it (each rank's mean over its masked patches,
        averaged over ranks). A rank without masked patches contributes the current centre instead of the
        mean of nothing (NaN in dinov2)."""
        if t_masked_out.shape[0] == 0:
            t_masked_out = self.ibot_center.reshape(1, -1)
        return update_center(self.ibot_center, t_masked_out.unsqueeze(0), self.options.center_momentum)

    def _logs(self, parts: dict[str, Tensor], t_cls_probs: Tensor, masks: Tensor, teacher_temp: float,
              step: int) -> dict[str, float]:
        """Loss parts (dinov2's loss_dict, koleo and ibot halved for display as it does), the teacher's
        targets' mean entropy and the entropy of their batch mean in nats (DINO's collapse diagnostics: both near
        log K = collapse to uniform, both near 0 = to one prototype; healthy is a low mean entropy with a high
        batch entropy), and the masked share. One host transfer (a CPU-GPU sync point)."""
        def entropy(p: Tensor) -> Tensor:
            return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)

        values = torch.stack([parts["dino_local_crops_loss"], parts["dino_global_crops_loss"],
                              parts["koleo_loss"] / 2, parts["ibot_loss"] / 2, entropy(t_cls_probs).mean(),
                              entropy(t_cls_probs.mean(0)), masks.float().mean()]).detach().tolist()
        names = ["dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss",
                 "teacher_entropy", "teacher_batch_entropy", "masked_share"]
        logs = dict(zip(names, values, strict=True))
        logs.update(teacher_temp=teacher_temp, teacher_momentum=at_step(self.teacher_momentum, step))
        return logs

    def on_before_optimizer_step(self, step: int) -> None:
        if self.options.clip_grad > 0:  # dinov2 train.py: clip_grad_norm_ of each student module on its own
            for _, named in self._student_modules():
                nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], self.options.clip_grad)

    def on_after_optimizer_step(self, step: int) -> None:
        momentum = at_step(self.teacher_momentum, step)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_dino_head, self.dino_head, momentum)
        if self.ibot_head is not None and self.teacher_ibot_head is not None:
            ema_update(self.teacher_ibot_head, self.ibot_head, momentum)
