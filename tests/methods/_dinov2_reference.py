"""Float64 re-derivations of DINOv2's objectives, written from the paper and facebookresearch/dinov2's
definitions with numpy and loops, independent of pathssl_cli's code: the reference the dinov2 tests compare
against (values and hand-derived gradients)."""

from __future__ import annotations

import math

import numpy as np


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy_np(targets: np.ndarray, logits: np.ndarray, tau: float) -> np.ndarray:
    """−Σ_k t_k log softmax(s / τ)_k per row."""
    return -(targets * log_softmax_np(logits / tau)).sum(axis=-1)


def sinkhorn_np(logits: np.ndarray, tau: float, iterations: int, n: float) -> np.ndarray:
    """dinov2's Sinkhorn-Knopp in one process, element by element: Q = exp(t/τ)ᵀ (K × B) / its sum; rows to
    1/K, columns to 1/n; finally × n."""
    q = np.exp(logits / tau).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for i in range(k):
            q[i, :] = q[i, :] / q[i, :].sum() / k
        for j in range(b):
            q[:, j] = q[:, j] / q[:, j].sum() / n
    return (q * n).T


def koleo_np(x: np.ndarray, eps: float = 1e-8) -> tuple[float, np.ndarray]:
    """KoLeo and its gradient: u = x / max(‖x‖, eps); nn(i) = argmin_{j≠i} ‖u_i − u_j‖ (lowest index on a
    tie); d_i = ‖u_i − u_nn(i) + 1e-8·1‖; L = −mean log(d_i + eps). ∂L/∂u_i gets −g_i from its own term and
    +g_i on its neighbour, g_i = (u_i − u_nn + 1e-8) / (d_i (d_i + eps) B); through the norm,
    ∂u/∂x = (I − u uᵀ) / ‖x‖."""
    b, dim = x.shape
    norms = np.maximum(np.linalg.norm(x, axis=1), eps)
    u = x / norms[:, None]
    loss, grad_u = 0.0, np.zeros_like(u)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        nn_i = min(others, key=lambda j: (np.linalg.norm(u[i] - u[j]), j))
        diff = u[i] - u[nn_i] + 1e-8
        d = math.sqrt(float((diff**2).sum()))
        loss -= math.log(d + eps) / b
        g = diff / (d * (d + eps) * b)
        grad_u[i] -= g
        grad_u[nn_i] += g
    grad_x = np.stack([(np.eye(dim) - np.outer(u[i], u[i])) @ grad_u[i] / norms[i] for i in range(b)])
    return loss, grad_x


def dinov2_loss_np(student_local: np.ndarray, student_global: np.ndarray, teacher_global_probs: np.ndarray,
                   student_cls: np.ndarray, student_masked: np.ndarray, teacher_masked_probs: np.ndarray,
                   masks: np.ndarray, n_local: int, tau_s: float, w_dino: float = 1.0, w_koleo: float = 0.1,
                   w_ibot: float = 1.0) -> float:
    """The DINOv2 objective of one step from the paper's terms, pair by pair, not from dinov2's code layout.

    teacher_global_probs (2, B, K): the teacher's targets of global crops A and B. DINO: every (student crop,
    teacher crop) pair of different crops, each local crop with both teacher crops and each global crop with
    the other one, contributes its mean cross-entropy over images; the sum is divided by 2 + max(2 n_local, 1)
    (the number of such pairs; dinov2 counts 3 when there are no local crops). KoLeo: on each global crop's
    backbone CLS tokens, summed over the two crops. iBOT: per crop, the mean cross-entropy over its masked
    patches (0 for an unmasked crop), averaged over all 2B crops.
    """
    _, batch, _ = teacher_global_probs.shape
    n_pairs = 2 + max(2 * n_local, 1)
    dino = 0.0
    for v in range(n_local):
        for t in range(2):
            s = student_local[v * batch:(v + 1) * batch]
            dino += cross_entropy_np(teacher_global_probs[t], s, tau_s).mean() / n_pairs
    for crop in range(2):
        s = student_global[crop * batch:(crop + 1) * batch]
        dino += cross_entropy_np(teacher_global_probs[1 - crop], s, tau_s).mean() / n_pairs
    koleo = sum(koleo_np(student_cls[c * batch:(c + 1) * batch])[0] for c in range(2))
    crop_of = np.nonzero(masks)[0]
    ce = cross_entropy_np(teacher_masked_probs, student_masked, tau_s)
    ibot = 0.0
    for crop in range(masks.shape[0]):
        rows = ce[crop_of == crop]
        if len(rows):
            ibot += rows.mean() / masks.shape[0]
    return w_dino * dino + w_koleo * koleo + w_ibot * ibot
