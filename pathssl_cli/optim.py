"""Optimisers and schedules for pre-training.

Schedules are precomputed arrays indexed by the global step (as in facebookresearch/dino
`utils.cosine_scheduler`): the loop sets each parameter group's lr and weight decay from them before every
optimiser step, so resuming at step k needs nothing but k.

Every parameter group carries two extra keys besides what torch expects:
- `lr_scale`: multiplies the scheduled lr (Barlow Twins trains biases and norms at 0.0048 / 0.2 = 0.024 of the
  weights' lr, facebookresearch/barlowtwins `main.py`);
- `weight_decay_applies`: False for biases and norm parameters, which get no weight decay (as in the
  official repos).
LARS and LARC additionally read `lars_exclude` (no trust-ratio adaptation, Barlow Twins'
`lars_adaptation_filter`). Which parameters land in which group is the method's rule
(`SSLMethod.exclude_bias_and_norm`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: The reference batch of the linear scaling rule (Goyal et al. 2017): lr = base_lr × global_batch / 256.
REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """The linear scaling rule: `base_lr` is the lr for `reference_batch` images per step."""
    return base_lr * global_batch / reference_batch


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up `warmup_start → start` over `warmup_steps`, then a half cosine
    `start → end`.

    As dino `utils.cosine_scheduler`: the warm-up is `linspace(warmup_start, start, warmup_steps)` (so its
    last step already equals `start`), and cosine step i of n is `end + (start - end)(1 + cos(pi i / n)) / 2`,
    which starts exactly at `start` and approaches `end` without reaching it.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps) if warmup_steps > 0 else np.zeros(0)
    n = total_steps - warmup_steps
    i = np.arange(n)
    cosine = end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def constant_schedule(value: float, total_steps: int, warmup_steps: int = 0,
                      warmup_start: float = 0.0) -> np.ndarray:
    """`value` at every step after an optional linear warm-up (used when a start and an end are equal)."""
    return cosine_schedule(value, value, total_steps, warmup_steps, warmup_start)


@dataclass(frozen=True)
class Schedules:
    """Per-step lr (before each group's `lr_scale`) and weight decay (for groups where it applies)."""

    lr: np.ndarray
    weight_decay: np.ndarray

    def __post_init__(self) -> None:
        if len(self.lr) != len(self.weight_decay):
            raise ValueError("lr and weight-decay schedules must have one value per step each")


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> float:
    """Set every group's lr and weight decay for `step`; returns the scheduled (unscaled) lr for logging."""
    index = min(step, len(schedules.lr) - 1)
    lr = float(schedules.lr[index])
    weight_decay = float(schedules.weight_decay[index])
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("weight_decay_applies", True) else 0.0
    return lr


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases and norm scales/shifts are 1-d; dino `get_params_groups` uses the same test."""
    return param.ndim <= 1 or name.endswith(".bias")


def decay_split(module: nn.Module) -> list[dict[str, Any]]:
    """Two groups for a plain module: weights (decayed, LARS-adapted) and biases/norms (neither)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if is_bias_or_norm(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay_applies": True, "lars_exclude": False},
        {"params": no_decay, "weight_decay_applies": False, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with the semantics of facebookresearch/barlowtwins.

    Per parameter p with gradient g, in a group with lr, weight decay wd, momentum m and trust
    coefficient eta:
        d = g + wd·p
        d = d · eta‖p‖/‖d‖          unless the group has `lars_exclude` (or either norm is 0)
        mu = m·mu + d;  p = p − lr·mu
    Weight decay enters before the trust ratio, as in the reference; excluded groups run with wd = 0.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9,
                 eta: float = 0.001) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta,
                    "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(d)
                    one = torch.ones_like(param_norm)
                    # torch.where keeps this free of CPU-GPU syncs (no .item()).
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, one)
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


class LARC(torch.optim.Optimizer):
    """SGD with momentum wrapped in LARC (apex `LARC(optimizer, trust_coefficient, clip=False)`), SwAV's
    optimiser (facebookresearch/swav `main_swav.py`).

    Per parameter p with gradient g, lr, weight decay wd, momentum m and trust coefficient eta:
        if ‖p‖ > 0 and ‖g‖ > 0:  d = (g + wd·p) · eta‖p‖ / (‖g‖ + wd‖p‖ + eps)     (else d = g: no decay)
        mu = m·mu + d;  p = p − lr·mu
    It differs from `LARS` (Barlow Twins): the denominator is ‖g‖ + wd‖p‖, not ‖g + wd·p‖, and a parameter
    with a zero norm gets no weight decay. `clip` (apex's clip=True) caps the adaptive rate at 1 / lr. A group
    with `lars_exclude` runs as plain SGD with weight decay.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001, eps: float = 1e-8, clip: bool = False) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "eps": eps,
                    "clip": clip, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars_exclude"]:
                    d = g.add(p, alpha=wd) if wd != 0 else g
                else:
                    param_norm = torch.linalg.vector_norm(p)
                    grad_norm = torch.linalg.vector_norm(g)
                    adaptive = group["eta"] * param_norm / (grad_norm + param_norm * wd + group["eps"])
                    if group["clip"]:
                        adaptive = torch.clamp(adaptive / max(group["lr"], 1e-30), max=1.0)
                    usable = (param_norm > 0) & (grad_norm > 0)
                    # torch.where keeps this free of CPU-GPU syncs (no .item()).
                    d = torch.where(usable, g.add(p, alpha=wd).mul(adaptive), g)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: Sequence[dict[str, Any]], *, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), eta: float = 0.001,
                    no_decay_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """An optimiser over the method's parameter groups; lr and weight decay are set per step by
    `apply_schedules`.

    `no_decay_lr_scale` multiplies the lr of groups without weight decay (biases and norms), Barlow Twins'
    separate bias lr; a group's own `lr_scale` multiplies on top.
    """
    torch_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        applies = bool(group.get("weight_decay_applies", True))
        lr_scale = float(group.get("lr_scale", 1.0)) * (1.0 if applies else no_decay_lr_scale)
        torch_groups.append({"params": params, "weight_decay_applies": applies, "lr_scale": lr_scale,
                             "lars_exclude": bool(group.get("lars_exclude", not applies))})
    if not torch_groups:
        raise ValueError("the method has no trainable parameters")
    if name == "lars":
        return LARS(torch_groups, momentum=momentum, eta=eta)
    if name == "larc":
        return LARC(torch_groups, momentum=momentum, eta=eta)
    if name == "sgd":
        return torch.optim.SGD(torch_groups, lr=0.0, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=0.0, betas=betas)
    raise ValueError(f"unknown optimiser {name!r}")


def build_schedules(*, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                    final_lr_fraction: float = 0.0,
                    warmup_start_fraction: float = 0.0, weight_decay: float = 0.0,
                    weight_decay_end: float | None = None) -> Schedules:
    """Warm-up + cosine lr from `peak_lr` to `peak_lr × final_lr_fraction`, and a cosine weight decay
    `weight_decay → weight_decay_end` over the whole run (no warm-up, as DINO's), constant when no end is
    given."""
    lr = cosine_schedule(peak_lr, peak_lr * final_lr_fraction, total_steps, warmup_steps,
                         peak_lr * warmup_start_fraction)
    end = weight_decay if weight_decay_end is None else weight_decay_end
    return Schedules(lr=lr, weight_decay=cosine_schedule(weight_decay, end, total_steps))
