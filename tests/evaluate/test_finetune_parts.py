"""Fine-tuning pieces: layer-wise lr decay groups, batch augmentation, and the pretrain-method lookup."""

from __future__ import annotations

from pathlib import Path

import torch

from pathssl_cli.backbones import create_backbone
from pathssl_cli.evaluate.common import pretrain_method
from pathssl_cli.evaluate.finetune import Classifier, augment_batch, param_groups
from pathssl_cli.specs.evaluate import FinetuneAugment


def test_layer_wise_lr_decay_by_hand() -> None:
    torch.manual_seed(0)
    model = Classifier(create_backbone("vit_tiny", img_size=32), 3)
    depth = len(model.backbone.timm_model.blocks)
    groups = param_groups(model, layer_decay=0.5, head_lr_scale=10.0)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decays_of = {id(p): g["weight_decay_applies"] for g in groups for p in g["params"]}
    named = dict(model.backbone.timm_model.named_parameters())
    # embeddings are layer 0: 0.5^(depth + 1); block i is layer i + 1: 0.5^(depth - i); final norm: 1
    assert scale_of[id(named["patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale_of[id(named["cls_token"])] == 0.5 ** (depth + 1)
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] == 0.5**depth
    assert scale_of[id(named[f"blocks.{depth - 1}.mlp.fc1.weight"])] == 0.5
    assert scale_of[id(named["norm.weight"])] == 1.0
    assert scale_of[id(model.head.weight)] == 10.0
    # no weight decay on biases and norms
    assert (
        decays_of[id(named["blocks.0.attn.qkv.weight"])]
        and not decays_of[id(named["blocks.0.attn.qkv.bias"])]
    )
    assert not decays_of[id(named["norm.weight"])]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_decay_for_cnn_means_one_scale() -> None:
    model = Classifier(create_backbone("resnet_tiny", img_size=32), 2)
    groups = param_groups(model, layer_decay=0.7, head_lr_scale=1.0)  # ignored for a CNN, with a warning
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_flips_and_rotations_are_dihedral_maps_of_each_image() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 8, 8, generator=gen)
    out = augment_batch(images, FinetuneAugment(stain="none"), gen)
    for original, augmented in zip(images, out, strict=True):
        candidates = [original.rot90(k, dims=(1, 2)) for k in range(4)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(augmented, c) for c in candidates)
    assert not torch.equal(out, images)  # 16 images with 3 coins each: some changed


def test_hed_light_jitter_is_a_mild_colour_change() -> None:
    from pathssl_cli.synthetic import labelled_tiles

    tiles, _ = labelled_tiles(1, 32, seed=0)
    images = torch.tensor(tiles).permute(0, 3, 1, 2).float() / 255
    colour_only = FinetuneAugment(hflip=False, vflip=False, rotate90=False, hed_sigma=0.05)
    out = augment_batch(images, colour_only, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    # "HED-light" (Tellez 2019, sigma = 0.05 in optical density): a few percent of the intensity range
    assert 0.002 < (out - images).abs().mean() < 0.05
    unchanged = augment_batch(
        images,
        FinetuneAugment(hflip=False, vflip=False, rotate90=False, hed_sigma=0.0),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(unchanged, images)


def test_pretrain_method_from_run_spec(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "dino"
    run.mkdir(parents=True)
    (run / "spec.toml").write_text('kind = "pretrain"\n[method]\nname = "dino"\n')
    (run / "backbone.safetensors").write_bytes(b"")
    assert pretrain_method(run / "backbone.safetensors") == "dino"
    assert pretrain_method("random") is None
    (tmp_path / "other.safetensors").write_bytes(b"")
    assert pretrain_method(tmp_path / "other.safetensors") is None
