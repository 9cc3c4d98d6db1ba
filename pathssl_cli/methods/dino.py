"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Matches facebookresearch/dino `main_dino.py` (`DINOLoss`, the training loop), `vision_transformer.py`
(`DINOHead`) and `utils.py` (`cosine_scheduler`, `clip_gradients`, `cancel_gradients_last_layer`): a student
and an EMA teacher (backbone + DINO head); the student sees all crops, the teacher the global crops only; the
loss is the cross-entropy between the sharpened, centred teacher and the student over every (teacher crop,
student crop) pair of different views; the centre is an EMA (0.9) of the all-reduced teacher batch mean.
The weight-decay schedule 0.04 → 0.4 is the optimiser's (`pathssl_cli/optim.py`). The student's stochastic
depth (`--drop_path_rate`) is the backbone's (`model.drop_path_rate`); the teacher never drops paths. The
teacher is what gets exported (`export`), as dino evaluates it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pathssl_cli.backbones import Backbone
from pathssl_cli.methods.base import (
    METHODS,
    MethodOptions,
    SSLMethod,
    all_reduce_sum,
    at_step,
    backbone_multicrop,
    ema_update,
    frozen_copy,
    momentum_schedule,
    warn_if_warmup_outlasts_run,
)
from pathssl_cli.methods.heads import DINOHead


class DINOOptions(MethodOptions):
    name: Literal["dino"] = "dino"
    out_dim: int = Field(
        default=65536, gt=0,
        description="Prototypes of the last layer (features); dino `--out_dim 65536`.",
    )
    hidden_dim: int = Field(
        default=2048, gt=0,
        description="Head MLP width (features); dino `DINOHead` 2048.",
    )
    bottleneck_dim: int = Field(
        default=256, gt=0,
        description="Bottleneck before the last layer (features); dino 256.",
    )
    n_layers: int = Field(
        default=3, ge=1,
        description="Linear layers of the head MLP; dino `nlayers=3`.",
    )
    use_bn_in_head: bool = Field(
        default=False,
        description="BatchNorm in the head MLP; dino `--use_bn_in_head False` (True for its ResNet-50 runs).",
    )
    norm_last_layer: bool = Field(
        default=True,
        description=(
            "Fix the weight norm of the last layer to 1; dino default True (False trains better but less "
            "stably for ViT-S/16)."
        ),
    )
    n_global_crops: int = Field(
        default=2, ge=1,
        description="Global crops per image (views); dino uses 2.",
    )
    n_local_crops: int = Field(
        default=10, ge=0,
        description=(
            "Local crops per image (views); 10 as in dino's best ViT-S/16 run (`--local_crops_number 10`; "
            "the code's default is 8)."
        ),
    )
    student_temp: float = Field(
        default=0.1, gt=0,
        description="Student softmax temperature (unitless); dino 0.1.",
    )
    warmup_teacher_temp: float = Field(
        default=0.04, gt=0,
        description="Teacher temperature at epoch 0 (unitless); dino `--warmup_teacher_temp 0.04`.",
    )
    teacher_temp: float = Field(
        default=0.07, gt=0,
        description="Teacher temperature after warm-up (unitless); dino's ViT-S/16 recipe 0.07.",
    )
    warmup_teacher_temp_epochs: int = Field(
        default=30, ge=0,
        description="Epochs of linear teacher-temperature warm-up (epochs); dino's ViT-S/16 recipe 30.",
    )
    center_momentum: float = Field(
        default=0.9, ge=0, le=1,
        description="EMA momentum of the centre per step (unitless); dino `DINOLoss` 0.9.",
    )
    momentum_teacher: float = Field(
        default=0.996, ge=0, le=1,
        description=(
            "Teacher EMA momentum at step 0, raised to 1 on a cosine (unitless); dino `--momentum_teacher "
            "0.996`."
        ),
    )
    freeze_last_layer_epochs: float = Field(
        default=1.0, ge=0,
        description=(
            "Epochs during which the head's last layer gets no update (epochs); dino `--freeze_last_layer 1`."
        ),
    )
    clip_grad: float = Field(
        default=3.0, ge=0,
        description="Per-parameter gradient-norm clip (L2; 0 = off); dino `--clip_grad 3.0`.",
    )
    export: Literal["teacher", "student"] = Field(
        default="teacher",
        description=(
            "The network written to backbone.safetensors: the EMA teacher, which dino evaluates "
            "(`eval_linear.py` / `eval_knn.py --checkpoint_key teacher`) and which is the better network "
            "throughout training; 'student' for the network the optimiser trained."
        ),
    )


