"""The contract between an SSL method and the one pre-training loop (`pathssl_cli/pretrain.py`).

A method is an `nn.Module` that owns the student backbone, its heads, any teacher / key encoder, and its state
(queues, pointers, the DINO centre) as registered buffers, so `state_dict()` checkpoints all of it.
The loop does:

    method = METHODS.get(options.name)(backbone, options, steps_per_epoch=S, total_steps=T)
    optimizer = make_optimizer(method.param_groups(), ...)
    model = DDP(method)                                  # when distributed; see "DDP" below
    for step in range(start, T):
        loss, logs = model(views, step)                  # views: n_global_views global views, then local ones
        loss.backward()
        scaler.unscale_(optimizer)                       # fp16 only: clipping must see the true gradients
        method.on_before_optimizer_step(step)            # drop frozen grads, per-parameter clipping
        optimizer.step(); optimizer.zero_grad()
        method.on_after_optimizer_step(step)             # EMA teacher / key encoder, prototype normalisation

- `views`: a list of `n_global_views + n_local_views` tensors, each (B_local, 3, h, w), already normalised;
  views of the same size are batched through the backbone together (dino `MultiCropWrapper`, swav
  `resnet50.py`).
- The returned loss is this rank's loss, scaled so that DDP's gradient *averaging* gives the gradient of the
  global-batch loss: per-sample losses are means over the local batch (gathered keys/centres carry no
  gradient). The one exception is on purpose: Barlow Twins' cross-correlation is global by construction and,
  by default, summed over ranks as barlowtwins' raw all_reduce does, which gives 1/W of that gradient, the
  gradient its hyper-parameters were tuned with (`ddp_gradient = "exact"` gives the global-batch gradient;
  see `barlow_twins.py`).
- All schedules (momentum, temperature) are precomputed per-step arrays indexed by `step`, so resuming at step
  k needs nothing but k and the state dict.
- DDP: every buffer is kept identical on all ranks (queues hold *gathered* features), so DDP's default
  `broadcast_buffers=True` is harmless, and a checkpoint does not depend on the world size.
- BatchNorm inside the heads is `GlobalBatchNorm1d` (statistics over the global batch, like SyncBN, but it
  works on CPU/gloo too). Converting the *backbone's* BatchNorm to SyncBN on GPU is the loop's job.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from pathssl_cli.backbones import Backbone
from pathssl_cli.console import warn
from pathssl_cli.distributed import (  # noqa: F401 - re-exported for the method modules
    all_reduce_sum,
    all_reduce_sum_with_grad,
    gather_no_grad,
    rank,
    world_size,
)
from pathssl_cli.registry import Registry
from pathssl_cli.specs.core import Section


class MethodOptions(Section):
    """Options of one SSL method; each method subclasses this with `name: Literal["<method>"]`."""

    name: str = Field(description="The SSL method: mocov2 | swav | barlow_twins | dino | dinov2.")


# ---------------------------------------------------------------------------------------- distributed helpers
@torch.no_grad()
def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of `x` over ranks, as a new tensor without gradient."""
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def without_autocast(x: Tensor) -> torch.autocast:
    """A context that turns autocast off on `x`'s device: losses whose sums lose too much in bf16/fp16."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# -------------------------------------------------------------------------------------------------- schedules
def momentum_schedule(base: float, total_steps: int, cosine_to_one: bool) -> np.ndarray:
    """Per-step EMA momentum: constant `base`, or dino `cosine_scheduler(base, 1, ...)`:
    m_i = 1 - (1 - base)(1 + cos(pi i / T)) / 2, which starts at `base` and approaches 1."""
    if not cosine_to_one:
        return np.full(max(total_steps, 1), base, dtype=np.float64)
    i = np.arange(max(total_steps, 1))
    return 1.0 + 0.5 * (base - 1.0) * (1.0 + np.cos(np.pi * i / max(total_steps, 1)))


def at_step(schedule: np.ndarray, step: int) -> float:
    """The schedule's value at `step`, holding the last value if a run goes past its planned length."""
    return float(schedule[min(max(step, 0), len(schedule) - 1)])


