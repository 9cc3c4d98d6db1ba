"""The SSL losses, Sinkhorn-Knopp, the DINO centre and the MoCo queue against independent re-derivations:
plain
numpy / Python loops written from the papers' and official repositories' definitions, and hand-worked
cases."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathssl_cli.methods import (
    barlow_twins_loss,
    dino_loss,
    infonce_loss,
    sinkhorn_knopp,
    swav_loss,
    update_center,
)
from pathssl_cli.methods.barlow_twins import off_diagonal
from pathssl_cli.methods.heads import GlobalBatchNorm1d
from pathssl_cli.methods.mocov2 import enqueue


@pytest.fixture(autouse=True, scope="module")
def _float64() -> Iterator[None]:
    """These tests compare against float64 numpy; the default dtype is restored for other modules."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - math.log(np.exp(shifted).sum())


# ---------------------------------------------------------------------------------------------------- InfoNCE
def test_infonce_hand_worked() -> None:
    # q = k+ = e1, one negative e2, T = 1: logits [1, 0] -> -log(e / (e + 1)) = log(1 + 1/e)
    q = torch.tensor([[1.0, 0.0]])
    loss = infonce_loss(q, q.clone(), torch.tensor([[0.0, 1.0]]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


def test_infonce_matches_loop_and_is_invariant_to_queue_order() -> None:
    rng = np.random.default_rng(0)
    q, k, queue = unit_rows(rng, 5, 8), unit_rows(rng, 5, 8), unit_rows(rng, 11, 8)
    t = 0.2
    expected = 0.0
    for i in range(5):
        logits = [q[i] @ k[i] / t] + [q[i] @ n / t for n in queue]
        expected += -log_softmax_np(np.array(logits))[0] / 5
    got = infonce_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), t)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    shuffled = torch.tensor(queue[rng.permutation(11)])
    got_shuffled = infonce_loss(torch.tensor(q), torch.tensor(k), shuffled, t)
    assert got_shuffled.item() == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------------- MoCo queue
def test_enqueue_wraps_around() -> None:
    queue = torch.zeros(5, 2)
    pointer = torch.tensor([3])
    keys = torch.arange(8.0).view(4, 2)  # rows 0..3 go to slots 3, 4, 0, 1
    enqueue(queue, pointer, keys)
    assert queue.tolist() == [[4, 5], [6, 7], [0, 0], [0, 1], [2, 3]]
    assert pointer.item() == 2


def test_enqueue_multi_step_matches_a_list_ring_buffer() -> None:
    size, rng = 7, np.random.default_rng(1)
    queue, pointer = torch.zeros(size, 3), torch.zeros(1, dtype=torch.long)
    ring, position = [[0.0] * 3 for _ in range(size)], 0
    for n in (2, 3, 4, 1, 7, 9, 5):  # 9 > size: only the newest 7 survive, in ring order
        keys = rng.normal(size=(n, 3))
        enqueue(queue, pointer, torch.tensor(keys))
        for row in keys:  # one key at a time, the textbook ring buffer
            ring[position] = list(row)
            position = (position + 1) % size
        np.testing.assert_allclose(queue.numpy(), np.array(ring))
        assert pointer.item() == position


