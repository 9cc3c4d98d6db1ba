"""HoVer-Net's encoder side: the full-resolution ResNet stem and the adapter from encoder maps to decoder skips.

Official HoVer-Net (vqdang/hover_net `models/hovernet/net_desc.py`) runs a pre-activation ResNet-50 whose stem
conv has stride 1 and no max-pool, so its four stages give the decoder skips at strides 1, 2, 4 and 8
(256, 512, 1024 and 2048 -> 1024 `conv_bot` channels). Two encoder stems are offered:

- "full" (default, HoVer-Net's): registry ResNets keep their weights shape for shape (torchvision, Lunit and
  pathssl ResNet-50 files all load strictly) but their stride-2 stem convs run at stride 1 and the max-pool is
  removed, so the maps come at strides 1, 2, 4, 8. ViTs, whose tokens sit at one stride, get a feature pyramid
  to strides 1-8 plus a light convolutional stem on the image that adds to the stride 1 and 2 maps: the finest
  maps then see pixels, not only upsampled tokens.
- "stride4": the backbone's own stem (stride 4 at the first stage, skips at 4-32, the last two 2x
  upsamplings of the decoder without encoder features). Kept because it is ~3x cheaper per patch on a CPU.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from pathssl_cli.backbones import Backbone
from pathssl_cli.errors import SpecError

EncoderStem = Literal["full", "stride4"]
# Decoder skip strides per stem: (finest, ..., deepest). The deepest map always goes through a 1x1 projection,
# HoVer-Net's `conv_bot` (2048 -> 1024 channels for ResNet-50).
SKIP_STRIDES: dict[str, tuple[int, int, int, int]] = {"full": (1, 2, 4, 8), "stride4": (4, 8, 16, 32)}
# HoVer-Net's channels at each skip, finest first, before `decoder_width` scaling.
SKIP_CHANNELS = (256, 512, 1024, 1024)


def channels(base: int, width: float) -> int:
    # Multiples of 4 so that the grouped (split=4) dense-block convs stay valid at any width.
    return max(4, round(base * width / 4) * 4)


def _is_resnet(encoder: Backbone) -> bool:
    from timm.models.resnet import ResNet

    return isinstance(encoder.timm_model, ResNet)


def full_resolution_stem(encoder: Backbone) -> None:
    """Make a timm ResNet run its stem at stride 1 without max-pool, in place (weights untouched)."""
    model = encoder.timm_model
    stem = model.conv1  # a conv, or a Sequential of convs for timm's deep stems
    assert isinstance(stem, nn.Module)
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if conv.stride != (1, 1):
            conv.stride = (1, 1)
    model.maxpool = nn.Identity()
    encoder._map_shapes = None  # the probed strides were those of the stride-4 stem


def resample(in_ch: int, out_ch: int, in_stride: int, out_stride: int) -> nn.Module:
    """Deconvolve (upsample) or max-pool (downsample) a map between power-of-two strides, then project."""
    layers: list[nn.Module] = []
    ratio = in_stride / out_stride
    ch = in_ch
    if ratio > 1:
        for _ in range(round(math.log2(ratio))):
            nxt = max(out_ch, ch // 2)
            layers += [nn.ConvTranspose2d(ch, nxt, 2, stride=2), nn.BatchNorm2d(nxt), nn.GELU()]
            ch = nxt
    elif ratio < 1:
        layers.append(nn.MaxPool2d(round(1 / ratio)))
    layers.append(nn.Conv2d(ch, out_ch, 1, bias=False))
    return nn.Sequential(*layers)


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True)
    )


class LightStem(nn.Module):
    """Two 3x3 convs at full resolution and one at stride 2 on the normalised image: the pixel-level evidence a
    patch-token encoder lacks, added to the ViT pyramid's stride-1 and stride-2 maps."""

    def __init__(self, width: float, out1: int, out2: int) -> None:
        super().__init__()
        c1, c2 = channels(32, width), channels(64, width)
        self.full = nn.Sequential(_conv_bn_relu(3, c1, 1), _conv_bn_relu(c1, c1, 1))
        self.down = _conv_bn_relu(c1, c2, 2)
        self.proj1 = nn.Conv2d(c1, out1, 1, bias=False)
        self.proj2 = nn.Conv2d(c2, out2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        full = self.full(x)
        return {1: self.proj1(full), 2: self.proj2(self.down(full))}


class MultiScaleAdapter(nn.Module):
    """Encoder maps -> {stride: map} at the stem's skip strides with decoder channels (plus stride 2 for a
    'stride4' CNN that exposes one).

    CNN maps with the right stride get a 1x1 projection (identity when channels already match, as with
    ResNet-50 layers 1-3 in 'full'). Backbones whose maps all share one stride (ViTs) get a simple feature
    pyramid (ViTDet, Li et al. 2022): evenly spaced maps, shallowest to the finest stride, deconvolved or
    pooled to the target stride; in 'full', a `LightStem` adds image features to strides 1 and 2.
    """

    def __init__(self, channels_in: list[int], strides: list[int], width: float, stem: str) -> None:
        super().__init__()
        self.skip_strides = SKIP_STRIDES[stem]
        targets = {s: channels(c, width) for s, c in zip(self.skip_strides, SKIP_CHANNELS, strict=True)}
        single_stride = len(set(strides)) == 1
        if not single_stride and min(strides) > self.skip_strides[0]:
            raise SpecError(f"the encoder's finest map is at stride {min(strides)}, but model.encoder_stem = "
                            f"{stem!r} needs stride {self.skip_strides[0]}; only registry ResNets and ViTs have "
                            "the full-resolution stem, use model.encoder_stem = 'stride4' for this backbone")
        self.sources: dict[int, int] = {}
        self.projections = nn.ModuleDict()
        deepest = self.skip_strides[-1]
        for order, stride in enumerate(self.skip_strides):
            if single_stride:
                idx = round(order * (len(strides) - 1) / (len(self.skip_strides) - 1))
            else:
                # The deepest map at the closest stride (log scale): exact for ResNets.
                idx = min(range(len(strides)), key=lambda i: (abs(math.log2(strides[i] / stride)), -i))
            self.sources[stride] = idx
            if channels_in[idx] == targets[stride] and strides[idx] == stride and stride != deepest:
                self.projections[str(stride)] = nn.Identity()
            else:
                self.projections[str(stride)] = resample(channels_in[idx], targets[stride], strides[idx], stride)
        self.has_stride2 = stem == "stride4" and 2 in strides and not single_stride
        if self.has_stride2:
            idx = strides.index(2)
            self.sources[2] = idx
            self.projections["2"] = nn.Conv2d(channels_in[idx], channels(64, width), 1, bias=False)
        self.light_stem = (
            LightStem(width, targets[1], targets[2]) if stem == "full" and single_stride else None
        )

    def forward(self, maps: list[torch.Tensor], image: torch.Tensor) -> dict[int, torch.Tensor]:
        feats = {stride: self.projections[str(stride)](maps[idx]) for stride, idx in self.sources.items()}
        if self.light_stem is not None:
            for stride, extra in self.light_stem(image).items():
                feats[stride] = feats[stride] + extra
        return feats


def prepare_encoder(encoder: Backbone, stem: str) -> None:
    """Apply the stem choice to a freshly built encoder (before its maps are probed)."""
    if stem not in SKIP_STRIDES:
        raise SpecError(f"unknown encoder stem {stem!r}; use one of {sorted(SKIP_STRIDES)}")
    if stem == "full" and _is_resnet(encoder):
        full_resolution_stem(encoder)
