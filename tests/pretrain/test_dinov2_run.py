"""`pathssl pretrain` with tiny_dinov2 end to end: the run's state (both centres, the teacher), the export is the
EMA teacher with its registers and loads in plain timm, and the evaluation recipe DINOv2 probes with."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from safetensors import safe_open

from pathssl_cli.backbones import create_backbone
from pathssl_cli.evaluate.features import FeatureRecipe, recipe_features
from pathssl_cli.evaluate.linear import resolve_recipe
from pathssl_cli.pretrain import run_pretrain
from pathssl_cli.runs import load_checkpoint
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.evaluate import LinearFeatures


def test_tiny_dinov2_runs_and_exports_a_timm_loadable_teacher_with_registers(
        image_folder: Path, tmp_path: Path, specs_dir: Path, tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "run"
    spec = load_spec(specs_dir / "tiny_dinov2.toml", tiny_overrides(image_folder, out, **{"run.steps": 3}))
    summary = run_pretrain(spec)  # type: ignore[arg-type]
    assert summary["exported_network"] == "teacher"
    state = load_checkpoint(out / "checkpoints" / "last.pt")["method"]
    assert state["dino_center"].shape == (1, 256) and state["ibot_center"].shape == (1, 1, 256)
    assert state["dino_center"].abs().sum() > 0 and state["ibot_center"].abs().sum() > 0  # centring moved them
    assert "mask_token" in state and "teacher_backbone.timm_model.reg_token" in state
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {"teacher_entropy", "teacher_batch_entropy", "koleo_loss", "ibot_loss", "masked_share"}
    assert all(logged <= r.keys() for r in records)

    exported = out / "backbone.safetensors"
    with safe_open(str(exported), framework="pt") as fh:
        meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items() if k != "format"}
        keys = set(fh.keys())
    assert "reg_token" in keys and "mask_token" not in keys  # registers go with the backbone, the mask token not
    backbone = create_backbone("vit_tiny_reg4", exported).eval()
    for key, value in backbone.timm_model.state_dict().items():  # the EMA teacher, not the student
        assert torch.equal(value, state[f"teacher_backbone.timm_model.{key}"]), key
    assert any(not torch.equal(v, state[f"backbone.timm_model.{k}"])
               for k, v in backbone.timm_model.state_dict().items())
    plain = timm.create_model(meta["timm_name"], pretrained=True, num_classes=0, img_size=meta["img_size"],
                              pretrained_cfg_overlay={"file": str(exported)}, **meta["timm_kwargs"]).eval()
    assert plain.num_prefix_tokens == 5  # CLS + 4 registers
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(x), backbone.timm_model.forward_features(x))


def test_dinov2_probe_recipe_is_cls_and_mean_patch_token_without_registers() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_reg4", img_size=32).eval()
    recipe = resolve_recipe(LinearFeatures(recipe="dinov2"), "paper", backbone)
    assert recipe == FeatureRecipe("vit_blocks", 1, True)
    assert resolve_recipe(LinearFeatures(recipe="dinov2"), "paper", create_backbone("resnet_tiny")).kind == "pooled"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.timm_model.forward_features(x)  # (B, 1 + 4 + 16, D) after the final norm
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
        torch.testing.assert_close(recipe_features(backbone, x, recipe), expected)
