"""Batched random resized crops with flips: one pair of per-sample interpolation matrices per batch.

`resized_crop_flip` matches torchvision's `resized_crop(..., antialias=True)` [+ `horizontal_flip` /
`vertical_flip`] per image on the same parameters, clamped to [0, 1] as the PIL → `ToTensor` path of the
official recipes does (checked in tests/augment/test_ops.py); `random_resized_crop_boxes` draws the boxes of
torchvision's `RandomResizedCrop.get_params`. Randomness comes from an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Interpolation = Literal["bilinear", "bicubic"]


# ---------------------------------------------------------------------------------- crop parameters
def random_resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int = 10,
) -> Tensor:
    """Integer crop boxes (B, 4) as (top, left, h, w), drawn like `RandomResizedCrop.get_params`.

    Same algorithm, vectorised: `attempts` tries of area fraction ~ U(scale) and log aspect ~ U(log
    ratio); the first
    try that fits is kept; when none fits, the central crop clipped to the ratio range.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    area = float(height * width)
    fraction = torch.empty(batch, attempts, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_ratio)
    target = area * fraction
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)  # index of the first fitting try (0 when none fits)
    found = fits.any(dim=1)
    rows = torch.arange(batch, device=device)
    h, w = h[rows, first], w[rows, first]

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_h, fallback_w = height, round(height * max(ratio))
    else:
        fallback_w, fallback_h = width, height
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    w = torch.where(found, w, torch.full_like(w, fallback_w))

    u_top = torch.rand(batch, device=device, generator=generator)
    u_left = torch.rand(batch, device=device, generator=generator)
    top = torch.where(found, (u_top * (height - h + 1)).long().clamp(max=height - h), (height - h) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).long().clamp(max=width - w), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


# ----------------------------------------------------------------------------- crop + resize + flip
def _aa_filter(x: Tensor, interpolation: Interpolation) -> Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = -0.5  # Keys cubic with a = -0.5, as PIL and torch's antialiased bicubic
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))


def _axis_weights(
    start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: Interpolation
) -> Tensor:
    """Per-sample (B, out_size, in_size) matrices resampling [start, start+length) to out_size pixels.

    Same weights as torch's antialiased interpolation (`_upsample_*_aa`): a filter of support 1 (bilinear) or
    2 (bicubic) pixels, stretched by the scale when downsampling, truncated at the crop edges and
    renormalised.
    Built for every (output, input) pair at once: O(out × in) memory per sample, cheap next to the matmul.
    """
    dtype = torch.float32
    length_f = length.to(dtype)[:, None, None]
    scale = length_f / out_size
    support = (1.0 if interpolation == "bilinear" else 2.0) * torch.clamp(scale, min=1.0)
    inv = 1.0 / torch.clamp(scale, min=1.0)
    out_index = torch.arange(out_size, device=start.device, dtype=dtype)[None, :, None]
    center = scale * (out_index + 0.5)
    # torch truncates (center ± support + 0.5) toward zero to pick the input window; reproduce that exactly
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length_f)
    j = (
        torch.arange(in_size, device=start.device, dtype=dtype)[None, None, :]
        - start.to(dtype)[:, None, None]
    )
    weights = _aa_filter((j - center + 0.5) * inv, interpolation)
    weights = weights * ((j >= lo) & (j < hi)).to(dtype)
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop_flip(
    images: Tensor,
    boxes: Tensor,
    size: int,
    interpolation: Interpolation = "bilinear",
    hflip: Tensor | None = None,
    vflip: Tensor | None = None,
    force_matmul: bool = False,
    clamp: bool = True,
    index: Tensor | None = None,
) -> Tensor:
    """Crop each image to its box (top, left, h, w), resize to size×size with antialiasing, then flip.

    images: float (B, C, H, W) in [0, 1], or uint8; boxes: (B, 4) integers; hflip/vflip: bool (B,).
    Returns float (B, C, size, size) in [0, 1] (clamp=False keeps values of other colour spaces). uint8
    images are resized in uint8 on CPU (torch's AVX2 kernels, 3–5× faster than float), so the crop is
    rounded to 8 bits exactly as the PIL → ToTensor path of the official recipes rounds it (bicubic also
    clips its overshoot between the horizontal and vertical pass, as PIL does).
    With `index` (N,), only images[index] are cropped, by boxes/flips of the same rows (N, ...), without
    copying those images first.

    On accelerators: out[b] = Wy[b] @ images[b] @ Wx[b]^T, two batched matmuls, with flips as row reversals
    of Wx / Wy. On CPU the dense matmul wastes most of its work on zero weights (each output pixel has 4–8
    taps), so the sparse native kernel of `F.interpolate(antialias=True)` runs per crop instead: the same
    weights, ~6× faster on one core. `force_matmul` selects the batched path anywhere (tests compare both).
    """
    if images.device.type == "cpu" and not force_matmul:
        return _resized_crop_flip_native(images, boxes, size, interpolation, hflip, vflip, clamp, index)
    if index is not None:
        images = images[index]
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    batch, channels, height, width = images.shape
    boxes = boxes.to(images.device)
    rows = _axis_weights(boxes[:, 0], boxes[:, 2], height, size, interpolation)  # (B, size, H)
    cols = _axis_weights(boxes[:, 1], boxes[:, 3], width, size, interpolation)  # (B, size, W)
    if vflip is not None:
        rows = torch.where(vflip.to(images.device)[:, None, None], rows.flip(1), rows)
    if hflip is not None:
        cols = torch.where(hflip.to(images.device)[:, None, None], cols.flip(1), cols)
    rows, cols = rows.to(images.dtype), cols.to(images.dtype)
    # columns first: (B, C*H, W) @ (B, W, size) -> (B, C, H, size)
    x = torch.bmm(images.reshape(batch, channels * height, width), cols.transpose(1, 2))
    x = x.reshape(batch, channels, height, size).transpose(1, 2).reshape(batch, height, channels * size)
    x = torch.bmm(rows, x)  # (B, size, C*size)
    x = x.reshape(batch, size, channels, size).permute(0, 2, 1, 3).contiguous()
    return x.clamp_(0.0, 1.0) if clamp else x


def _resized_crop_flip_native(
    images: Tensor,
    boxes: Tensor,
    size: int,
    interpolation: Interpolation,
    hflip: Tensor | None,
    vflip: Tensor | None,
    clamp: bool,
    index: Tensor | None,
) -> Tensor:
    rows = range(images.shape[0]) if index is None else index.tolist()
    out = torch.empty(len(rows), images.shape[1], size, size, dtype=images.dtype)  # uint8 in, uint8 out
    # flips are applied to each crop while it is in cache, instead of flipped batch copies afterwards
    no_flips = [False] * len(rows)
    hflips = no_flips if hflip is None else hflip.tolist()
    vflips = no_flips if vflip is None else vflip.tolist()
    crops = zip(rows, boxes.tolist(), hflips, vflips, strict=True)
    for position, (row, (top, left, height, width), flip_h, flip_v) in enumerate(crops):
        crop = images[row : row + 1, :, top : top + height, left : left + width]
        if (height, width) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
        dims = [d for d, flip in ((3, flip_h), (2, flip_v)) if flip]
        out[position : position + 1] = crop.flip(dims) if dims else crop
    if out.dtype == torch.uint8:
        out = out.float().div_(255.0)
    elif clamp:
        out.clamp_(0.0, 1.0)
    return out
