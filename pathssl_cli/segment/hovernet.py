"""HoVer-Net (Graham et al. 2019) with its encoder taken from the backbone registry.

Reference: vqdang/hover_net `models/hovernet/net_desc.py` (original) and `net_desc_fast.py` (fast). Kept:
three decoder branches (NP 2 classes, HV 2 channels, optional TP), each an upsample-and-add U-Net path with
dense blocks (8 then 4 units of 32 channels, grouped 5x5 convs in `original`, 3x3 in `fast`), a shared 1x1
bottleneck, nearest-neighbour 2x upsampling, and the input/output sizes of each mode (270->80, 256->164).

Differences, and why:
- Encoder: any registry backbone through `forward_maps`, not HoVer-Net's own pre-activation ResNet-50. With
  the default 'full' stem (`hovernet_encoder`) registry ResNets run their stem at stride 1 without max-pool,
  as HoVer-Net's does, so the skips come at strides 1, 2, 4, 8 with HoVer-Net's channels; ViTs get a feature
  pyramid plus a light image stem. The 'stride4' stem keeps the backbone's own (cheaper) stem and adds two
  upsampling stages at the end of each branch.
- Padding: convolutions are "same"-padded and the output is the centre crop of the mode's size. The original
  loses the border through valid convolutions; cropping gives each output pixel the same surrounding context
  without tying the sizes to one architecture. The input is reflect-padded to a multiple of 32 first.
- Lateral 1x1 projections match encoder channels to decoder channels (HoVer-Net's ResNet-50 matches by
  construction); `decoder_width` scales all decoder channels (1.0 = HoVer-Net's; small values for CPU tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pathssl_cli.backbones import Backbone
from pathssl_cli.segment.hovernet_encoder import MultiScaleAdapter, channels, prepare_encoder

# mode -> (input size, output size) in pixels, from the official configs.
MODES: dict[str, tuple[int, int] | None] = {"original": (270, 80), "fast": (256, 164), "same": None}


def mode_sizes(mode: str, input_size: int) -> tuple[int, int]:
    """(input, output) sizes in px for a mode; `same` keeps `input_size` for both."""
    sizes = MODES[mode]
    return (input_size, input_size) if sizes is None else sizes


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DenseBlock(nn.Module):
    """Pre-activation dense block: each unit maps (BN-ReLU-1x1-BN-ReLU-kxk grouped) to `growth` new channels
    concatenated to its input; ends with BN-ReLU. Output channels: in_ch + units * growth."""

    def __init__(
        self, in_ch: int, units: int, mid_ch: int, growth: int, kernel: int, groups: int = 4
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        ch = in_ch
        for _ in range(units):
            self.units.append(
                nn.Sequential(
                    _bn_relu(ch),
                    nn.Conv2d(ch, mid_ch, 1, bias=False),
                    _bn_relu(mid_ch),
                    nn.Conv2d(mid_ch, growth, kernel, padding=kernel // 2, groups=groups, bias=False),
                )
            )
            ch += growth
        self.out_channels = ch
        self.finish = _bn_relu(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = torch.cat([x, unit(x)], dim=1)
        return self.finish(x)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class DecoderBranch(nn.Module):
    """One HoVer-Net decoder branch: u3, u2, u1 (each upsample 2x and add a skip), then u0 = BN-ReLU-1x1.

    With the 'full' stem the skips are at strides 8 -> 4 -> 2 -> 1 as in HoVer-Net and u1 is already at full
    resolution. With 'stride4' u1 ends at stride 4 and two more 2x stages (a 3x3 conv each, adding the stride-2
    stem map when the backbone exposes one) bring it to full resolution.
    """

    def __init__(self, out_ch: int, width: float, kernel: int, skip_strides: tuple[int, ...],
                 has_stride2: bool) -> None:
        super().__init__()
        c = lambda base: channels(base, width)  # noqa: E731
        self.skip_strides = skip_strides
        self.u3_conv = nn.Conv2d(c(1024), c(256), kernel, padding=kernel // 2, bias=False)
        self.u3_dense = DenseBlock(c(256), 8, c(128), c(32), kernel)
        self.u3_out = nn.Conv2d(self.u3_dense.out_channels, c(512), 1, bias=False)
        self.u2_conv = nn.Conv2d(c(512), c(128), kernel, padding=kernel // 2, bias=False)
        self.u2_dense = DenseBlock(c(128), 4, c(128), c(32), kernel)
        self.u2_out = nn.Conv2d(self.u2_dense.out_channels, c(256), 1, bias=False)
        self.u1_conv = nn.Conv2d(c(256), c(64), kernel, padding=kernel // 2, bias=False)
        # Stride 4 -> 2 -> 1 for the 'stride4' stem only: HoVer-Net's encoder never leaves full resolution.
        self.up_convs = nn.ModuleList(
            nn.Sequential(_bn_relu(c(64)), nn.Conv2d(c(64), c(64), 3, padding=1, bias=False))
            for _ in range(round(math.log2(skip_strides[0])))
        )
        self.has_stride2 = has_stride2
        self.u0 = nn.Sequential(_bn_relu(c(64)), nn.Conv2d(c(64), out_ch, 1, bias=True))

    def forward(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        s1, s2, s4, s8 = self.skip_strides
        x = self.u3_out(self.u3_dense(self.u3_conv(_up2(feats[s8]) + feats[s4])))
        x = self.u2_out(self.u2_dense(self.u2_conv(_up2(x) + feats[s2])))
        x = self.u1_conv(_up2(x) + feats[s1])
        if self.up_convs:  # 'stride4': x is at stride 4
            x = _up2(x)
            if self.has_stride2:
                x = x + feats[2]
            x = _up2(self.up_convs[0](x))
            x = self.up_convs[1](x)
        return self.u0(x)


@dataclass(frozen=True)
class HoVerNetConfig:
    mode: str = "fast"
    input_size: int = 256  # only read in `same` mode
    num_types: int = 0  # 0 = no NC/TP branch; otherwise the number of classes including background 0
    decoder_width: float = 1.0
    encoder_stem: str = "full"  # see hovernet_encoder: 'full' (HoVer-Net's) or 'stride4'


class HoVerNet(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    """forward(x): x (B, 3, in, in) float RGB in [0, 1] -> {"np": (B, 2, out, out) logits,
    "hv": (B, 2, out, out), "tp": (B, num_types, out, out) logits when num_types > 0}."""

    def __init__(self, encoder: Backbone, config: HoVerNetConfig) -> None:
        super().__init__()
        self.config = config
        self.input_size, self.output_size = mode_sizes(config.mode, config.input_size)
        self.padded_size = math.ceil(self.input_size / 32) * 32
        prepare_encoder(encoder, config.encoder_stem)
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1), persistent=False)
        self.adapter = MultiScaleAdapter(
            list(encoder.map_channels), list(encoder.map_strides), config.decoder_width, config.encoder_stem
        )
        kernel = 5 if config.mode == "original" else 3
        branches = {"np": 2, "hv": 2}
        if config.num_types > 0:
            branches["tp"] = config.num_types
        self.decoder = nn.ModuleDict(
            {
                name: DecoderBranch(
                    ch, config.decoder_width, kernel, self.adapter.skip_strides, self.adapter.has_stride2
                )
                for name, ch in branches.items()
            }
        )
        self.encoder_frozen = False
        self.channels_last = False
        for module in [self.adapter, self.decoder]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):  # as HoVer-Net's `weights_init`
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def freeze_encoder(self, frozen: bool) -> None:
        """Phase 1 of HoVer-Net training: no encoder gradients (its BatchNorm statistics still update, as
        the official `freeze` does, because it only disables gradients)."""
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def use_channels_last(self, enabled: bool = True) -> HoVerNet:
        """Keep weights and activations in NHWC layout: oneDNN's convolutions on CPU (1.4x faster training
        steps for specs/segment/cpu_consep.toml, see benchmarks/segment_step.py) and tensor cores on GPU
        prefer it. The same maths; results differ only by float rounding."""
        self.channels_last = enabled
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"HoVerNet expects {self.input_size}x{self.input_size} input, got {tuple(x.shape[-2:])}"
            )
        x = (x - self.mean) / self.std
        pad = self.padded_size - self.input_size
        if pad:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), mode="reflect")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            maps = self.encoder.forward_maps(x)
        feats = self.adapter(maps, x)
        start = pad // 2 + (self.input_size - self.output_size) // 2
        window = slice(start, start + self.output_size)
        return {name: branch(feats)[..., window, window] for name, branch in self.decoder.items()}


def build_hovernet(
    backbone: str,
    *,
    weights: str = "random",
    mode: str = "fast",
    input_size: int = 256,
    num_types: int = 0,
    decoder_width: float = 1.0,
    encoder_stem: str = "full",
) -> HoVerNet:
    """HoVer-Net on the registry backbone `backbone` (its weights: "random", a registry release or a file)."""
    from pathssl_cli.backbones import create_backbone

    in_size, _ = mode_sizes(mode, input_size)
    padded = math.ceil(in_size / 32) * 32
    encoder = create_backbone(backbone, weights=weights, img_size=padded)
    return HoVerNet(
        encoder,
        HoVerNetConfig(mode=mode, input_size=input_size, num_types=num_types, decoder_width=decoder_width,
                       encoder_stem=encoder_stem),
    )
