"""Options of the DINOv2 method (`[method] name = "dinov2"`), grouped and named as facebookresearch/dinov2's
`dinov2/configs/ssl_default_config.yaml` names them (`dino.*`, `ibot.*`, `teacher.*`, `train.centering`,
`optim.layerwise_decay`, ...), with its defaults unless a field says otherwise. The training length, lr, weight
decay and betas are the spec's `[optim]` / `[run]` tables (sources in the specs/pretrain/dinov2_* headers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pathssl_cli.methods.base import MethodOptions
from pathssl_cli.specs.core import Section


class DINOv2HeadOptions(Section):
    """One DINOHead (dinov2 `layers/dino_head.py`): MLP → L2 norm → weight-normalised prototypes."""

    head_n_prototypes: int = Field(
        65536, gt=0, description="Prototypes of the last layer (features); `head_n_prototypes: 65536`.")
    head_bottleneck_dim: int = Field(
        256, gt=0, description="Bottleneck width before the prototypes (features); `head_bottleneck_dim: 256`.")
    head_nlayers: int = Field(3, ge=1, description="Linear layers of the MLP; `head_nlayers: 3`.")
    head_hidden_dim: int = Field(
        2048, gt=0, description="MLP width (features); `head_hidden_dim: 2048`.")


class DINOv2DinoOptions(DINOv2HeadOptions):
    """`dino.*`: the image-level (CLS token) objective and the KoLeo regulariser."""

    loss_weight: float = Field(
        1.0, ge=0, description="Weight of the DINO CLS loss (unitless); `dino.loss_weight: 1.0`; 0 turns DINO "
        "and KoLeo off.")
    koleo_loss_weight: float = Field(
        0.1, ge=0, description="Weight of KoLeo on each global crop's backbone CLS tokens (unitless); "
        "`dino.koleo_loss_weight: 0.1`.")


class DINOv2IBOTOptions(DINOv2HeadOptions):
    """`ibot.*`: the masked-patch objective and its block masking."""

    loss_weight: float = Field(
        1.0, ge=0, description="Weight of the iBOT patch loss (unitless); `ibot.loss_weight: 1.0`; 0 turns "
        "masking off.")
    mask_sample_probability: float = Field(
        0.5, ge=0, le=1, description="Share of the global crops of a batch that are masked; "
        "`ibot.mask_sample_probability: 0.5` (collate: int(2B · p) crops).")
    mask_ratio_min_max: tuple[float, float] = Field(
        (0.1, 0.5), description="Range of masked-patch ratios, split into one linspace bucket per masked "
        "crop; `ibot.mask_ratio_min_max: [0.1, 0.5]`.")
    separate_head: bool = Field(
        False, description="A head of its own for patch tokens (True) or DINO's head shared (False); "
        "`ibot.separate_head: false` (true in dinov2's ViT-L/14 and ViT-g/14 configs).")

    @model_validator(mode="after")
    def _ratios(self) -> DINOv2IBOTOptions:
        low, high = self.mask_ratio_min_max
        if not 0 <= low <= high <= 1:
            raise ValueError(f"mask_ratio_min_max must be an increasing pair in [0, 1], got {(low, high)}")
        return self


class DINOv2TeacherOptions(Section):
    """`teacher.*`: EMA momentum and teacher temperature schedules, per step (dinov2 `CosineScheduler`)."""

    momentum_teacher: float = Field(
        0.992, ge=0, le=1, description="EMA momentum at step 0, cosine to final_momentum_teacher (unitless); "
        "`teacher.momentum_teacher: 0.992` (0.994 in the ViT-L/14 config).")
    final_momentum_teacher: float = Field(
        1.0, ge=0, le=1, description="EMA momentum at the end; `teacher.final_momentum_teacher: 1`.")
    warmup_teacher_temp: float = Field(
        0.04, gt=0, description="Teacher temperature at step 0 (unitless); `teacher.warmup_teacher_temp: 0.04`.")
    teacher_temp: float = Field(
        0.07, gt=0, description="Teacher temperature after the warm-up (unitless); `teacher.teacher_temp: 0.07`.")
    warmup_teacher_temp_epochs: float = Field(
        30, ge=0, description="Linear temperature warm-up, per step (epochs); "
        "`teacher.warmup_teacher_temp_epochs: 30`.")


class DINOv2Options(MethodOptions):
    name: Literal["dinov2"] = "dinov2"
    dino: DINOv2DinoOptions = Field(default_factory=DINOv2DinoOptions, description="`dino.*` options.")
    ibot: DINOv2IBOTOptions = Field(default_factory=DINOv2IBOTOptions, description="`ibot.*` options.")
    teacher: DINOv2TeacherOptions = Field(default_factory=DINOv2TeacherOptions, description="`teacher.*`.")
    centering: Literal["centering", "sinkhorn_knopp"] = Field(
        "centering", description="How teacher outputs become targets: softmax with an EMA centre, or "
        "Sinkhorn-Knopp (3 iterations, over the global batch); `train.centering: centering` (sinkhorn_knopp in "
        "dinov2's ViT-L/14 and ViT-g/14 configs).")
    student_temp: float = Field(
        0.1, gt=0, description="Student softmax temperature (unitless); dinov2 `DINOLoss(student_temp=0.1)`.")
    center_momentum: float = Field(
        0.9, ge=0, le=1, description="EMA momentum of both centres per step; dinov2 `DINOLoss` / "
        "`iBOTPatchLoss(center_momentum=0.9)`.")
    n_global_crops: Literal[2] = Field(
        2, description="Global crops per image; dinov2 asserts 2 (`forward_backward`).")
    n_local_crops: int = Field(
        8, ge=0, description="Local crops per image; `crops.local_crops_number: 8`.")
    freeze_last_layer_epochs: float = Field(
        1, ge=0, description="Epochs with lr 0 on the heads' last layers (epochs); "
        "`optim.freeze_last_layer_epochs: 1`.")
    clip_grad: float = Field(
        3.0, ge=0, description="Gradient-norm clip of each student module (backbone, dino head, ibot head), "
        "L2 over the module (0 = off); `optim.clip_grad: 3.0`.")
    layerwise_decay: float = Field(
        0.9, gt=0, le=1, description="lr × decay^(L + 1 − layer) per ViT block (embeddings = layer 0, final norm "
        "and registers = L + 1; heads 1); `optim.layerwise_decay: 0.9` (1.0 in the ViT-L/14 config).")
    patch_embed_lr_mult: float = Field(
        0.2, gt=0, description="Extra lr factor of the patch embedding; `optim.patch_embed_lr_mult: 0.2`.")
    drop_path_uniform: bool = Field(
        True, description="The student's stochastic depth (model.drop_path_rate) is the same in every block "
        "instead of timm's linear ramp; `student.drop_path_uniform: true`. The teacher never drops.")
    export: Literal["teacher", "student"] = Field(
        "teacher", description="The network written to backbone.safetensors: the EMA teacher, which dinov2 "
        "evaluates (`do_test` saves `model.teacher`), or 'student'.")

    @model_validator(mode="after")
    def _something_to_learn(self) -> DINOv2Options:
        if self.dino.loss_weight <= 0 and self.ibot.loss_weight <= 0:
            raise ValueError("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
        return self
