"""Schedules, the linear scaling rule and LARS against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pathssl_cli.optim import (
    LARC,
    LARS,
    Schedules,
    apply_schedules,
    build_optimizer,
    cosine_schedule,
    decay_split,
    scaled_lr,
)


def test_linear_scaling_rule() -> None:
    # DINO: 0.0005 per 256 images at a global batch of 1024 -> 0.002.
    assert scaled_lr(0.0005, 1024) == pytest.approx(0.002)
    # Barlow Twins: lr 0.2 "per 256" at batch 2048 -> 1.6.
    assert scaled_lr(0.2, 2048) == pytest.approx(1.6)
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)


def test_cosine_without_warmup_by_hand() -> None:
    values = cosine_schedule(1.0, 0.0, total_steps=4)
    # end + (start-end)(1+cos(pi i/4))/2 for i = 0..3
    expected = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)


def test_cosine_with_warmup_by_hand() -> None:
    values = cosine_schedule(2.0, 1.0, total_steps=6, warmup_steps=3, warmup_start=0.5)
    # warm-up linspace(0.5, 2, 3) = 0.5, 1.25, 2; then cosine over 3 steps from 2 to 1.
    expected = [0.5, 1.25, 2.0, 2.0, 1 + (1 + math.cos(math.pi / 3)) / 2,
                1 + (1 + math.cos(2 * math.pi / 3)) / 2]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert len(values) == 6


def test_dino_weight_decay_rises_from_004_towards_04() -> None:
    values = cosine_schedule(0.04, 0.4, total_steps=1000)
    assert values[0] == pytest.approx(0.04)
    assert np.all(np.diff(values) > 0)
    assert 0.399 < values[-1] < 0.4


def test_warmup_longer_than_run_is_all_warmup() -> None:
    values = cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=10)
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0])


def test_lars_two_steps_by_hand() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([{"params": [p]}], lr=10.0, weight_decay=0.1, momentum=0.9, eta=0.001)
    grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    p.grad = grad.clone()
    opt.step()
    # d = g + 0.1 p = [0.9, 1.2] (norm 1.5); trust = 0.001 * 5 / 1.5; d*trust = [0.003, 0.004]; p -= 10 mu
    torch.testing.assert_close(p.detach(), torch.tensor([2.97, 3.96], dtype=torch.float64))
    p.grad = grad.clone()
    opt.step()
    # d = [0.897, 1.196] (norm 1.495), |p| = 4.95 -> d*trust = [0.00297, 0.00396];
    # mu = 0.9*[0.003, 0.004] + that = [0.00567, 0.00756]; p -= 10 mu
    torch.testing.assert_close(p.detach(), torch.tensor([2.9133, 3.8844], dtype=torch.float64))


def test_lars_excluded_group_is_plain_momentum_sgd() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": True}], lr=0.5, weight_decay=0.0, momentum=0.9)
    for expected in ([0.95, -2.1], [0.855, -2.29]):
        p.grad = torch.tensor([0.1, 0.2], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))


def test_lars_zero_parameter_norm_falls_back_to_unit_trust() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = LARS([{"params": [p]}], lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.001)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(3))


def test_larc_two_steps_by_hand() -> None:
    """apex LARC (swav): d = (g + wd p) · eta‖p‖ / (‖g‖ + wd‖p‖ + eps), then momentum SGD."""
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARC([{"params": [p]}], lr=10.0, weight_decay=0.1, momentum=0.9, eta=0.001, eps=0.0)
    grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    p.grad = grad.clone()
    opt.step()
    # ‖g‖ = 1, ‖p‖ = 5: rate = 0.001·5 / (1 + 0.5) = 1/300; d = [0.9, 1.2] / 300 = [0.003, 0.004]
    torch.testing.assert_close(p.detach(), torch.tensor([2.97, 3.96], dtype=torch.float64))
    p.grad = grad.clone()
    opt.step()
    # ‖p‖ = 4.95: rate = 0.00495 / 1.495; g + 0.1 p = [0.897, 1.196]; mu = 0.9 mu + d; p -= 10 mu
    rate = 0.00495 / 1.495
    mu = 0.9 * torch.tensor([0.003, 0.004], dtype=torch.float64) + rate * torch.tensor([0.897, 1.196],
                                                                                       dtype=torch.float64)
    torch.testing.assert_close(p.detach(), torch.tensor([2.97, 3.96], dtype=torch.float64) - 10 * mu)


def test_larc_differs_from_lars_where_gradient_and_decay_disagree() -> None:
    """LARS divides by ‖g + wd p‖, LARC by ‖g‖ + wd‖p‖: they agree only when g is parallel to p."""
    def one_step(optimizer_class: type) -> torch.Tensor:
        p = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
        opt = optimizer_class([{"params": [p]}], lr=1.0, weight_decay=0.5, momentum=0.0, eta=1.0)
        p.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
        opt.step()
        return p.detach()

    # d = g + 0.5 p = [0.5, 1]; LARS: × 1/‖d‖ = 1/1.1180; LARC: × 1/(1 + 0.5) = 1/1.5
    torch.testing.assert_close(one_step(LARS), torch.tensor([1 - 0.5 / 1.25**0.5, -1 / 1.25**0.5],
                                                           dtype=torch.float64))
    torch.testing.assert_close(one_step(LARC), torch.tensor([1 - 0.5 / 1.5, -1 / 1.5], dtype=torch.float64))


def test_larc_zero_norm_takes_the_plain_gradient_without_decay() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = LARC([{"params": [p]}], lr=1.0, weight_decay=0.3, momentum=0.0)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(3))


def test_groups_get_scheduled_lr_and_no_decay_on_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = decay_split(model)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1]
    opt = build_optimizer("lars", groups, no_decay_lr_scale=0.024)
    schedules = Schedules(lr=np.array([0.2, 0.1]), weight_decay=np.array([1.5e-6, 1.5e-6]))
    assert apply_schedules(opt, schedules, 1) == pytest.approx(0.1)
    decayed, plain = opt.param_groups
    assert decayed["lr"] == pytest.approx(0.1) and decayed["weight_decay"] == pytest.approx(1.5e-6)
    assert plain["lr"] == pytest.approx(0.1 * 0.024) and plain["weight_decay"] == 0.0
    assert plain["lars_exclude"] and not decayed["lars_exclude"]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_torch_optimisers_take_group_weight_decay(name: str) -> None:
    model = nn.Linear(2, 2)
    opt = build_optimizer(name, decay_split(model))
    apply_schedules(opt, Schedules(lr=np.array([0.1]), weight_decay=np.array([0.04])), 0)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]


def test_build_schedules_combines_warmup_cosine_and_weight_decay() -> None:
    from pathssl_cli.optim import build_schedules

    s = build_schedules(peak_lr=2.0, total_steps=5, warmup_steps=2, final_lr_fraction=0.5,
                        warmup_start_fraction=0.25, weight_decay=0.04, weight_decay_end=0.4)
    # warm-up linspace(0.5, 2, 2) = [0.5, 2]; cosine 2 -> 1 over 3 steps: 1 + (1 + cos(pi i / 3)) / 2
    np.testing.assert_allclose(s.lr, [0.5, 2.0, 2.0, 1.75, 1.25])
    np.testing.assert_allclose(s.weight_decay[0], 0.04)
    # step 2 of 5: 0.4 + (0.04 - 0.4)(1 + cos(2 pi / 5)) / 2, cos(2 pi / 5) = (sqrt(5) - 1) / 4
    np.testing.assert_allclose(s.weight_decay[2], 0.4 - 0.18 * (1 + (math.sqrt(5) - 1) / 4))
    constant = build_schedules(peak_lr=1.0, total_steps=3, weight_decay=1e-4)
    np.testing.assert_allclose(constant.weight_decay, [1e-4] * 3)
