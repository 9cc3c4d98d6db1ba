"""Many linear classifiers trained at once on cached features: the whole lr × weight-decay × seed sweep.

Every head is an independent `nn.Linear(D, C)` trained exactly as it would be alone; its seed fixes its
initialisation and its minibatch order, so the heads of one seed differ only in lr and weight decay. Stacking
them as W (G, D, C) turns the sweep into one matrix product per seed and step instead of G Python training
loops, which is what keeps a full linear evaluation, sweep included, cheaper than the one-time feature
extraction (benchmarks/linear_eval_cost.py).

The optimisers are written out here because torch's cannot give each slice of one tensor its own lr and weight
decay; each follows torch's update rule exactly (tests/evaluate/test_probe.py checks them against torch.optim
on one head):
- SGD (torch.optim.SGD, dampening 0, no Nesterov): g += wd·W; buf = m·buf + g (buf = g at the first step);
  W -= lr·buf. Weight decay applies to the bias too, as when `linear.parameters()` is handed to
  torch.optim.SGD in DINO's eval_linear.py.
- AdamW (torch.optim.AdamW): W *= 1 - lr·wd; m, v moving averages with bias correction;
  W -= lr·m̂/(√v̂ + eps).

The initialisation is DINO's (eval_linear.py LinearClassifier): weight ~ N(0, 0.01²), bias 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pathssl_cli.console import info, progress, progress_enabled


@dataclass(frozen=True)
class HeadConfig:
    lr: float
    weight_decay: float
    seed: int


@dataclass(frozen=True)
class ProbeSchedule:
    """What all heads share: optimiser kind, number of steps, batch size and when to validate."""

    optimizer: Literal["sgd", "adamw"]
    steps: int
    batch_size: int
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_every: int = 100
    select_by: Literal["top1", "balanced_acc"] = "top1"


@dataclass(frozen=True)
class EvalPoint:
    """One validation pass: the step after which it ran, the mean train loss of that step over heads, and
    every head's validation score."""

    step: int
    train_loss: float  # mean over heads of each head's minibatch loss
    val: list[float]


