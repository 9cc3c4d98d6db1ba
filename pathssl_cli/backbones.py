"""The one backbone registry used by pretraining, evaluation and segmentation.

Every backbone is a timm model behind one contract (`Backbone`): pooled features (B, D), multi-scale feature maps
for dense tasks, its feature dimension, and the normalisation statistics that travel with its weights.
Weights are local files only (never downloaded), loaded strictly without executing code from the file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from pathssl_cli.errors import SpecError
from pathssl_cli.normalization import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, Normalization
from pathssl_cli.registry import Registry

#: A named normalisation, or explicit (mean, std) per RGB channel on [0, 1] images.
NormalizationChoice = Normalization | tuple[tuple[float, ...], tuple[float, ...]]
#: Which network of a checkpoint holding a teacher and a student (DINO) becomes the backbone; see select_network.
Network = Literal["auto", "teacher", "student"]
EXPORT_FORMAT = "pathssl-backbone"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneInfo:
    timm_name: str
    family: Literal["cnn", "vit"]
    default_img_size: int
    description: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # ViT blocks whose tokens become the dense feature maps (evenly spaced, as in ViTDet/UNETR adapters).
    vit_map_blocks: tuple[int, ...] | None = None


BACKBONES: Registry[BackboneInfo] = Registry("backbone")
BACKBONES.add("resnet50", BackboneInfo("resnet50", "cnn", 224, "ResNet-50 (paper: MoCo v2, SwAV, Barlow Twins)"))
BACKBONES.add("vit_small_patch16_224", BackboneInfo("vit_small_patch16_224", "vit", 224,
                                                    "ViT-S/16 (paper: DINO)", vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("vit_small_patch8_224", BackboneInfo("vit_small_patch8_224", "vit", 224,
                                                   "ViT-S/8 (paper: DINO)", vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("resnet18", BackboneInfo("resnet18", "cnn", 224, "ResNet-18, a smaller CNN for quick GPU runs"))
BACKBONES.add("vit_tiny_patch16_224", BackboneInfo("vit_tiny_patch16_224", "vit", 224, "ViT-Ti/16",
                                                   vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("resnet_tiny", BackboneInfo("test_resnet", "cnn", 64, "0.4M-parameter ResNet for CPU tests"))
BACKBONES.add("vit_tiny", BackboneInfo("test_vit", "vit", 64, "0.3M-parameter ViT with 8 px patches for CPU tests",
                                       timm_kwargs={"patch_size": 8}, vit_map_blocks=(1, 2, 3, 5)))
# DINOv2's ViTs (facebookresearch/dinov2 `models/vision_transformer.py`): LayerScale 1e-5 (`student.layerscale`),
# and with registers (Darcet et al. 2024, `num_register_tokens: 4`) timm's reg4 layout: CLS and registers are
# prepended after the patches' position embedding (`no_embed_class`), registers never masked nor pooled.
_DINOV2 = {"init_values": 1e-5}
_REG4 = {"reg_tokens": 4, "no_embed_class": True}
BACKBONES.add("vit_small_patch16_dinov2", BackboneInfo(
    "vit_small_patch16_224", "vit", 224, "ViT-S/16 with DINOv2's LayerScale (dinov2 vit_small, patch 16)",
    timm_kwargs=_DINOV2, vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("vit_small_patch16_reg4_dinov2", BackboneInfo(
    "vit_small_patch16_224", "vit", 224, "ViT-S/16 with LayerScale and 4 registers (DINOv2)",
    timm_kwargs={**_DINOV2, **_REG4}, vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("vit_small_patch14_reg4_dinov2", BackboneInfo(
    "vit_small_patch14_reg4_dinov2", "vit", 224, "ViT-S/14 with 4 registers (dinov2 vits14_reg4)",
    vit_map_blocks=(2, 5, 8, 11)))
BACKBONES.add("vit_base_patch14_reg4_dinov2", BackboneInfo(
    "vit_base_patch14_reg4_dinov2", "vit", 224, "ViT-B/14 with 4 registers (dinov2 vitb14_reg4)",
    vit_map_blocks=(2, 5, 8, 11)))
# No LayerScale here: at 1e-5 a 6-block ViT's blocks stay near the identity for the few hundred steps a CPU
# run makes (with it, a DINOv2 run on real tiles learned nothing over random init; specs/pretrain/tiny_dinov2
# learns without it)
BACKBONES.add("vit_tiny_reg4", BackboneInfo(
    "test_vit", "vit", 64, "vit_tiny with 4 registers, for DINOv2 on CPU",
    timm_kwargs={"patch_size": 8, **_REG4}, vit_map_blocks=(1, 2, 3, 5)))


def is_known_backbone(name: str) -> bool:
    if name.startswith(TIMM_PREFIX):
        return timm.is_model(name.removeprefix(TIMM_PREFIX))
    return name in BACKBONES


def backbone_info(name: str) -> BackboneInfo:
    """Registry entry for `name`; 'timm:<model>' passes any timm architecture through explicitly."""
    if name.startswith(TIMM_PREFIX):
        timm_name = name.removeprefix(TIMM_PREFIX)
        if not timm.is_model(timm_name):
            raise SpecError(f"unknown timm model {timm_name!r}; `python -c \"import timm; print(timm.list_models("
                            f"'*{timm_name[:6]}*'))\"` lists similar names")
        is_vit = "vit" in timm_name or "deit" in timm_name
        return BackboneInfo(timm_name, "vit" if is_vit else "cnn", 224, f"timm pass-through: {timm_name}")
    return BACKBONES.get(name)


class Backbone(nn.Module):
    """A timm model behind pathssl's backbone contract.

    `forward(x)` → pooled features (B, feature_dim); `forward_maps(x)` → multi-scale NCHW maps (ResNet stages at
    strides 4-32, or ViT tokens of `vit_map_blocks` reshaped to the patch grid). `x` is normalised with
    `mean`/`std`. ViTs accept any input size (timm's dynamic position-embedding interpolation), so 32-96 px CPU
    tests and multi-crop views both work.
    """

    def __init__(self, name: str, info: BackboneInfo, timm_model: nn.Module, img_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 normalization_source: str = "given") -> None:
        super().__init__()
        self.name = name
        self.info = info
        self.timm_model = timm_model
        self.img_size = img_size
        self.mean = mean
        self.std = std
        self.normalization_source = normalization_source  # where mean/std came from, for run records
        self.feature_dim: int = int(timm_model.num_features)  # type: ignore[arg-type]
        patch = getattr(getattr(timm_model, "patch_embed", None), "patch_size", None)
        self.patch_size: int | None = int(patch[0]) if patch is not None else None
        self._map_shapes: tuple[list[int], list[int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.timm_model(x)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS token (B, D), patch tokens (B, N, D)) of a ViT after its final norm, register tokens left out
        (dinov2 `x_norm_clstoken`, `x_norm_patchtokens`). With `masks` (B, N) bool and `mask_token` (1, D),
        masked patch embeddings are replaced by the mask token before the position embedding is added and the
        CLS and register tokens are prepended (dinov2 `prepare_tokens_with_masks`), so those are never
        masked. The CLS token equals `forward(x)` of a token-pooled ViT."""
        model: Any = self.timm_model
        if self.info.family != "vit" or not hasattr(model, "_pos_embed"):
            raise ValueError(f"{self.name} is not a ViT: patch tokens need a timm VisionTransformer")
        tokens = model.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        if masks is not None:
            if mask_token is None:
                raise ValueError("masks given without a mask_token")
            where = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)
            tokens = torch.where(where, mask_token.to(tokens.dtype), tokens)
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))
        tokens = model.norm(model.blocks(tokens))
        return tokens[:, 0], tokens[:, model.num_prefix_tokens:]

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        indices: int | list[int] = list(self.info.vit_map_blocks) if self.info.vit_map_blocks else 4
        maps = self.timm_model.forward_intermediates(x, indices=indices, intermediates_only=True)  # type: ignore
        return list(maps)

    def _probe_maps(self) -> tuple[list[int], list[int]]:
        if self._map_shapes is None:
            patch = self.patch_size or 16
            size = patch * max(4, -(-64 // patch))  # whole patches: 70 px for DINOv2's 14 px patches
            device = next(self.parameters()).device
            was_training = self.training
            self.eval()
            with torch.no_grad():
                maps = self.forward_maps(torch.zeros(1, 3, size, size, device=device))
            self.train(was_training)
            self._map_shapes = ([m.shape[1] for m in maps], [size // m.shape[-1] for m in maps])
        return self._map_shapes

    @property
    def map_channels(self) -> list[int]:
        return self._probe_maps()[0]

    @property
    def map_strides(self) -> list[int]:
        return self._probe_maps()[1]


def _build_timm(info: BackboneInfo, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **info.timm_kwargs}
    if drop_path_rate > 0:  # timm's stochastic depth: rate of the last block, linearly from 0 at the first
        kwargs["drop_path_rate"] = drop_path_rate
    if info.family == "vit":
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    return timm.create_model(info.timm_name, **kwargs)


def create_backbone(name: str, weights: str | Path = "random", img_size: int | None = None,
                    normalization: NormalizationChoice | Any = "auto",
                    *, network: Network = "auto", drop_path_rate: float = 0.0) -> Backbone:
    """Build a registry backbone with random weights or strictly loaded local weights.

    `normalization` is resolved by `resolve_normalization` (a name, explicit (mean, std), or an object with
    `mean` and `std`, such as the spec table `{mean = [...], std = [...]}`). `network` picks the network of a
    checkpoint that holds a teacher and a student (see `select_network`). `drop_path_rate` is the
    stochastic-depth rate (timm's: the last block's rate, linear from 0; dino `--drop_path_rate 0.1`); it only
    acts in training mode, and EMA teachers made with `methods.base.frozen_copy` never drop.
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise SpecError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    info = backbone_info(name)
    stored_meta: dict[str, Any] = {}
    state: dict[str, torch.Tensor] | None = None
    weights_path = None if str(weights) == "random" else Path(weights)
    if weights_path is not None:
        state, stored_meta = read_weights(weights_path, network)
        if img_size is None and "img_size" in stored_meta:
            img_size = int(stored_meta["img_size"])
    size = img_size or info.default_img_size
    model = _build_timm(info, size, drop_path_rate)
    if state is not None:
        load_backbone_state(model, state, source=Path(weights))
    mean, std, source = resolve_normalization(normalization, info, weights_path, stored_meta)
    return Backbone(name, info, model, size, mean, std, source)


def resolve_normalization(choice: NormalizationChoice | Any, info: BackboneInfo, weights: Path | None,
                          stored_meta: dict[str, Any]) -> tuple[tuple[float, float, float],
                                                                tuple[float, float, float], str]:
    """(mean, std, where they came from) for a backbone's inputs.

    'auto': the statistics stored with the weights (a pathssl export or checkpoint); else, for a timm release
    (a `config.json` with `pretrained_cfg` beside the weights file, as timm's Hugging Face layout has it), the
    release's own statistics; else ImageNet's. 'timm': the statistics of the architecture's default timm
    release (its `pretrained_cfg`), for a bare file taken from timm. 'imagenet' / 'lunit_tcga': those.
    Explicit (mean, std) or an object with `mean` and `std` are used as given.
    """
    if hasattr(choice, "mean") and hasattr(choice, "std"):
        given: Any = choice  # an ExplicitNormalization or any object with mean and std
        return _triple(given.mean), _triple(given.std), "given in the spec"
    if isinstance(choice, tuple):
        return _triple(choice[0]), _triple(choice[1]), "given"
    if choice == "auto":
        if "mean" in stored_meta and "std" in stored_meta:
            return _triple(stored_meta["mean"]), _triple(stored_meta["std"]), "stored with the weights"
        released = _timm_release_stats(weights)
        if released is not None:
            return released
        return IMAGENET_MEAN, IMAGENET_STD, "imagenet (default)"
    if choice == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(info.timm_name)
        if cfg is None or cfg.mean is None or cfg.std is None:
            raise SpecError(f"model.normalization = 'timm': timm has no default release for {info.timm_name!r} "
                            "to take mean/std from; give them as {mean = [r, g, b], std = [r, g, b]}")
        return _triple(cfg.mean), _triple(cfg.std), f"timm pretrained_cfg of {info.timm_name}.{cfg.tag}"
    mean, std = NORMALIZATIONS[choice]
    return mean, std, str(choice)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _timm_release_stats(weights: Path | None) -> tuple[tuple[float, float, float], tuple[float, float, float],
                                                       str] | None:
    """mean/std of a timm Hugging Face release: `config.json` beside the weights with a `pretrained_cfg`."""
    if weights is None:
        return None
    config = weights.parent / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    cfg = data.get("pretrained_cfg", data) if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
        return None
    return _triple(cfg["mean"]), _triple(cfg["std"]), f"timm release config {config}"


# ------------------------------------------------------------------------------------------------- weights I/O
def read_weights(path: Path, network: Network = "auto") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of one backbone and metadata, from a safetensors file or a torch file loaded with
    `weights_only=True`; `network` picks the teacher or the student where the file holds both."""
    if not path.exists():
        raise SpecError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        meta = {k: json.loads(v) for k, v in raw_meta.items() if k != "format"}
        return select_network(tensors, network, path), meta
    try:
        # argparse.Namespace: official DINO checkpoints store their `args` (plain attributes, runs no code)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(f"{path}: refusing to load: it is not a plain tensor checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}). pathssl loads weights with weights_only=True so a file "
                        "cannot run code; re-save it as a state dict or safetensors.") from None
    meta = {key: obj[key] for key in ("mean", "std", "img_size") if isinstance(obj, dict) and key in obj}
    return select_network(obj, network, path), meta


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _networks(obj: Any, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The networks a file holds, by role: {'teacher': ..., 'student': ...} for a DINO checkpoint, else
    {'single': ...}. Layouts: a plain state dict (Lunit's release, timm, torchvision, a pathssl export or an
    official DINO `*_pretrain.pth`, which is the teacher alone); containers 'state_dict' / 'model' /
    'backbone'; a pathssl pretrain checkpoint ('method' holding `backbone.timm_model.*` and, for DINO,
    `teacher_backbone.timm_model.*`); an official DINO checkpoint (dino `main_dino.py` `save_dict`: 'student'
    with `module.backbone.*`, 'teacher' with `backbone.*`, or `module.backbone.*` when it has BatchNorm)."""
    if _is_state_dict(obj):
        teacher = {k.removeprefix("teacher_"): v for k, v in obj.items() if k.startswith("teacher_backbone.")}
        if teacher:  # a pathssl DINO method state: student `backbone.*`, EMA teacher `teacher_backbone.*`
            return {"teacher": teacher, "student": {k: v for k, v in obj.items() if k.startswith("backbone.")}}
        roles = {role: {k.removeprefix(f"{role}."): v for k, v in obj.items() if k.startswith(f"{role}.")}
                 for role in ("teacher", "student")}  # dino's checkpoint flattened into one dict
        if any(roles.values()):
            return {role: state for role, state in roles.items() if state}
        return {"single": obj}
    if isinstance(obj, dict):
        if isinstance(obj.get("teacher"), dict) or isinstance(obj.get("student"), dict):
            return {role: obj[role] for role in ("teacher", "student") if _is_state_dict(obj.get(role))}
        for key in ("backbone", "state_dict", "model", "method"):
            if isinstance(obj.get(key), dict):
                return _networks(obj[key], path)
    raise SpecError(f"{path}: no state dict found (expected a dict of tensors, possibly under 'state_dict', "
                    "'model', 'backbone', 'method', 'teacher' or 'student')")


def select_network(obj: Any, network: Network, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the chosen network: 'auto' = the teacher where a file holds a teacher and a student
    (DINO's official evaluation uses the teacher: `eval_linear.py --checkpoint_key teacher`), else its only
    network; 'teacher' / 'student' ask for that one and fail clearly on a file that lacks it."""
    found = _networks(obj, path)
    if network == "auto":
        return found.get("teacher") or found.get("single") or found["student"]
    if network in found:
        return found[network]
    holds = ("a teacher and a student" if len(found) == 2 else
             "only one network (e.g. a backbone export, Lunit's release or DINO's released teacher)"
             if "single" in found else f"only the {next(iter(found))}")
    raise SpecError(f"{path}: model.weights_network = {network!r}, but this file holds {holds}. Use "
                    "'auto' (the teacher where there is one), or a checkpoint that holds the "
                    f"{network} (a DINO checkpoint: `checkpoints/last.pt` of `pathssl pretrain`, or dino's "
                    "checkpoint.pth).")


_PREFIXES = ("", "module.", "backbone.", "module.backbone.", "timm_model.", "backbone.timm_model.",
             "module.backbone.timm_model.", "encoder.", "model.")
# Classifier and projection heads are not part of a backbone: dropped on purpose, as Lunit's release drops `fc`.
_HEAD_PREFIXES = ("fc.", "head.", "head_drop.", "classifier.", "heads.")


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into a timm model strictly, whatever prefix the file used; report mismatches clearly."""
    expected = set(model.state_dict())
    best_prefix = max(_PREFIXES, key=lambda p: len(expected & {k[len(p):] for k in state if k.startswith(p)}))
    selected = {k[len(best_prefix):]: v for k, v in state.items() if k.startswith(best_prefix)}
    selected = {k: v for k, v in selected.items() if not k.startswith(_HEAD_PREFIXES) or k in expected}
    if "pos_embed" in selected and hasattr(model, "patch_embed"):
        from timm.models.vision_transformer import checkpoint_filter_fn

        selected = checkpoint_filter_fn(selected, model)  # type: ignore[arg-type]  # resamples position embeddings to this input size
    missing = sorted(expected - set(selected))
    unexpected = sorted(set(selected) - expected)
    if missing or unexpected:
        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = [f"{source}: weights do not match the backbone (strict loading)."]
        if missing:
            parts.append(f"missing {len(missing)} keys: {listing(missing)}.")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {listing(unexpected)}.")
        parts.append("Check that model.backbone names the architecture these weights were trained with.")
        raise SpecError(" ".join(parts))
    try:
        model.load_state_dict(selected, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise SpecError(f"{source}: weights do not fit the backbone: {str(exc).splitlines()[-1].strip()}. Check "
                        "that model.backbone names the architecture these weights were trained with.") from None


def export_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Write the backbone alone as safetensors with timm keys and its normalisation as metadata.

    Loads with `create_backbone(name, weights=path)` and with `timm.create_model(timm_name, pretrained=True,
    num_classes=0, pretrained_cfg_overlay=dict(file=path), **timm_kwargs)` (both names are in the metadata;
    timm_kwargs carries e.g. registers and LayerScale of a registry variant).
    """
    from safetensors.torch import save_file

    from pathssl_cli.fileio import atomic_path

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.timm_model.state_dict().items()}
    metadata = {"format": "pt", "pathssl_format": json.dumps(EXPORT_FORMAT), "backbone": json.dumps(backbone.name),
                "timm_name": json.dumps(backbone.info.timm_name), "img_size": json.dumps(backbone.img_size),
                "timm_kwargs": json.dumps(backbone.info.timm_kwargs),
                "mean": json.dumps(list(backbone.mean)), "std": json.dumps(list(backbone.std))}
    if _holds_export(path, tensors, metadata):
        return path  # safetensors orders metadata at random: rewriting would change the sha256, not the weights
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _holds_export(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether `path` already holds exactly these tensors and metadata. A resumed pre-training that re-exports
    the same weights then leaves the file (and so its fingerprint) as it was, instead of making every
    evaluation of it stale for a reordered header."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as stored:
            if stored.metadata() != metadata or set(stored.keys()) != set(tensors):
                return False
            for key, tensor in tensors.items():
                old = stored.get_tensor(key)
                if old.dtype != tensor.dtype or not torch.equal(old, tensor):
                    return False
    except Exception:  # unreadable or another format: replace it
        return False
    return True


def describe_backbones() -> list[dict[str, Any]]:
    """Rows for `pathssl backbones list`: parameter count, feature dim, patch size, default normalisation."""
    rows = []
    for name, info in BACKBONES.items():
        model = _build_timm(info, info.default_img_size)
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        feature_dim = int(getattr(model, "num_features"))  # noqa: B009 - timm models type it as Tensor | Module
        rows.append({"name": name, "timm_name": info.timm_name, "params": sum(p.numel() for p in model.parameters()),
                     "feature_dim": feature_dim, "patch_size": int(patch[0]) if patch else None,
                     "default_img_size": info.default_img_size, "normalization": "imagenet",
                     "description": info.description})
    return rows
