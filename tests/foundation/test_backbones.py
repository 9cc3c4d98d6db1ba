"""Backbone registry: every entry runs, features have the contract's shapes, weights load strictly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import timm
import torch

from pathssl_cli.backbones import BACKBONES, create_backbone, export_backbone
from pathssl_cli.errors import SpecError
from pathssl_cli.normalization import IMAGENET_MEAN, LUNIT_TCGA_MEAN

PAPER_SIZE = {"resnet50", "vit_small_patch16_224", "vit_small_patch8_224", "resnet18", "vit_tiny_patch16_224"}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_registry_entry_gives_pooled_and_dense_features(name: str) -> None:
    backbone = create_backbone(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = backbone(x)
        maps = backbone.forward_maps(x)
    assert pooled.shape == (2, backbone.feature_dim)
    assert len(maps) == len(backbone.map_channels) == len(backbone.map_strides) == 4
    for fmap, channels, stride in zip(maps, backbone.map_channels, backbone.map_strides, strict=True):
        assert fmap.shape == (2, channels, 64 // stride, 64 // stride)
    if backbone.patch_size is None:
        assert backbone.map_strides == [4, 8, 16, 32]
    else:
        assert set(backbone.map_strides) == {backbone.patch_size}


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small_patch16_224"])
@pytest.mark.parametrize("size", [32, 96])
def test_vits_accept_small_inputs(name: str, size: int) -> None:
    backbone = create_backbone(name, img_size=64).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, size, size)).shape == (1, backbone.feature_dim)


def test_timm_passthrough_and_unknown_names() -> None:
    assert create_backbone("timm:test_convnext", img_size=64)(torch.randn(1, 3, 64, 64)).ndim == 2
    with pytest.raises(SpecError, match="Did you mean 'resnet50'"):
        create_backbone("resnet5O")


def _torchvision_style_resnet50_state() -> dict[str, torch.Tensor]:
    # Lunit's ResNet-50 release: torchvision keys, no `fc`.
    import torchvision

    state = torchvision.models.resnet50(weights=None).state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()
            if not k.startswith("fc.")}


def test_lunit_resnet50_layout_loads_strictly(tmp_path: Path) -> None:
    state = _torchvision_style_resnet50_state()
    torch.save(state, tmp_path / "bt_rn50_ep200.torch")
    backbone = create_backbone("resnet50", tmp_path / "bt_rn50_ep200.torch", normalization="lunit_tcga")
    loaded = backbone.timm_model.state_dict()
    assert torch.equal(loaded["layer3.2.conv2.weight"], state["layer3.2.conv2.weight"])
    assert backbone.mean == LUNIT_TCGA_MEAN


def test_torchvision_state_with_fc_and_ddp_prefix(tmp_path: Path) -> None:
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "rn18.pth")
    backbone = create_backbone("resnet18", tmp_path / "rn18.pth")
    assert torch.equal(backbone.timm_model.state_dict()["conv1.weight"], state["conv1.weight"])
    assert backbone.mean == IMAGENET_MEAN


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch8_224"])
def test_lunit_vit_layout_loads_and_resamples_position_embedding(tmp_path: Path, name: str) -> None:
    # Lunit's DINO ViT-S release: timm keys at 224 px; a 64 px backbone needs the position grid resampled.
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "dino_vit.torch")
    backbone = create_backbone(name, tmp_path / "dino_vit.torch", img_size=64)
    loaded = backbone.timm_model.state_dict()
    assert torch.equal(loaded["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"])
    grid = 64 // backbone.patch_size
    assert loaded["pos_embed"].shape[1] == grid * grid + 1


def test_timm_state_dict_with_classifier_head(tmp_path: Path) -> None:
    full = timm.create_model("test_vit", pretrained=False, patch_size=8, img_size=64)  # includes `head`
    torch.save(full.state_dict(), tmp_path / "timm.pth")
    backbone = create_backbone("vit_tiny", tmp_path / "timm.pth", img_size=64)
    assert torch.equal(backbone.timm_model.state_dict()["cls_token"], full.state_dict()["cls_token"])


def test_mismatched_keys_are_reported_clearly(tmp_path: Path) -> None:
    state = create_backbone("resnet_tiny").timm_model.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SpecError) as info:
        create_backbone("resnet_tiny", tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing 1 keys: layer1.0.conv1.weight" in message
    assert "unexpected 1 keys: extra.weight" in message


def test_wrong_architecture_is_an_error_not_a_partial_load(tmp_path: Path) -> None:
    torch.save(create_backbone("resnet_tiny").timm_model.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(SpecError, match="do not match"):
        create_backbone("resnet18", tmp_path / "tiny.pth")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this pickle ran code",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"conv1.weight": _Exploit()}, fh)
    with pytest.raises(SpecError, match="refusing to load"):
        create_backbone("resnet_tiny", path)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_export_round_trips_through_registry_and_timm(tmp_path: Path) -> None:
    original = create_backbone("vit_tiny", img_size=64, normalization="lunit_tcga")
    path = export_backbone(original, tmp_path / "backbone.safetensors")
    again = create_backbone("vit_tiny", path)
    assert again.img_size == 64 and again.mean == LUNIT_TCGA_MEAN
    x = torch.randn(2, 3, 64, 64)
    via_timm = timm.create_model("test_vit", pretrained=True, num_classes=0, patch_size=8, img_size=64,
                                 pretrained_cfg_overlay={"file": str(path)})
    with torch.no_grad():
        assert torch.allclose(original.eval()(x), again.eval()(x))
        assert torch.allclose(original(x), via_timm.eval()(x))


def test_paper_backbones_are_registered() -> None:
    assert PAPER_SIZE <= set(BACKBONES.names())


def test_timm_release_statistics_reach_the_backbone(tmp_path: Path) -> None:
    """Issue 20: any non-pathssl file got ImageNet statistics, so timm's ViT-S/16 release (trained with mean = std
    = 0.5) was fed wrongly normalised inputs. 'timm' takes the architecture's pretrained_cfg, 'auto' reads a timm
    release's config.json, and explicit statistics are used as given."""
    from timm.models import get_pretrained_cfg

    from pathssl_cli.specs.core import ExplicitNormalization

    release = tmp_path / "vit_tiny_release"
    release.mkdir()
    weights = release / "model.safetensors"
    export_backbone(create_backbone("vit_tiny"), tmp_path / "export.safetensors")
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "export.safetensors"), weights)  # the tensors alone, as a timm release
    assert create_backbone("vit_tiny", weights).mean == IMAGENET_MEAN  # no config.json: ImageNet, as before
    (release / "config.json").write_text(json.dumps({"architecture": "test_vit", "pretrained_cfg": {
        "tag": "r160_in1k", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    auto = create_backbone("vit_tiny", weights)
    assert (auto.mean, auto.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert "config.json" in auto.normalization_source
    expected = get_pretrained_cfg("vit_small_patch16_224")
    named = create_backbone("vit_small_patch16_224", normalization="timm", img_size=32)
    assert named.mean == tuple(expected.mean) == (0.5, 0.5, 0.5) and named.std == tuple(expected.std)
    given = create_backbone("vit_tiny", normalization=ExplicitNormalization(mean=(0.1, 0.2, 0.3),
                                                                             std=(0.4, 0.5, 0.6)))
    assert (given.mean, given.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_spec_normalization_accepts_a_table_and_the_paper_vit_row_uses_timm() -> None:
    from pathssl_cli.specs import load_spec

    specs = Path(__file__).resolve().parents[2] / "specs"
    spec = load_spec(specs / "evaluate" / "crc_linear.toml", [
        "model.normalization={mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25]}"], check_inputs=False)
    assert tuple(spec.model.normalization.std) == (0.25, 0.25, 0.25)
    with pytest.raises(SpecError, match="std must be positive"):
        load_spec(specs / "evaluate" / "crc_linear.toml", [
            "model.normalization={mean = [0.5, 0.5, 0.5], std = [0, 1, 1]}"], check_inputs=False)
    study = load_spec(specs / "study" / "paper_classification.toml", check_inputs=False)
    vit = next(b for b in study.backbones if b.name == "imagenet-vit_small_patch16")
    assert vit.normalization == "timm"
