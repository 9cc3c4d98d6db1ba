"""What the three protocols share: opening the data, building the frozen backbone, choosing the evaluation
split, describing where the weights came from, and writing metrics.json, the per-class CSV and the confusion
matrix.

metrics.json (one per run directory, read by `pathssl report`)::

    {"protocol": "linear", "label": "linear", "dataset": "crc", "eval_split": "test",
     "backbone": "resnet50", "weights": "/path/backbone.safetensors" | "random",
     "weights_id": "sha256:..." (+ "|network=student" for a DINO checkpoint's student), "weights_network": "auto",
     "method": "dino" | null, "train_subset": null | "/path/subset.csv", "classes": [...],
     "n": {"train": N, "val": N, "eval": N},
     "metrics": {"top1": {"mean": m, "std": s, "values": [per seed]}, "balanced_acc": ..., "macro_f1": ...,
                 "auroc": ... (binary only)},
     "per_seed": [{"seed": 0, ...choices..., "top1": ...}], "variants": {label: metrics}, "settings": {...}}

Values are fractions in [0, 1]; std is the sample standard deviation over seeds (ddof = 1), 0 for one seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pathssl_cli.console import warn
from pathssl_cli.data.benchmarks import ClassificationDataset, eval_transform, open_dataset
from pathssl_cli.distributed import resolve_device
from pathssl_cli.errors import SpecError
from pathssl_cli.evaluate.features import (
    POOLED,
    FeatureKey,
    FeatureRecipe,
    Features,
    cached_features,
    weights_identity,
)
from pathssl_cli.evaluate.metrics import (
    METRIC_NAMES,
    confusion_matrix,
    per_class_table,
    plot_confusion_matrix,
    write_per_class_csv,
)
from pathssl_cli.runs import RunDir

if TYPE_CHECKING:
    from pathssl_cli.backbones import Backbone

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Datasets whose test split is part of the official layout; for the generic ones it is optional.
OPTIONAL_TEST = ("folder", "csv")


def open_splits(data: Any, need_val: bool = True) -> tuple[dict[str, ClassificationDataset], str]:
    """train (+ val) and the evaluation split: test where the dataset has one, else val (with a warning)."""
    splits = {"train": open_dataset(data, "train")}
    if need_val:
        splits["val"] = open_dataset(data, "val")
    try:
        splits["eval"] = open_dataset(data, "test")
        eval_split = "test"
    except SpecError:
        # Only a missing test split falls back to val; a test/ folder with a layout problem is an error.
        if data.dataset not in OPTIONAL_TEST or (data.dataset == "folder" and (Path(data.root) / "test").is_dir()):
            raise
        warn(
            f"{data.root}: no test split, so the metrics are measured on the val split, which also picks the "
            "checkpoint and hyper-parameters: they are optimistic. Add a test split for unbiased numbers."
        )
        splits["eval"] = splits["val"] if need_val else open_dataset(data, "val")
        eval_split = "val"
    classes = splits["train"].classes
    for name, ds in splits.items():
        if ds.classes != classes:
            raise SpecError(
                f"{data.root}: the {name} split has classes {ds.classes}, the train split {classes}; "
                "every split must have the same classes in the same order."
            )
    return splits, eval_split


def build_backbone(model: Any, seed: int) -> Backbone:
    from pathssl_cli.backbones import create_backbone

    torch.manual_seed(seed)  # makes "random" weights a function of the seed, which the feature cache keys on
    return create_backbone(model.backbone, model.weights, model.img_size, model.normalization,
                           network=model.weights_network)


@dataclass
class FeatureSet:
    backbone: Any
    splits: dict[str, ClassificationDataset]
    eval_split: str
    features: dict[str, Features]
    extraction_seconds: float
    recipe: FeatureRecipe = POOLED


def frozen_features(spec: Any, need_val: bool = True,
                    recipe: FeatureRecipe | Callable[[Backbone], FeatureRecipe] = POOLED) -> FeatureSet:
    """Open the splits, build the backbone, and return the features of each split by `recipe` (cached on
    disk); `recipe` may be a function of the built backbone (its family and depth)."""
    splits, eval_split = open_splits(spec.data, need_val)
    seed = spec.run.seeds[0]
    backbone = build_backbone(spec.model, seed)
    if callable(recipe):
        recipe = recipe(backbone)
    transform = eval_transform(backbone.img_size, backbone.mean, backbone.std)
    device = resolve_device(spec.run.device)
    identity = weights_identity(spec.model.weights, seed, spec.model.weights_network)  # per network of a file
    cache_dir = spec.run.cache_dir()
    features: dict[str, Features] = {}
    for name, ds in splits.items():
        if name == "eval" and eval_split == "val" and "val" in features:
            features[name] = features["val"]
            continue
        ds.transform = transform
        split = eval_split if name == "eval" else name
        key = FeatureKey(
            backbone=spec.model.backbone,
            weights=identity,
            dataset=spec.data.dataset,
            root=str(spec.data.root),
            split=split,
            ids_sha256=FeatureKey.ids_digest(list(ds.ids), root=Path(spec.data.root)),
            transform=repr(transform),
            recipe=recipe.describe(),
            precision=spec.run.precision,
        )
        features[name] = cached_features(
            backbone,
            ds,
            key,
            cache_dir,
            batch_size=spec.run.batch_size,
            workers=spec.run.workers,
            device=device,
            precision=spec.run.precision,
            recipe=recipe,
        )
    seconds = sum(f.seconds for f in features.values())
    return FeatureSet(backbone, splits, eval_split, features, seconds, recipe)


def pretrain_method(weights: str | Path) -> str | None:
    """The SSL method when the weights file sits in a `pathssl pretrain` run directory (its spec.toml)."""
    if str(weights) == "random":
        return None
    path = Path(weights)
    for folder in (path.parent, path.parent.parent):
        spec_file = folder / "spec.toml"
        if spec_file.is_file():
            try:
                spec = tomllib.loads(spec_file.read_text())
            except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
                return None
            if spec.get("kind") == "pretrain":
                method = spec.get("method", {})
                name = method.get("name") if isinstance(method, dict) else None
                return str(name) if name else None
    return None


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """mean, sample std (ddof=1; 0 for one seed) and per-seed values of every metric present."""
    out: dict[str, dict[str, Any]] = {}
    for name in METRIC_NAMES:
        values = [row[name] for row in per_seed if name in row]
        if not values:
            continue
        array = np.asarray(values, dtype=np.float64)
        std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        out[name] = {"mean": float(array.mean()), "std": std, "values": [float(v) for v in values]}
    return out


def write_outputs(
    run: RunDir,
    spec: Any,
    *,
    protocol: str,
    label: str,
    splits: dict[str, ClassificationDataset],
    eval_split: str,
    per_seed: list[dict[str, Any]],
    confusion_scores: torch.Tensor,
    variants: dict[str, Any] | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json + per_class.csv + confusion_matrix.png (from `confusion_scores`: the first seed's)."""
    classes = splits["train"].classes
    targets = torch.as_tensor(splits["eval"].targets)
    cm = confusion_matrix(confusion_scores.argmax(dim=1), targets, len(classes))
    write_per_class_csv(per_class_table(cm, classes), run.file("per_class.csv"))
    plot_confusion_matrix(
        cm, classes, run.file("confusion_matrix.png"), title=f"{spec.data.dataset} {label} ({eval_split})"
    )
    record = {
        "protocol": protocol,
        "label": label,
        "dataset": spec.data.dataset,
        "eval_split": eval_split,
        "backbone": spec.model.backbone,
        "weights": str(spec.model.weights),
        "weights_id": weights_identity(spec.model.weights, spec.run.seeds[0], spec.model.weights_network),
        "weights_network": spec.model.weights_network,
        "method": pretrain_method(spec.model.weights),
        "train_subset": str(spec.data.train_subset) if spec.data.train_subset else None,
        "classes": classes,
        "n": {name: len(ds) for name, ds in splits.items()},
        "metrics": summarise(per_seed),
        "per_seed": per_seed,
        "variants": variants or {},
        "confusion_matrix": cm.tolist(),
        "settings": settings,
    }
    run.write_json("metrics.json", record)
    return record