def warn_if_warmup_outlasts_run(field: str, warmup: int, run: int, start: float, end: float,
                                unit: str = "steps") -> None:
    """DINO and DINOv2 set the teacher-temperature warm-up in epochs (30 officially), DINO scheduling it per
    epoch and DINOv2 per step (`unit`). A run shorter than its warm-up never reaches the temperature its spec
    names, so its targets are not the ones the spec says: a warning, not an error, since a short debugging run
    is legitimate."""
    if warmup > run and start != end:
        warn(f"{field} spans {warmup} {unit} but the run has {run}: the teacher temperature never reaches {end} "
             f"(it warms up from {start}). Shorten the warm-up, or hold the temperature "
             f"(warmup_teacher_temp = teacher_temp) as specs/pretrain/tiny_dinov2.toml does")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, parameter by parameter (buffers are not
    averaged, as in moco `_momentum_update_key_encoder` and dino's teacher update)."""
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise RuntimeError("teacher and student have different parameter lists")
    for t, s in zip(teacher_params, student_params, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters never receive gradients (teacher / key encoder), without stochastic
    depth: dino `main_dino.py` builds the teacher without `drop_path_rate`, and no official key encoder drops
    paths either."""
    from timm.layers import DropPath

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return twin


# ------------------------------------------------------------------------------------------------- the method
class SSLMethod(nn.Module, abc.ABC):
    """Base class of the four methods; see the module docstring for the contract."""

    options_model: ClassVar[type[MethodOptions]]
    n_global_views: int
    n_local_views: int
    backbone: Backbone  # the student / query backbone (exported unless the method says otherwise)

    def __init__(self, backbone: Backbone, options: MethodOptions, *, steps_per_epoch: int,
                 total_steps: int) -> None:
        super().__init__()
        if steps_per_epoch <= 0 or total_steps <= 0:
            raise ValueError(f"steps_per_epoch and total_steps must be positive, got {steps_per_epoch}, "
                             f"{total_steps}")
        self.backbone = backbone
        self.options = options
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps

    @property
    def exported_network(self) -> str:
        """Which network `exported_backbone` returns, for the run's summary: `options.export` for the methods
        with an EMA teacher (DINO, DINOv2; 'teacher' by default), else the student."""
        return str(getattr(self.options, "export", "student"))

    def exported_backbone(self) -> Backbone:
        """The backbone `pathssl pretrain` exports: the network the method's official evaluation uses (the
        student / query encoder, or the EMA teacher of DINO and DINOv2: their `teacher_backbone`)."""
        if self.exported_network == "teacher":
            return self.teacher_backbone  # type: ignore[return-value]  # a frozen_copy of the Backbone
        return self.backbone

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    @abc.abstractmethod
    def forward(self, views: list[Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        """This rank's loss for `views` (global views first) at optimiser step `step`, plus float logs."""

    def on_before_optimizer_step(self, step: int) -> None:
        """Called after backward, before the optimiser step (gradients are already averaged by DDP)."""

    def on_after_optimizer_step(self, step: int) -> None:
        """Called after the optimiser step: EMA updates, prototype normalisation."""

    def check_views(self, views: Sequence[Tensor]) -> None:
        expected = self.n_global_views + self.n_local_views
        if len(views) != expected:
            raise ValueError(f"{type(self).__name__} expects {self.n_global_views} global + "
                             f"{self.n_local_views} local views, got {len(views)}")

    #: Whether biases and norm parameters (1-d tensors) are kept out of weight decay and of LARS/LARC
    #: adaptation. Each official code has its own rule: barlowtwins `exclude_bias_and_norm` and dino
    #: `get_params_groups` exclude them; moco (`SGD(model.parameters(), weight_decay=...)`) and swav
    #: (`LARC(SGD(model.parameters(), ...))`) decay and adapt every parameter.
    exclude_bias_and_norm: ClassVar[bool] = True

    def param_groups(self) -> list[dict]:
        """Trainable parameters (frozen teacher / key encoder excluded), split by the method's rule
        (`exclude_bias_and_norm`): weights get weight decay and LARS/LARC adaptation; biases and norm
        parameters get neither where the official code excludes them, the same as weights where it does
        not."""
        decayed: list[nn.Parameter] = []
        not_decayed: list[nn.Parameter] = []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (not_decayed if self.exclude_bias_and_norm and p.ndim <= 1 else decayed).append(p)
        groups: list[dict] = [{"params": decayed, "weight_decay_applies": True, "lars_exclude": False}]
        if not_decayed:
            groups.append({"params": not_decayed, "weight_decay_applies": False, "lars_exclude": True})
        return groups


def backbone_multicrop(backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """Backbone features of all views, (V·B, D) in view order; consecutive views of equal size run as one
    batch."""
    outputs: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.append(backbone(torch.cat(list(views[start:end]), dim=0)))
        start = end
    return torch.cat(outputs, dim=0)


METHODS: Registry[type[SSLMethod]] = Registry("SSL method")
