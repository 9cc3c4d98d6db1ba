"""Weighted k-nearest-neighbour evaluation on frozen features (DINO's protocol).

Wu et al. (2018) / Caron et al. (2021), facebookresearch/dino `eval_knn.py`: features are L2-normalised, the
similarity is the dot product (cosine), the k most similar training samples vote for their class with weight
exp(similarity / T), and the class with the largest summed weight is the prediction. DINO uses T = 0.07 and
reports k = 20 (its best) alongside 10, 100 and 200; the issue asks for k = 20 and 200.

Scores are each class's *fraction* of the vote weight (rows sum to 1), the weighted kNN's estimate of the class
probability. DINO only takes the argmax of the summed weights, which the fractions keep; ranking metrics need
the fractions: the raw sums reach k·e^(1/0.07) ≈ k·1.6e6, and the softmax over them that AUROC used to rank
saturated almost every score to 0 or 1, which turned AUROC into accuracy (issue 11).

The neighbours come from the whole training partition, as in DINO's `eval_knn.py` (all of ImageNet train): where
the dataset's val split is carved out of its official training set (CRC, BACH, MHIST, a folder without val/, a
CSV without val rows), kNN uses train and val together, since it selects nothing on val. An official val split
(PCam, a folder's val/) stays out, a `data.train_subset` (a label budget) is used as it is, and when val is the
evaluation split (no test split) it is never a neighbour.

The kNN classifier has no randomness and no hyper-parameter fitted on data, so one run gives the result: its
metrics.json carries one "seed" for symmetry with the other protocols.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F

from pathssl_cli.console import info
from pathssl_cli.data.benchmarks import ClassificationDataset, open_dataset
from pathssl_cli.distributed import resolve_device
from pathssl_cli.errors import SpecError
from pathssl_cli.evaluate.common import FeatureSet, frozen_features, summarise, write_outputs
from pathssl_cli.evaluate.features import POOLED, STAGES, FeatureRecipe, Features
from pathssl_cli.evaluate.metrics import classification_metrics
from pathssl_cli.runs import claim_run_dir, open_run
from pathssl_cli.specs.data import DataSection
from pathssl_cli.specs.evaluate import KnnFeatures, KnnSpec


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each class's fraction of the vote weight for every query: (Q, C) float, rows summing to 1.

    train_features: (N, D); train_labels: (N,) int64; query_features: (Q, D). Both feature sets are
    L2-normalised here, so callers pass raw backbone outputs. When k > N all N samples vote. Queries are
    handled `chunk_size` at a time so that the (chunk, N) similarity matrix, not (Q, N), bounds memory.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start : start + chunk_size] @ train.T  # (q, N)
        top_sim, top_idx = similarity.topk(k, dim=1, largest=True, sorted=True)
        # exp((s - s_max) / T): the same fractions as exp(s / T), without overflow at small T.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (q, k), sorted: column 0 is the max
        votes = torch.zeros(top_idx.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[top_idx], weights)  # sum weights per neighbour class
        out[start : start + chunk_size] = votes / votes.sum(dim=1, keepdim=True)
    return out


def knn_neighbours(fset: FeatureSet, data: DataSection) -> tuple[Features, ClassificationDataset, str]:
    """The features kNN searches, the dataset they come from, and which splits those are (for the log).

    train plus val when val was carved out of the same official training partition and is not what is
    evaluated; train alone otherwise (see the module docstring).
    """
    train, val = fset.splits["train"], fset.splits.get("val")
    if val is None or val.carved_from is None or train.carved_from is None or fset.eval_split == "val" \
            or data.train_subset is not None:
        return fset.features["train"], train, "train"
    both = Features(
        torch.cat([fset.features["train"].features, fset.features["val"].features]),
        torch.cat([fset.features["train"].targets, fset.features["val"].targets]),
        fset.features["train"].seconds + fset.features["val"].seconds,
        fset.features["train"].cache_hit and fset.features["val"].cache_hit,
    )
    return both, val.carved_from, "train + val"


def val_is_carved(data: DataSection) -> bool:
    """Whether the val split is held out of the official training partition (listing only, no images read)."""
    if data.train_subset is not None:
        return False
    try:
        return open_dataset(data, "val").carved_from is not None
    except SpecError:  # no val can be carved (too few items): train is the whole partition already
        return False


def knn_recipe(features: KnnFeatures, family: str) -> FeatureRecipe:
    """The feature recipe `features.recipe` names for a backbone of `family` ('dinov2' is a ViT's; CNNs pool)."""
    if features.recipe == "stages":
        return STAGES
    if features.recipe == "dinov2" and family == "vit":
        return FeatureRecipe("vit_blocks", 1, True)
    return POOLED


def run_knn(spec: KnnSpec) -> dict[str, Any]:
    """kNN of the evaluation split against the training partition (`knn_neighbours`), for every k of `[knn]`;
    metrics.json reports the first k as the run's result and the others as variants."""
    claim_run_dir(spec, spec.run.output_dir)
    with open_run(spec, spec.run.output_dir, seed=spec.run.seeds[0]) as run:
        fset = frozen_features(spec, need_val=val_is_carved(spec.data),
                               recipe=lambda backbone: knn_recipe(spec.features, backbone.info.family))
        num_classes = len(fset.splits["train"].classes)
        train, train_split, neighbours = knn_neighbours(fset, spec.data)
        query = fset.features["eval"]
        info(f"knn: {len(train.targets)} neighbours to search ({neighbours}), {len(query.targets)} "
             f"{fset.eval_split} queries")
        device = resolve_device(spec.run.device)
        results: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}
        for k in spec.knn.k:
            scores = knn_scores(
                train.features.to(device),
                train.targets.to(device),
                query.features.to(device),
                k,
                spec.knn.temperature,
                num_classes,
            ).cpu()
            metrics = classification_metrics(scores, query.targets, num_classes)
            results[k] = ({"seed": spec.run.seeds[0], "k": k, **metrics}, scores)
            info(f"knn k={k}: top-1 {100 * metrics['top1']:.2f}")
        first, *others = spec.knn.k
        variants = {f"knn_k{k}": summarise([results[k][0]]) for k in others}
        settings = {
            "k": spec.knn.k,
            "temperature": spec.knn.temperature,
            "extraction_seconds": round(fset.extraction_seconds, 3),
            "feature_dim": int(train.features.shape[1]),
            "feature_recipe": json.loads(fset.recipe.describe()),
            "neighbours": neighbours,
            "deterministic": True,  # no seed changes the vote given the weights: seeds are not replicates
        }
        record = write_outputs(
            run,
            spec,
            protocol="knn",
            label=f"knn_k{first}",
            splits={"train": train_split, "eval": fset.splits["eval"]},
            eval_split=fset.eval_split,
            per_seed=[results[first][0]],
            confusion_scores=results[first][1],
            variants=variants,
            settings=settings,
        )
    return record
