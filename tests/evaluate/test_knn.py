"""Weighted kNN against a brute-force reference written from DINO's description, plus invariances."""

from __future__ import annotations

import math

import pytest
import torch

from pathssl_cli.evaluate.knn import knn_scores


def brute_force_knn(
    train: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """One query at a time with Python loops: cosine similarity to every training sample, sort, vote."""
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for q in range(len(queries)):
        sims = []
        for i in range(len(train)):
            a, b = queries[q].double(), train[i].double()
            sims.append((float(a @ b) / (float(a.norm()) * float(b.norm())), i))
        sims.sort(key=lambda item: -item[0])
        for sim, i in sims[: min(k, len(train))]:
            out[q, int(labels[i])] += math.exp(sim / temperature)
    return out


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_knn_matches_brute_force(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    train = torch.randn(60, 8, generator=gen)
    labels = torch.randint(0, 4, (60,), generator=gen)
    queries = torch.randn(13, 8, generator=gen)
    got = knn_scores(train, labels, queries, k, 0.07, 4, chunk_size=5).double()
    want = brute_force_knn(train, labels, queries, k, 0.07, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_knn_hand_worked_vote() -> None:
    # Query along +x. Train: two class-0 points at 90° (cos 0) and one class-1 point at 0° (cos 1).
    train = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.0]]), k=3, temperature=0.5, num_classes=2)
    assert scores[0].tolist() == pytest.approx([2 * math.exp(0.0), math.exp(2.0)], rel=1e-5)
    # With T large the weights flatten and the two class-0 votes outnumber the closer class-1 one.
    flat = knn_scores(train, labels, torch.tensor([[1.0, 0.0]]), k=3, temperature=100.0, num_classes=2)
    assert flat[0].argmax().item() == 0 and scores[0].argmax().item() == 1


def test_knn_invariant_to_feature_scale_and_train_order() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(40, 6, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    queries = torch.randn(7, 6, generator=gen)
    base = knn_scores(train, labels, queries, 10, 0.07, 3)
    perm = torch.randperm(40, generator=gen)
    scale = torch.rand(40, 1, generator=gen) * 10 + 0.1
    moved = knn_scores(train[perm] * scale[perm], labels[perm], queries * 3.0, 10, 0.07, 3)
    torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-5)
