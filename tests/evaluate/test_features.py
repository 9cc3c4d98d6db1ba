"""The feature cache: hit when nothing changed, miss when the weights file's content, the split or the
transform changes; cached features equal freshly extracted ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import pathssl_cli.evaluate.features as features_module
from pathssl_cli.evaluate.common import frozen_features
from pathssl_cli.specs import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs" / "evaluate"


def knn_spec(root: Path, weights: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_spec(
        SPECS / "tiny_knn.toml",
        [
            f"data.root={root}",
            f"model.weights={weights}",
            f"run.output_dir={out}",
            "model.img_size=32",
            *extra,
        ],
    )


@pytest.fixture
def extract_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = features_module.extract

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("desc", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract", counting)
    return calls


def test_cache_hit_miss_and_weights_invalidation(
    tiny_folder: Path, tiny_weights: Path, tmp_path: Path, extract_calls: list[str]
) -> None:
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, weights)
    spec = knn_spec(tiny_folder, weights, tmp_path / "runs" / "a")

    first = frozen_features(spec, need_val=False)
    assert extract_calls == ["features train", "features test"]
    cache_files = sorted((tmp_path / "runs" / "feature_cache").glob("*.pt"))
    assert len(cache_files) == 2

    second = frozen_features(spec, need_val=False)
    assert len(extract_calls) == 2, "unchanged backbone, data and transform must hit the cache"
    for split in ("train", "eval"):
        assert torch.equal(first.features[split].features, second.features[split].features)
        assert torch.equal(first.features[split].targets, second.features[split].targets)
    assert second.features["train"].cache_hit

    # Same file name, other content (as after retraining): a miss, and new entries beside the old ones.
    from pathssl_cli.backbones import create_backbone, export_backbone

    torch.manual_seed(999)
    export_backbone(create_backbone("resnet_tiny", img_size=32), weights)
    third = frozen_features(spec, need_val=False)
    assert len(extract_calls) == 4
    assert not torch.allclose(third.features["train"].features, first.features["train"].features)
    assert len(list((tmp_path / "runs" / "feature_cache").glob("*.pt"))) == 4

    # Another transform (input size) is another key as well.
    frozen_features(
        knn_spec(tiny_folder, weights, tmp_path / "runs" / "a", "model.img_size=48"), need_val=False
    )
    assert len(extract_calls) == 6


def test_cached_features_equal_direct_extraction(
    tiny_folder: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    from pathssl_cli.backbones import create_backbone
    from pathssl_cli.data.benchmarks import eval_transform, open_dataset

    spec = knn_spec(tiny_folder, tiny_weights, tmp_path / "runs" / "b")
    cached = frozen_features(spec, need_val=False)
    backbone = create_backbone("resnet_tiny", tiny_weights, img_size=32).eval()
    ds = open_dataset(spec.data, "test")
    transform = eval_transform(32, backbone.mean, backbone.std)
    with torch.no_grad():
        direct = torch.stack([backbone(transform(ds.load_image(i))[None])[0] for i in range(len(ds))])
    torch.testing.assert_close(cached.features["eval"].features, direct, rtol=1e-4, atol=1e-5)
    assert cached.features["eval"].targets.tolist() == ds.targets.tolist()


def test_features_extracted_in_bf16_are_not_reused_by_an_fp32_run(
    tiny_folder: Path, tiny_weights: Path, tmp_path: Path, extract_calls: list[str]
) -> None:
    """Issue 20 §6: the cache key had no precision, so an fp32 run reused bf16 features and reported fp32."""
    out = tmp_path / "runs" / "a"
    low = frozen_features(knn_spec(tiny_folder, tiny_weights, out, "run.precision='bf16'"), need_val=False)
    assert len(extract_calls) == 2
    full = frozen_features(knn_spec(tiny_folder, tiny_weights, out), need_val=False)
    assert len(extract_calls) == 4 and not full.features["train"].cache_hit
    assert not torch.equal(low.features["train"].features, full.features["train"].features)
    again = frozen_features(knn_spec(tiny_folder, tiny_weights, out, "run.precision='bf16'"), need_val=False)
    assert len(extract_calls) == 4 and torch.equal(again.features["train"].features, low.features["train"].features)
