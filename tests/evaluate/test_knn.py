"""Weighted kNN against a brute-force reference written from DINO's description, plus invariances; AUROC on
vote fractions against an independent rank computation; kNN's neighbours are the whole training partition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pathssl_cli.evaluate.knn import knn_scores
from pathssl_cli.evaluate.metrics import classification_metrics


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
    return out / out.sum(dim=1, keepdim=True)


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
    total = 2 * math.exp(0.0) + math.exp(2.0)
    assert scores[0].tolist() == pytest.approx([2 * math.exp(0.0) / total, math.exp(2.0) / total], rel=1e-5)
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


def test_scores_are_fractions_even_at_a_tiny_temperature() -> None:
    gen = torch.Generator().manual_seed(1)
    train, labels = torch.randn(50, 8, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    scores = knn_scores(train, labels, torch.randn(9, 8, generator=gen), 20, 1e-3, 3)  # exp(1/T) overflows
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(9))


def _binary_set(n_train: int, n_query: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Two overlapping Gaussian classes in 16-d: kNN separates them well but not perfectly."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.zeros(16)
    shift[0] = 0.6

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 2, (n,), generator=gen)
        return torch.randn(n, 16, generator=gen) + (2 * labels[:, None] - 1) * shift, labels

    train, train_labels = draw(n_train)
    queries, query_labels = draw(n_query)
    return train, train_labels, queries, query_labels


def _vote_fraction_auroc(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                         k: int, temperature: float) -> tuple[float, np.ndarray]:
    """Independent of the code under test: float64 numpy, positive-class vote fraction per query, then AUROC as
    the Mann-Whitney probability P(score of a positive > score of a negative), ties counting one half."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    positive = np.empty(len(queries))
    for q, query in enumerate(queries):
        sims = train @ query
        top = np.argsort(-sims, kind="stable")[:k]
        weights = np.exp(sims[top] / temperature)
        positive[q] = weights[labels[top] == 1].sum() / weights.sum()
    pos, neg = positive[query_labels == 1], positive[query_labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg))), positive


def test_binary_auroc_ranks_vote_fractions_not_saturated_softmax() -> None:
    # Issue 11 item 4: softmax over raw vote sums exp(cos / 0.07) saturated nearly every score to 0 or 1, so
    # "AUROC" was close to accuracy. The run's AUROC must be the AUROC of the vote fractions.
    train, labels, queries, query_labels = _binary_set(1000, 2000, seed=0)
    scores = knn_scores(train, labels, queries, 20, 0.07, 2)
    got = classification_metrics(scores, query_labels, 2)["auroc"]
    want, fractions = _vote_fraction_auroc(train.double().numpy(), labels.numpy(), queries.double().numpy(),
                                           query_labels.numpy(), 20, 0.07)
    np.testing.assert_allclose(scores[:, 1].double().numpy(), fractions, atol=1e-5)
    assert got == pytest.approx(want, abs=1e-4)
    # What the old scores looked like: the softmax of the raw sums takes a few dozen distinct values.
    raw_sums = scores * torch.stack([(((train / train.norm(dim=1, keepdim=True)) @ q / q.norm()).topk(20).values
                                      / 0.07).exp().sum() for q in queries])[:, None]
    saturated = raw_sums.softmax(dim=1)[:, 1]  # float32, as the old code computed it
    assert len(torch.unique(saturated)) < len(torch.unique(scores[:, 1])) / 5
    pos, neg = saturated[query_labels == 1].numpy(), saturated[query_labels == 0].numpy()
    old = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert old < want - 0.03


def _knn_spec(root: Path, out: Path, **data: object) -> object:
    from pathssl_cli.specs.evaluate import KnnSpec

    return KnnSpec.model_validate({
        "kind": "knn",
        "data": {"dataset": "folder", "root": str(root), **data},
        "model": {"backbone": "resnet_tiny", "weights": "random", "img_size": 32},
        "knn": {"k": [5]},
        "run": {"output_dir": str(out), "seeds": [0], "device": "cpu", "workers": 0, "batch_size": 32},
    })


def test_knn_searches_all_of_train_when_val_is_carved_from_it(tmp_path: Path) -> None:
    # Issue 11 item 5: a folder without val/ carves val out of train/; kNN selects nothing on val, so (like
    # DINO's eval_knn on all of ImageNet train) every image of train/ is a neighbour.
    import json

    from pathssl_cli.evaluate.knn import run_knn
    from pathssl_cli.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "data", n_per_class=5, size=32, seed=3, splits=("train", "test"))
    n_train_files = len(list((root / "train").rglob("*.png")))
    record = run_knn(_knn_spec(root, tmp_path / "run"))  # type: ignore[arg-type]
    assert record["n"]["train"] == n_train_files == 30 and record["settings"]["neighbours"] == "train + val"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"]["train"] == n_train_files


def test_knn_keeps_an_official_val_split_out(tiny_folder: Path, tmp_path: Path) -> None:
    from pathssl_cli.evaluate.knn import run_knn

    record = run_knn(_knn_spec(tiny_folder, tmp_path / "run"))  # type: ignore[arg-type]
    assert record["n"]["train"] == len(list((tiny_folder / "train").rglob("*.png")))
    assert record["settings"]["neighbours"] == "train"


def test_knn_searches_the_features_the_recipe_names(tiny_folder: Path, tmp_path: Path) -> None:
    """`features.recipe = "stages"` searches every stage's average pool (resnet_tiny: 368-d), not the 96-d pool,
    and metrics.json records the recipe."""
    import json

    from pathssl_cli.backbones import create_backbone
    from pathssl_cli.evaluate.features import STAGES, recipe_features
    from pathssl_cli.evaluate.knn import run_knn
    from pathssl_cli.specs.evaluate import KnnSpec

    pooled = run_knn(_knn_spec(tiny_folder, tmp_path / "pooled"))  # type: ignore[arg-type]
    spec = _knn_spec(tiny_folder, tmp_path / "stages")
    staged_spec = KnnSpec.model_validate({**spec.model_dump(), "features": {"recipe": "stages"}})  # type: ignore
    staged = run_knn(staged_spec)
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny", "random", 32)
    stage_dim = sum(backbone.map_channels)
    assert pooled["settings"]["feature_dim"] == backbone.feature_dim == 96
    assert staged["settings"]["feature_dim"] == stage_dim == 368
    assert json.loads((tmp_path / "stages" / "metrics.json").read_text())["settings"]["feature_recipe"]["kind"] \
        == "stages"
    assert recipe_features(backbone.eval(), torch.zeros(1, 3, 32, 32), STAGES).shape == (1, stage_dim)
