"""Frozen-backbone feature extraction with an on-disk cache.

The linear and kNN protocols look at every image exactly once: features are extracted with the eval transform
and stored, and every later classifier (the whole lr × weight-decay × seed sweep, both k of kNN, a second
protocol on the same backbone) reads the stored tensor.

Cache key (sha256 of a canonical JSON): backbone name, the sha256 of the weights file's bytes (so retraining
or replacing a file under the same name invalidates it; "random" weights are keyed by the seed that
initialised them), the dataset name and root, the split, the ordered item ids (which covers a `train_subset`
file and the seeded val split) with each image file's size and mtime,
the transform (image size, mean, std), the feature recipe (`FeatureRecipe`: which tokens or pooling make
the vector) and the autocast precision of the extraction (bf16 features are not fp32 features). One entry is
one file written atomically, so a killed extraction leaves no entry and the next run redoes that split only.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from pathssl_cli.console import info, progress
from pathssl_cli.distributed import autocast
from pathssl_cli.fileio import atomic_write
from pathssl_cli.runs import file_sha256, load_checkpoint, save_checkpoint

CACHE_VERSION = 3  # 2: the key holds the feature recipe; 3: and the precision


@dataclass(frozen=True)
class FeatureRecipe:
    """How a frozen backbone turns an image into one feature vector.

    - "pooled": the backbone's own pooled output (`Backbone.forward`): global average pooling for CNNs (dino
      `eval_linear.py` for torchvision models, moco `main_lincls.py`), the final-norm CLS token for timm ViTs
      (what eva's timm backbones return).
    - "vit_blocks": dino `eval_linear.py` for ViTs: the CLS tokens of the last `n_last_blocks` blocks, each
      through the final norm (dino `get_intermediate_layers`), concatenated; with `avgpool_patchtokens` also the
      mean of the last block's normed patch tokens. DINO uses n = 4 without pooling for ViT-S, n = 1 with
      pooling for ViT-B. Its code interleaves CLS and mean entries ([c0, m0, c1, m1, ...]); here they are
      concatenated ([c..., m...]), the same features in another order, which a linear layer does not see.
    - "stages": the global average of every feature map of `Backbone.forward_maps` (the 4 ResNet stages, or a
      ViT's `vit_map_blocks`), concatenated: a linear probe on every depth at once. Early stages carry
      texture and colour statistics that the last stage of a small or briefly trained network has not yet
      turned into class evidence (resnet_tiny: 32 + 48 + 192 + 96 = 368-d). Measured on the LC25000 hold-out
      (specs/evaluate/cpu_real_linear.toml): no better than "pooled" there, for random and pre-trained weights.
    """

    kind: Literal["pooled", "vit_blocks", "stages"] = "pooled"
    n_last_blocks: int = 1
    avgpool_patchtokens: bool = False

    def describe(self) -> str:
        if self.kind in ("pooled", "stages"):
            return json.dumps({"kind": self.kind})
        return json.dumps({"kind": self.kind, "n_last_blocks": self.n_last_blocks,
                           "avgpool_patchtokens": self.avgpool_patchtokens})


POOLED = FeatureRecipe()
STAGES = FeatureRecipe("stages")


def recipe_features(backbone: torch.nn.Module, images: torch.Tensor, recipe: FeatureRecipe) -> torch.Tensor:
    """Features (B, D') of `images` by `recipe`; D' = D for "pooled", D · (n + avgpool) for "vit_blocks", the
    sum of the maps' channels for "stages"."""
    if recipe.kind == "pooled":
        return backbone(images)
    if recipe.kind == "stages":
        maps: list[torch.Tensor] = backbone.forward_maps(images)  # type: ignore[operator]
        return torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1)
    timm_model: Any = backbone.timm_model
    outputs = timm_model.forward_intermediates(images, indices=recipe.n_last_blocks, norm=True,
                                               return_prefix_tokens=True, output_fmt="NLC",
                                               intermediates_only=True)
    parts = [prefix[:, 0] for _, prefix in outputs]  # the CLS token of each block, after the final norm
    if recipe.avgpool_patchtokens:
        parts.append(outputs[-1][0].mean(dim=1))  # patch tokens only (no CLS, no register tokens)
    return torch.cat(parts, dim=1)


def weights_identity(weights: str | Path, seed: int, network: str = "auto") -> str:
    """What identifies the backbone's parameters: the file's content hash (hashed once per file version per
    process, `runs.file_sha256`) and, for a file holding a teacher and a student, the network asked for; or the
    seed of a random init."""
    if str(weights) == "random":
        return f"random:seed={seed}"
    identity = f"sha256:{file_sha256(weights)}"
    return identity if network == "auto" else f"{identity}|network={network}"


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    weights: str  # weights_identity(...)
    dataset: str
    root: str
    split: str
    ids_sha256: str
    transform: str  # canonical description of the eval transform
    recipe: str = POOLED.describe()  # FeatureRecipe.describe(): which tokens / pooling make the vector
    precision: str = "fp32"  # autocast precision of the extraction

    @staticmethod
    def ids_digest(ids: list[str], root: Path | None = None) -> str:
        """Ordered ids, plus each image file's size and modification time when the id is a file under `root`,
        so an image replaced under the same name invalidates the entry."""
        digest = hashlib.sha256()
        for item in ids:
            digest.update(item.encode())
            path = root / item if root is not None else None
            if path is not None and path.is_file():
                stat = path.stat()
                digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def digest(self) -> str:
        payload = json.dumps({"version": CACHE_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Features:
    features: torch.Tensor  # (N, D) float32
    targets: torch.Tensor  # (N,) int64
    seconds: float  # extraction wall time (0 on a cache hit)
    cache_hit: bool


def transform_description(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    return json.dumps(
        {
            "kind": "eval",
            "img_size": img_size,
            "mean": [round(m, 8) for m in mean],
            "std": [round(s, 8) for s in std],
        }
    )


def cache_path(cache_dir: Path, key: FeatureKey) -> Path:
    return cache_dir / f"{key.split}-{key.digest()[:24]}.pt"


def load_cached(cache_dir: Path | None, key: FeatureKey) -> Features | None:
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    state = load_checkpoint(path)
    if state.get("key") != json.dumps(key.__dict__, sort_keys=True):
        return None  # a 96-bit prefix collision, or a file from another version: recompute
    return Features(state["features"], state["targets"], 0.0, cache_hit=True)


def store(cache_dir: Path, key: FeatureKey, feats: Features) -> Path:
    path = cache_path(cache_dir, key)
    save_checkpoint(
        {
            "key": json.dumps(key.__dict__, sort_keys=True),
            "features": feats.features,
            "targets": feats.targets,
        },
        path,
    )
    # A human-readable sidecar: what the opaque file name stands for.
    atomic_write(
        path.with_suffix(".json"),
        json.dumps({**key.__dict__, "n": len(feats.targets), "dim": int(feats.features.shape[1])}, indent=2)
        + "\n",
    )
    return path


def make_loader(
    dataset: Dataset[Any], batch_size: int, workers: int, device: torch.device
) -> DataLoader[Any]:
    """Workers decode and transform while the backbone runs; pinned memory makes the host→GPU copy async."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


@torch.no_grad()
def extract(
    backbone: torch.nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "features",
    recipe: FeatureRecipe = POOLED,
) -> Features:
    """Run the frozen backbone (eval mode) over `dataset` in order; returns float32 features on the CPU."""
    backbone.eval().to(device)
    loader = make_loader(dataset, batch_size, workers, device)
    chunks: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    start = time.perf_counter()
    with progress(total=len(dataset), desc=desc, unit="img") as bar:  # type: ignore[arg-type]
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            with autocast(device, precision):  # type: ignore[arg-type]
                out = recipe_features(backbone, images, recipe)
            chunks.append(out.float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.int64))
            bar.update(len(images))
    seconds = time.perf_counter() - start
    feats = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return Features(feats, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64), seconds, False)


def cached_features(
    backbone: torch.nn.Module,
    dataset: Any,
    key: FeatureKey,
    cache_dir: Path | None,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str = "fp32",
    recipe: FeatureRecipe = POOLED,
) -> Features:
    """Features of `dataset` by `recipe` from the cache when `key` is there, else extracted and stored."""
    if key.recipe != recipe.describe():
        raise ValueError(f"the cache key's recipe {key.recipe} is not the extraction's {recipe.describe()}")
    if key.precision != precision:
        raise ValueError(f"the cache key's precision {key.precision} is not the extraction's {precision}")
    hit = load_cached(cache_dir, key)
    if hit is not None:
        if len(hit.targets) == len(dataset) and torch.equal(hit.targets, torch.as_tensor(dataset.targets)):
            info(f"{key.split}: {len(hit.targets)} cached features ({cache_path(cache_dir, key).name})")  # type: ignore[arg-type]
            return hit
    feats = extract(
        backbone,
        dataset,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        desc=f"features {key.split}",
        recipe=recipe,
    )
    if cache_dir is not None:
        store(cache_dir, key, feats)
    return feats
