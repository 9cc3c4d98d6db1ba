"""DINOv2's pure functions (pathssl_cli/methods/dinov2.py) against float64 re-derivations written here from the
paper's and facebookresearch/dinov2's definitions: Python/numpy loops for the values, hand-derived formulas
for the gradients. The functions take and return float32, as dinov2 runs them; tolerances are float32's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _dinov2_reference import koleo_np, sinkhorn_np, softmax_np

from pathssl_cli.methods.dinov2 import (
    dino_cls_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    teacher_temperature_schedule,
    update_center,
)

RTOL = 2e-6  # a few float32 ulps: float32 arithmetic against the exact (float64) value


def f32(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def rounded(x: np.ndarray) -> np.ndarray:
    """The float32 input the function sees, in float64 (the references start from the same numbers)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


# ------------------------------------------------------------------------------------------ DINO CLS loss
def test_dino_cls_loss_sums_every_pair_and_its_gradient() -> None:
    rng = np.random.default_rng(0)
    students = [rounded(rng.normal(size=(5, 7))) for _ in range(3)]
    teachers = [rounded(rng.dirichlet(np.ones(7), size=5)) for _ in range(2)]
    tau = 0.1
    expected = 0.0
    for s in students:
        for t in teachers:  # every pair, the same crop included: the caller picks the pairs
            for b in range(5):
                log_p = s[b] / tau - math.log(sum(math.exp(v / tau) for v in s[b]))
                expected -= sum(t[b, k] * log_p[k] for k in range(7)) / 5
    inputs = [f32(s).requires_grad_() for s in students]
    got = dino_cls_loss(inputs, [f32(t) for t in teachers], tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    for s, x in zip(students, inputs, strict=True):
        # d/ds of −Σ_t mean_b Σ_k t log softmax(s/τ) = −Σ_t (t − softmax(s/τ) Σ_k t) / (τ B)
        p = softmax_np(s / tau)
        grad = -sum(t - p * t.sum(axis=1, keepdims=True) for t in teachers) / (tau * 5)
        np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_dino_cls_loss_hand_worked() -> None:
    # uniform student over K = 4, one-hot teacher: −log(1/4) per pair; 2 × 3 pairs
    loss = dino_cls_loss([torch.zeros(2, 4)] * 2, [torch.eye(4)[:2]] * 3, 0.1)
    assert loss.item() == pytest.approx(6 * math.log(4), rel=1e-6)


# -------------------------------------------------------------------------------------- centring, centres
@pytest.mark.parametrize("patches", [False, True])
def test_softmax_centring_and_centre_over_two_steps(patches: bool) -> None:
    rng = np.random.default_rng(1)
    shape = (3, 4, 6) if patches else (5, 6)  # (B, T, K) patch tokens or (B, K) CLS tokens
    center = np.zeros((1, 1, 6) if patches else (1, 6))
    c = f32(center)
    for step, tau in enumerate((0.04, 0.055)):
        logits = rounded(rng.normal(size=shape) * 2)
        probs = np.empty(shape)
        for index in np.ndindex(shape[:-1]):  # softmax((t − c) / τ), row by row
            z = [(logits[index][k] - center.reshape(-1)[k]) / tau for k in range(6)]
            probs[index] = [math.exp(v - max(z)) / sum(math.exp(u - max(z)) for u in z) for v in z]
        got = softmax_center_teacher(f32(logits), c, tau)
        assert got.dtype == torch.float32 and got.shape == shape
        np.testing.assert_allclose(got.numpy(), probs, rtol=1e-5, atol=1e-7)
        # the batch mean: over T first, then B (iBOT), or over rows (DINO)
        mean = logits.mean(axis=1).mean(axis=0) if patches else logits.mean(axis=0)
        center = 0.9 * center + 0.1 * mean.reshape(center.shape)
        c = update_center(c, f32(logits), 0.9)
        assert c.dtype == torch.float32 and c.shape == center.shape, step
        np.testing.assert_allclose(c.numpy(), center, rtol=RTOL, atol=1e-7)


# ------------------------------------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_knopp_matches_loops(iterations: int) -> None:
    rng = np.random.default_rng(2)
    logits = rounded(np.tanh(rng.normal(size=(9, 5))))  # cosine-like logits, as DINOHead gives
    got = sinkhorn_knopp_teacher(f32(logits), 0.05, n_iterations=iterations)
    assert got.dtype == torch.float32 and got.shape == (9, 5)
    np.testing.assert_allclose(got.numpy(), sinkhorn_np(logits, 0.05, iterations, 9), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), np.ones(9), rtol=1e-6)  # each row a distribution
    # iBOT: n = the global number of masked patches (here as if 12 patches were spread over ranks)
    got_n = sinkhorn_knopp_teacher(f32(logits), 0.05, n_iterations=iterations, n_samples=12)
    np.testing.assert_allclose(got_n.numpy(), sinkhorn_np(logits, 0.05, iterations, 12), rtol=1e-5, atol=1e-9)
    tensor_n = sinkhorn_knopp_teacher(f32(logits), 0.05, n_iterations=iterations, n_samples=torch.tensor([12.0]))
    torch.testing.assert_close(tensor_n, got_n, rtol=0, atol=0)