# --------------------------------------------------------------------------------------------------- Sinkhorn
def sinkhorn_np(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """swav `distributed_sinkhorn` in a single process, element by element."""
    q = np.exp(scores / eps).T  # (K, B)
    n_protos, n_samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(n_protos):
            q[k, :] = q[k, :] / q[k, :].sum() / n_protos
        for b in range(n_samples):
            q[:, b] = q[:, b] / q[:, b].sum() / n_samples
    for b in range(n_samples):
        q[:, b] = q[:, b] / q[:, b].sum()
    return q.T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_matches_loops(iterations: int) -> None:
    rng = np.random.default_rng(2)
    scores = unit_rows(rng, 9, 6) @ unit_rows(rng, 4, 6).T  # cosine scores, 9 samples, 4 prototypes
    got = sinkhorn_knopp(torch.tensor(scores), epsilon=0.05, n_iterations=iterations)
    np.testing.assert_allclose(got.numpy(), sinkhorn_np(scores, 0.05, iterations), rtol=1e-5, atol=1e-12)


def test_sinkhorn_marginals_and_invariances() -> None:
    rng = np.random.default_rng(3)
    scores = torch.tensor(unit_rows(rng, 12, 5) @ unit_rows(rng, 3, 5).T)
    codes = sinkhorn_knopp(scores, epsilon=0.3, n_iterations=200)
    # each sample's code is a distribution, and the clusters get equal shares of the samples
    np.testing.assert_allclose(codes.sum(dim=1).numpy(), np.ones(12), rtol=1e-10)
    np.testing.assert_allclose(codes.sum(dim=0).numpy(), np.full(3, 12 / 3), rtol=1e-6)
    few = sinkhorn_knopp(scores, epsilon=0.05, n_iterations=3)
    order = torch.randperm(12)
    torch.testing.assert_close(sinkhorn_knopp(scores[order], 0.05, 3), few[order])  # equivariant in samples
    torch.testing.assert_close(sinkhorn_knopp(scores + 0.7, 0.05, 3), few)  # a constant shift cancels
    # a sample much closer to one prototype puts most of its mass there
    assert codes[scores.argmax(dim=1) == 0, 0].min() > codes[scores.argmax(dim=1) == 0, 1:].max()


# -------------------------------------------------------------------------------------------------- SwAV loss
def test_swav_loss_matches_loops() -> None:
    rng = np.random.default_rng(4)
    n_views, batch, n_protos, temperature, assign = 4, 3, 5, 0.1, (0, 1)
    scores = rng.normal(size=(n_views, batch, n_protos))
    codes = rng.dirichlet(np.ones(n_protos), size=(len(assign), batch))
    expected = 0.0
    for a, crop in enumerate(assign):
        sub = 0.0
        for v in range(n_views):
            if v == crop:
                continue
            for b in range(batch):
                log_p = log_softmax_np(scores[v, b] / temperature)
                sub -= (codes[a, b] * log_p).sum() / batch
        expected += sub / (n_views - 1)
    expected /= len(assign)
    got = swav_loss(torch.tensor(scores), torch.tensor(codes), assign, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_swav_loss_uniform_is_log_k() -> None:
    scores, codes = torch.zeros(3, 2, 7), torch.full((2, 2, 7), 1 / 7)
    assert swav_loss(scores, codes, (0, 1), 0.1).item() == pytest.approx(math.log(7), rel=1e-12)


# ----------------------------------------------------------------------------------------------- Barlow Twins
def barlow_np(z1: np.ndarray, z2: np.ndarray, lambd: float) -> float:
    def standardize(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # np.var is the biased variance BN uses

    a, b = standardize(z1), standardize(z2)
    n, d = a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return total


def test_barlow_twins_matches_loops_and_invariances() -> None:
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    expected = barlow_np(z1, z2, 0.0051)
    got = barlow_twins_loss(torch.tensor(z1), torch.tensor(z2), 0.0051).item()
    assert got == pytest.approx(expected, rel=1e-5)  # computed in float32 like the official AMP path
    perm = rng.permutation(5)  # the same feature permutation applied to both views
    assert barlow_twins_loss(torch.tensor(z1[:, perm]), torch.tensor(z2[:, perm]), 0.0051).item() == \
        pytest.approx(got, rel=1e-5)
    order = rng.permutation(6)  # the same sample order in both views
    assert barlow_twins_loss(torch.tensor(z1[order]), torch.tensor(z2[order]), 0.0051).item() == \
        pytest.approx(got, rel=1e-5)


def test_barlow_twins_hand_worked_decorrelated_identical_views() -> None:
    # Two ±1 features, zero mean, unit variance, uncorrelated: C = I / (1 + eps), loss = 2 (1 - 1/(1+eps))²
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    expected = 2 * (1 - 1 / (1 + 1e-5)) ** 2
    assert barlow_twins_loss(z, z.clone(), 0.0051).item() == pytest.approx(expected, abs=1e-9)


def test_off_diagonal_is_the_masked_matrix() -> None:
    m = torch.arange(16.0).view(4, 4)
    assert off_diagonal(m).tolist() == [m[i, j].item() for i in range(4) for j in range(4) if i != j]


# ------------------------------------------------------------------------------------------------------ DINO
def test_dino_loss_matches_loops() -> None:
    rng = np.random.default_rng(6)
    n_student, n_teacher, batch, k = 4, 2, 3, 6
    student = rng.normal(size=(n_student * batch, k))
    teacher = rng.normal(size=(n_teacher * batch, k))
    center = rng.normal(size=(1, k)) * 0.1
    t_s, t_t = 0.1, 0.04
    total, terms = 0.0, 0
    for i in range(n_teacher):
        for v in range(n_student):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                p_t = np.exp(log_softmax_np((teacher[i * batch + b] - center[0]) / t_t))
                pair -= (p_t * log_softmax_np(student[v * batch + b] / t_s)).sum() / batch
            total, terms = total + pair, terms + 1
    got = dino_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(center), t_s, t_t, n_student)
    assert got.item() == pytest.approx(total / terms, rel=1e-5)


def test_dino_loss_hand_worked() -> None:
    # One sample, 2 crops (both global), K = 2. Teacher of each view is one-hot-ish; student uniform:
    # each pair costs -Σ p_t log(1/2) = log 2, so the mean is log 2 whatever the teacher.
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[5.0, 0.0], [0.0, 3.0]])
    assert dino_loss(student, teacher, torch.zeros(1, 2), 0.1, 0.04, 2).item() == pytest.approx(math.log(2))


def test_update_center_multi_step_closed_form() -> None:
    # constant teacher batch mean mu from c0 = 0: c_n = mu (1 - m^n)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]])
    mu = teacher.mean(dim=0, keepdim=True)
    center = torch.zeros(1, 3)
    for n in range(1, 6):
        center = update_center(center, teacher, 0.9)
        torch.testing.assert_close(center, mu * (1 - 0.9**n))


# ------------------------------------------------------------------------------------------------- global BN
def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    ours, reference = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    x = torch.randn(7, 5) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert F.mse_loss(ours(x).mean(0), torch.zeros(5)) < 1e-12
