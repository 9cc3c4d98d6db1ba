"""The linear probe's feature recipe: dino eval_linear.py's concatenated CLS tokens of the last blocks for ViTs,
the average pool for CNNs, the backbone's pooled output for eva; the recipe is part of the feature cache key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pathssl_cli.evaluate.features as features_module
from pathssl_cli.backbones import create_backbone
from pathssl_cli.errors import SpecError
from pathssl_cli.evaluate.common import frozen_features
from pathssl_cli.evaluate.features import POOLED, STAGES, FeatureRecipe, recipe_features
from pathssl_cli.evaluate.linear import resolve_recipe, run_linear
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.evaluate import LinearFeatures

SPECS = Path(__file__).resolve().parents[2] / "specs" / "evaluate"


def _dino_reference(vit: torch.nn.Module, x: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """dino `get_intermediate_layers` + `eval_linear.py`, written out on timm's modules: the last n blocks'
    outputs through the final norm; their CLS tokens; the mean of the last one's patch tokens."""
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # type: ignore[operator]
    normed = []
    for i, block in enumerate(vit.blocks):  # type: ignore[arg-type]
        tokens = block(tokens)
        if i >= len(vit.blocks) - n:  # type: ignore[arg-type]
            normed.append(vit.norm(tokens))  # type: ignore[operator]
    parts = [t[:, 0] for t in normed]
    if avgpool:
        parts.append(normed[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize(("n", "avgpool"), [(4, False), (1, True), (2, True)])
def test_vit_blocks_recipe_equals_dinos_intermediate_layers(n: int, avgpool: bool) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = recipe_features(backbone, x, FeatureRecipe("vit_blocks", n, avgpool))
        expected = _dino_reference(backbone.timm_model, x, n, avgpool)
        pooled = recipe_features(backbone, x, POOLED)
    assert ours.shape == (3, backbone.feature_dim * (n + int(avgpool)))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the last block's CLS is the backbone's pooled output (timm: final norm, CLS pooling)
    last = ours[:, (n - 1) * backbone.feature_dim: n * backbone.feature_dim]
    torch.testing.assert_close(last, pooled, rtol=1e-5, atol=1e-5)


def test_presets_follow_each_familys_official_recipe() -> None:
    vit, cnn = create_backbone("vit_tiny", img_size=32), create_backbone("resnet_tiny", img_size=32)
    default = LinearFeatures()
    assert resolve_recipe(default, "paper", vit) == FeatureRecipe("vit_blocks", 4, False)  # dino ViT-S
    assert resolve_recipe(default, "paper", cnn) == POOLED  # average pool (dino/moco for ResNets)
    assert resolve_recipe(default, "eva", vit) == POOLED
    assert resolve_recipe(LinearFeatures(recipe="dino"), "eva", vit) == FeatureRecipe("vit_blocks", 4, False)
    assert resolve_recipe(LinearFeatures(recipe="pooled"), "paper", vit) == POOLED
    with pytest.raises(SpecError, match="n_last_blocks = 9"):
        resolve_recipe(LinearFeatures(n_last_blocks=9), "paper", vit)


def test_the_recipe_is_part_of_the_cache_key(tiny_folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = features_module.extract

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["recipe"].describe())
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract", counting)
    spec = load_spec(SPECS / "tiny_linear.toml", [f"data.root={tiny_folder}", "model.backbone=vit_tiny",
                                                   "model.img_size=32", f"run.output_dir={tmp_path / 'run'}"])
    blocks = FeatureRecipe("vit_blocks", 4, False)
    pooled = frozen_features(spec, need_val=False)
    assert len(calls) == 2
    concatenated = frozen_features(spec, need_val=False, recipe=blocks)
    assert len(calls) == 4, "another recipe must not hit the pooled features' cache entries"
    dim = pooled.features["train"].features.shape[1]
    assert concatenated.features["train"].features.shape[1] == 4 * dim
    frozen_features(spec, need_val=False, recipe=blocks)
    assert len(calls) == 4  # the same recipe hits


def test_linear_records_the_recipe_it_used(tiny_folder: Path, tmp_path: Path) -> None:
    spec = load_spec(SPECS / "tiny_linear.toml", [
        f"data.root={tiny_folder}", "model.backbone=vit_tiny", "model.img_size=32", "optim.epochs=2",
        "optim.lrs=[1.0]", "optim.weight_decays=[0.0]", "run.seeds=[0]", f"run.output_dir={tmp_path / 'run'}"])
    record = run_linear(spec)
    assert record["settings"]["feature_recipe"] == {"kind": "vit_blocks", "n_last_blocks": 4,
                                                    "avgpool_patchtokens": False}
    assert record["settings"]["feature_dim"] == 4 * create_backbone("vit_tiny").feature_dim


def test_teacher_and_student_of_one_checkpoint_are_two_cache_entries(tiny_folder: Path, tmp_path: Path) -> None:
    from pathssl_cli.methods import DINOOptions, create_method

    torch.manual_seed(0)
    method = create_method(create_backbone("vit_tiny", img_size=32),
                           DINOOptions(out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=0),
                           steps_per_epoch=1, total_steps=2)
    with torch.no_grad():
        for p in method.teacher_backbone.parameters():
            p.mul_(1.5)
    checkpoint = tmp_path / "last.pt"
    torch.save({"method": method.state_dict()}, checkpoint)
    common = [f"data.root={tiny_folder}", "model.backbone=vit_tiny", "model.img_size=32",
              f"model.weights={checkpoint}", f"run.output_dir={tmp_path / 'run'}"]
    teacher = frozen_features(load_spec(SPECS / "tiny_linear.toml", common), need_val=False)
    student = frozen_features(load_spec(SPECS / "tiny_linear.toml", [*common, "model.weights_network=student"]),
                              need_val=False)
    assert not student.features["train"].cache_hit
    assert not torch.allclose(student.features["train"].features, teacher.features["train"].features)


def test_stages_recipe_concatenates_every_stages_average_pool() -> None:
    """'stages': the global average of each ResNet stage, in order; the last one is the pooled output."""
    torch.manual_seed(0)
    cnn = create_backbone("resnet_tiny", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = recipe_features(cnn, x, STAGES)
        maps = cnn.forward_maps(x)
        pooled = recipe_features(cnn, x, POOLED)
    assert ours.shape == (2, sum(m.shape[1] for m in maps)) and len(maps) == 4
    torch.testing.assert_close(ours, torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))
    torch.testing.assert_close(ours[:, -cnn.feature_dim:], pooled, rtol=1e-5, atol=1e-5)
    assert resolve_recipe(LinearFeatures(recipe="stages"), "paper", cnn) == STAGES
    assert STAGES.describe() != POOLED.describe()  # its own feature-cache entry