@dataclass
class ProbeResult:
    """Best-by-validation weights of every head and the validation score each reached."""

    weight: torch.Tensor  # (G, D, C)
    bias: torch.Tensor  # (G, C)
    best_val: torch.Tensor  # (G,) selection metric of the kept weights
    best_step: torch.Tensor  # (G,) step after which they were kept
    history: list[EvalPoint] = field(default_factory=list)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(G, N, C) logits of every head."""
        return all_head_logits(features, self.weight, self.bias)


def lr_factors(schedule: ProbeSchedule) -> np.ndarray:
    """Per-step multiplier of each head's lr: half cosine from 1 towards 0 (as torch's CosineAnnealingLR with
    eta_min 0 stepped every step), or 1 throughout."""
    i = np.arange(schedule.steps)
    if schedule.lr_schedule == "constant":
        return np.ones(schedule.steps)
    return 0.5 * (1.0 + np.cos(np.pi * i / schedule.steps))


def selection_metric(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int, kind: Literal["top1", "balanced_acc"]
) -> torch.Tensor:
    """(G,) top-1 accuracy or balanced accuracy (mean recall over classes present in `targets`) per head."""
    correct = (logits.argmax(dim=2) == targets[None, :]).float()  # (G, N)
    if kind == "top1":
        return correct.mean(dim=1)
    onehot = F.one_hot(targets, num_classes).float()  # (N, C)
    support = onehot.sum(dim=0)  # (C,)
    recall = (correct @ onehot) / support.clamp(min=1)  # (G, C)
    present = support > 0
    return recall[:, present].mean(dim=1)


def all_head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(G, N, C) logits of every head from one (N, D) × (D, G·C) matrix product."""
    g_count, dim, num_classes = weight.shape
    flat = features.float() @ weight.permute(1, 0, 2).reshape(dim, g_count * num_classes)
    return flat.view(-1, g_count, num_classes).permute(1, 0, 2) + bias[:, None, :]


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    heads: list[HeadConfig],
    schedule: ProbeSchedule,
    desc: str = "linear probes",
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Train every head in `heads` for `schedule.steps` minibatch steps; keep each head's best-by-val weights.

    train_x: (N, D) float features, train_y: (N,) int64. The heads of one seed share that seed's
    initialisation and its minibatch order (a fresh permutation every epoch), so within a seed only lr and
    weight decay differ, and seeds differ in both. Sharing the order lets one (B, D) × (D, H·C) product serve
    all H heads of a seed, instead of copying a minibatch per head. Every seed must have the same heads.

    On the CPU the loop runs on one thread: each step is a few small products (tens of MFLOP), too little to
    share, and OpenMP's synchronisation then costs more than it saves — on a busy 2-core machine the same
    sweep took 160-190 s on 2 threads and 10-24 s on one (benchmarks/linear_eval_cost.py).
    """
    device = torch.device(device)
    if device.type != "cpu":
        return _train_probes(train_x, train_y, val_x, val_y, num_classes, heads, schedule, desc, device)
    with cpu_threads(1):
        return _train_probes(train_x, train_y, val_x, val_y, num_classes, heads, schedule, desc, device)


@torch.no_grad()
def _train_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    heads: list[HeadConfig],
    schedule: ProbeSchedule,
    desc: str,
    device: torch.device,
) -> ProbeResult:
    n, dim = train_x.shape
    seeds = list(dict.fromkeys(h.seed for h in heads))
    groups = [[g for g, h in enumerate(heads) if h.seed == seed] for seed in seeds]
    per_seed = len(groups[0])
    if any(len(group) != per_seed for group in groups):
        raise ValueError("every seed needs the same number of heads (a full lr × weight-decay grid per seed)")
    # Work in seed-major order (head j of seed s at s * per_seed + j); `back` restores the caller's order.
    order_of = torch.tensor([g for group in groups for g in group])
    back = torch.argsort(order_of)
    g_count, s_count = len(heads), len(seeds)
    train_x, val_x = train_x.float().to(device), val_x.float().to(device)
    train_y, val_y = train_y.long().to(device), val_y.long().to(device)
    batch = min(schedule.batch_size, n)

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    init = torch.stack([torch.randn(dim, num_classes, generator=gen) * 0.01 for gen in generators])
    weight = init.repeat_interleave(per_seed, dim=0).to(device)  # (G, D, C), seed-major
    bias = torch.zeros(g_count, num_classes, device=device)
    lr = torch.tensor([heads[g].lr for g in order_of.tolist()], dtype=torch.float32, device=device)
    wd = torch.tensor([heads[g].weight_decay for g in order_of.tolist()], dtype=torch.float32, device=device)
    factors = lr_factors(schedule)

    state_w = [torch.zeros_like(weight), torch.zeros_like(weight)]  # SGD: buf; AdamW: m, v
    state_b = [torch.zeros_like(bias), torch.zeros_like(bias)]
    best_w, best_b = weight.clone(), bias.clone()
    best_val = torch.full((g_count,), -1.0, device=device)
    best_step = torch.zeros(g_count, dtype=torch.long, device=device)
    history: list[EvalPoint] = []

    order = torch.empty(s_count, 0, dtype=torch.long)
    lines, next_line = not progress_enabled(), max(1, schedule.steps // 10)
    with progress(total=schedule.steps, desc=desc, unit="step") as bar:
        for step in range(schedule.steps):
            if order.shape[1] < batch:
                # A fresh epoch per seed, appended so that no sample is skipped at the epoch boundary.
                fresh = torch.stack([torch.randperm(n, generator=gen) for gen in generators])
                order = torch.cat([order, fresh], dim=1)
            idx, order = order[:, :batch].to(device), order[:, batch:]
            inputs = train_x[idx]  # (S, B, D): one minibatch per seed, shared by that seed's heads
            grouped_w = weight.view(s_count, per_seed, dim, num_classes).permute(0, 2, 1, 3)
            logits = torch.bmm(inputs, grouped_w.reshape(s_count, dim, per_seed * num_classes))
            logits = logits.view(s_count, batch, per_seed, num_classes) + bias.view(s_count, 1, per_seed, -1)
            # Cross-entropy gradient in closed form, (softmax - onehot) / B per head: cheaper than autograd
            # for a linear layer, and each head gets exactly the gradient of its own mean loss.
            probs = logits.softmax(dim=-1)
            targets = train_y[idx][:, :, None, None].expand(-1, -1, per_seed, 1)
            picked = probs.gather(-1, targets)
            grad_logits = probs.scatter_(-1, targets, picked - 1.0).div_(batch)
            grad_w = torch.bmm(inputs.transpose(1, 2), grad_logits.view(s_count, batch, -1))
            grad_w = (
                grad_w.view(s_count, dim, per_seed, num_classes).permute(0, 2, 1, 3).reshape(weight.shape)
            )
            grad_b = grad_logits.sum(dim=1).reshape(bias.shape)
            step_lr = lr * float(factors[step])
            _update(weight, grad_w, state_w, step_lr, wd, step, schedule)
            _update(bias, grad_b, state_b, step_lr, wd, step, schedule)
            last = step + 1 == schedule.steps
            if (step + 1) % schedule.eval_every == 0 or last:
                val_logits = all_head_logits(val_x, weight, bias)
                score = selection_metric(val_logits, val_y, num_classes, schedule.select_by)
                improved = score > best_val
                best_w[improved] = weight[improved]
                best_b[improved] = bias[improved]
                best_val = torch.where(improved, score, best_val)
                best_step = torch.where(improved, torch.full_like(best_step, step + 1), best_step)
                train_loss = -picked.clamp_min(1e-12).log().mean().item()  # this step's, mean over heads
                history.append(EvalPoint(step + 1, train_loss, score[back.to(device)].tolist()))
                bar.set_postfix(val_best=f"{best_val.max().item():.4f}")
                if lines and (step + 1 >= next_line or last):
                    # Off a terminal the bar is silent: a log line per tenth of the sweep shows it advancing.
                    info(f"{desc}: step {step + 1}/{schedule.steps}, best val {schedule.select_by} "
                         f"{best_val.max().item():.4f}, train loss {train_loss:.4f}")
                    next_line = step + 1 + max(1, schedule.steps // 10)
            bar.update(1)
    back = back.to(device)
    return ProbeResult(
        weight=best_w[back].cpu(),
        bias=best_b[back].cpu(),
        best_val=best_val[back].cpu(),
        best_step=best_step[back].cpu(),
        history=history,
    )


def _update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: list[torch.Tensor],
    lr: torch.Tensor,
    wd: torch.Tensor,
    step: int,
    schedule: ProbeSchedule,
) -> None:
    """One in-place optimiser step; lr and wd are (G,) and broadcast over each head's slice."""
    shape = (-1,) + (1,) * (param.ndim - 1)
    lr_b, wd_b = lr.view(shape), wd.view(shape)
    if schedule.optimizer == "sgd":
        grad = grad + wd_b * param
        buf = state[0]
        if step == 0:
            buf.copy_(grad)
        else:
            buf.mul_(schedule.momentum).add_(grad)
        param.sub_(lr_b * buf)
        return
    beta1, beta2 = schedule.betas
    t = step + 1
    param.mul_(1.0 - lr_b * wd_b)
    m, v = state
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    m_hat = m / (1.0 - beta1**t)
    denom = (v / (1.0 - beta2**t)).sqrt().add_(schedule.eps)
    param.sub_(lr_b * m_hat / denom)


def steps_for_epochs(epochs: int, n_train: int, batch_size: int) -> int:
    """Minibatch steps in `epochs` passes over `n_train` samples (the last batch of a pass may be partial in
    a per-epoch loader; here batches run on across epochs, so this is the same number of samples seen)."""
    return max(1, math.ceil(epochs * n_train / max(1, min(batch_size, n_train))))