def test_sinkhorn_knopp_equalises_prototypes_and_survives_large_logits() -> None:
    rng = np.random.default_rng(3)
    logits = np.tanh(rng.normal(size=(40, 4)))
    q = sinkhorn_knopp_teacher(f32(logits), 0.5, n_iterations=200)
    np.testing.assert_allclose(q.sum(dim=0).numpy(), np.full(4, 10.0), rtol=1e-4)  # 40 samples / 4 protos
    # logits / τ of 100-200 overflow exp in float32 (exp(89) = inf); a shift cancels in the normalisation
    big = rounded(1.0 + rng.uniform(size=(6, 3)))
    got = sinkhorn_knopp_teacher(f32(big), 0.01, n_iterations=3)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), sinkhorn_np(big, 0.01, 3, 6), rtol=1e-4, atol=1e-9)
    ordered = torch.randperm(40, generator=torch.Generator().manual_seed(0))  # equivariant in the samples
    torch.testing.assert_close(sinkhorn_knopp_teacher(f32(logits[ordered.numpy()]), 0.5, 3),
                               sinkhorn_knopp_teacher(f32(logits), 0.5, 3)[ordered])


# --------------------------------------------------------------------------------------------- iBOT loss
def test_ibot_patch_loss_is_the_mean_over_crops_of_each_crops_mean_patch_loss() -> None:
    rng = np.random.default_rng(4)
    masks = np.zeros((4, 6), dtype=bool)  # 4 crops of 6 patches: 3, 1, 0 and 2 masked
    masks[0, [0, 2, 5]], masks[1, 3], masks[3, [1, 4]] = True, True, True
    m = int(masks.sum())
    s, t, tau = rounded(rng.normal(size=(m, 5))), rounded(rng.dirichlet(np.ones(5), size=m)), 0.1
    crop_of = np.nonzero(masks)[0]
    expected = 0.0
    for crop in range(4):  # mean patch cross-entropy of each crop (0 for an unmasked crop), mean over crops
        rows = np.nonzero(crop_of == crop)[0]
        if len(rows):
            ce = [-(t[r] * (s[r] / tau - math.log(np.exp(s[r] / tau).sum()))).sum() for r in rows]
            expected += sum(ce) / len(rows) / 4
    weights = f32(1.0 / masks.sum(axis=1)[crop_of])
    x = f32(s).requires_grad_()
    got = ibot_patch_loss(x, f32(t), weights, 4, tau)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    # d/ds_r = −w_r (t_r − softmax(s_r/τ)) / (τ n_images)
    grad = -(1.0 / masks.sum(axis=1)[crop_of])[:, None] * (t - softmax_np(s / tau)) / (tau * 4)
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------- KoLeo
def test_koleo_matches_a_float64_rederivation_with_gradient() -> None:
    x = rounded(np.random.default_rng(5).normal(size=(7, 4)))
    expected, grad = koleo_np(x)
    inp = f32(x).requires_grad_()
    got = koleo_loss(inp)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    np.testing.assert_allclose(inp.grad.numpy(), grad, rtol=1e-4, atol=1e-6)


def test_koleo_duplicate_row_takes_the_eps_path() -> None:
    """Rows 0 and 1 are exact duplicates, each the other's neighbour: distance ‖0 + 1e-8·1‖ = 1e-8 √4, so
    their terms are −log(2e-8 + 1e-8); rows 2 and 3 (dot 0.8) are each other's neighbours. Hand-worked, then
    the float64 re-derivation with its gradient on a random batch holding a duplicate."""
    x = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0.8, 0.6, 0]])
    far = math.sqrt((0.2 + 1e-8) ** 2 + (-0.6 + 1e-8) ** 2 + 2e-16)
    expected = -(2 * math.log(2e-8 + 1e-8) + 2 * math.log(far + 1e-8)) / 4
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)

    # no third row may have the duplicated point as its neighbour: which twin it then picks is a tie that
    # torch.max breaks its own way (the loss is the same, the gradient lands on the other twin)
    rng = np.random.default_rng(6)
    x_np = rounded(rng.normal(size=(5, 4)))
    x_np[:, 0] = -np.abs(x_np[:, 0]) - 1.0
    x_np[1] = x_np[3] = [3.0, 0.5, -0.25, 1.0]
    expected, grad = koleo_np(x_np)
    inp = f32(x_np).requires_grad_()
    got = koleo_loss(inp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.isfinite(inp.grad).all()
    np.testing.assert_allclose(inp.grad.numpy(), grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max())


def test_koleo_is_invariant_to_scale_and_row_order() -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(koleo_loss(3.0 * x), koleo_loss(x))
    torch.testing.assert_close(koleo_loss(x[torch.randperm(6)]), koleo_loss(x))


# ------------------------------------------------------------------------------------------------ schedules
def test_teacher_temperature_warms_up_per_step_then_holds() -> None:
    temps = teacher_temperature_schedule(0.04, 0.07, warmup_steps=4, total_steps=7)
    np.testing.assert_allclose(temps[:7], [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 0, 3), [0.07, 0.07, 0.07])


def test_a_warmup_longer_than_the_run_keeps_its_rate_and_is_cut() -> None:
    # 20 warm-up steps in an 8-step run: step k is at 0.04 + 0.03 k / 19, as if the run went on (it used to be
    # compressed into the 8 steps, reaching 0.07 at step 7: not the warm-up the spec names)
    temps = teacher_temperature_schedule(0.04, 0.07, warmup_steps=20, total_steps=8)
    np.testing.assert_allclose(temps[:8], [0.04 + 0.03 * k / 19 for k in range(8)])