def dino_loss(student_output: Tensor, teacher_output: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float, n_student_crops: int) -> Tensor:
    """DINO cross-entropy (dino `main_dino.py` `DINOLoss.forward`).

    student_output (S·B, K) for S crops; teacher_output (T·B, K) for the first T (global) crops;
    center (1, K). Teacher probabilities are softmax((t − center) / τ_t); for every pair (teacher crop i,
    student crop v ≠ i) the loss is −mean_b Σ_k p_t log softmax(s / τ_s); the result is the mean over pairs.
    Computed in float32 (also under autocast).
    """
    student_log_probs = F.log_softmax(student_output.float() / student_temp, dim=-1).chunk(n_student_crops)
    n_teacher_crops = teacher_output.shape[0] // student_log_probs[0].shape[0]
    teacher_probs = F.softmax((teacher_output.float() - center) / teacher_temp, dim=-1).detach().chunk(
        n_teacher_crops)
    total, n_terms = student_output.new_zeros((), dtype=torch.float32), 0
    for i, p_teacher in enumerate(teacher_probs):
        for v, log_p_student in enumerate(student_log_probs):
            if v == i:
                continue
            total = total + (-(p_teacher * log_p_student).sum(dim=-1)).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def update_center(center: Tensor, teacher_output: Tensor, momentum: float) -> Tensor:
    """The new centre (1, K): momentum · center + (1 − momentum) · mean of `teacher_output` (N, K) over all
    ranks' rows (dino `DINOLoss.update_center`, its sum all-reduced)."""
    total = all_reduce_sum(teacher_output.float().sum(dim=0, keepdim=True))
    count = all_reduce_sum(teacher_output.new_tensor(float(teacher_output.shape[0])))
    return center * momentum + (total / count) * (1.0 - momentum)


def teacher_temperature_schedule(options: DINOOptions, n_epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up then constant (dino `DINOLoss.__init__`)."""
    start, end = options.warmup_teacher_temp, options.teacher_temp
    warmup = np.linspace(start, end, options.warmup_teacher_temp_epochs)
    rest = np.full(max(n_epochs - options.warmup_teacher_temp_epochs, 1), options.teacher_temp)
    return np.concatenate([warmup, rest])


@METHODS.register("dino")
class DINO(SSLMethod):
    options_model = DINOOptions
    options: DINOOptions
    center: Tensor  # (1, out_dim) EMA of the teacher's mean output

    def __init__(self, backbone: Backbone, options: DINOOptions, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__(backbone, options, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        self.n_global_views, self.n_local_views = options.n_global_crops, options.n_local_crops
        self.head = DINOHead(backbone.feature_dim, options.out_dim, options.hidden_dim,
                             options.bottleneck_dim, options.n_layers, options.use_bn_in_head,
                             options.norm_last_layer)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, options.out_dim))
        n_epochs = math.ceil(total_steps / steps_per_epoch)
        warn_if_warmup_outlasts_run("method.warmup_teacher_temp_epochs", options.warmup_teacher_temp_epochs,
                                    n_epochs, options.warmup_teacher_temp, options.teacher_temp, unit="epochs")
        self.teacher_temp = teacher_temperature_schedule(options, n_epochs)
        self.teacher_momentum = momentum_schedule(options.momentum_teacher, total_steps, cosine_to_one=True)
        self.freeze_last_layer_steps = round(options.freeze_last_layer_epochs * steps_per_epoch)

    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_views(views)
        student_output = self.head(backbone_multicrop(self.backbone, views))
        with torch.no_grad():
            global_views = views[:self.n_global_views]
            teacher_output = self.teacher_head(backbone_multicrop(self.teacher_backbone, global_views))
        teacher_temp = at_step(self.teacher_temp, self.epoch_of(step))
        loss = dino_loss(student_output, teacher_output, self.center, self.options.student_temp, teacher_temp,
                         len(views))
        if self.training:
            self.center.copy_(update_center(self.center, teacher_output, self.options.center_momentum))
        return loss, {"teacher_temp": teacher_temp, "teacher_momentum": at_step(self.teacher_momentum, step)}

    def on_before_optimizer_step(self, step: int) -> None:
        if self.options.clip_grad > 0:  # dino `utils.clip_gradients`: each parameter's gradient on its own
            for p in self.parameters():
                if p.grad is not None:
                    scale = self.options.clip_grad / (p.grad.detach().norm(2) + 1e-6)
                    p.grad.mul_(scale.clamp(max=1.0))  # only shrinks, without a host sync per parameter
        if step < self.freeze_last_layer_steps:  # dino `cancel_gradients_last_layer`
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_after_optimizer_step(self, step: int) -> None:
        momentum = at_step(self.teacher_momentum, step)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
