"""Batched colour operations for SSL views: one call transforms a batch, each sample with its own parameters.

All ops take float images in [0, 1], shape (B, 3, H, W), on any device, and per-sample parameter tensors of
shape (B,). Each op matches torchvision's per-image functional of the same name on the same parameters
(`torchvision.transforms.v2.functional`; checked in tests/augment/test_ops.py):

- `adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`, `solarize`.
- `gaussian_blur`        = `gaussian_blur(kernel_size, sigma)` with reflect padding, separable,
  per-sample sigma.
- `color_jitter`         = `ColorJitter`: the four adjustments in a per-sample random order.

Crops, resizes and flips are in `crops.py`, colour-space conversions in `color_spaces.py`. Randomness is drawn
by the callers from an explicit `torch.Generator`, never from global state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Interpolation = Literal["bilinear", "bicubic"]
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL


# --------------------------------------------------------------------------------------- colour ops
def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    ratio = _per_sample(ratio, image)
    return (image * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """Luma (B, 1, H, W) with torchvision's weights."""
    r, g, b = images.unbind(dim=1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by factor ∈ [-0.5, 0.5] (fraction of the colour circle), as RGB → HSV → shift → RGB.

    On CPU one image at a time: the fused formula below still makes ~20 passes, and over a whole batch each
    intermediate is tens of MB that no pass finds in cache; one 224 px image's intermediates stay in L2
    (the same per-sample maths, so the same values)."""
    if images.device.type != "cpu" or images.shape[0] <= 1:
        return _adjust_hue_batch(images, factor)
    out = torch.empty_like(images)
    for image, shift, target in zip(images.split(1), factor.split(1), out.split(1), strict=True):
        target.copy_(_adjust_hue_batch(image, shift))
    return out


def _adjust_hue_batch(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by factor ∈ [-0.5, 0.5] (fraction of the colour circle), as RGB → HSV → shift → RGB.

    Fused: with v = max, Δ = max − min (= v·s) and the shifted hue sextant position H ∈ [0, 6), HSV → RGB is
    channel_n = v − Δ · clamp(min(k, 4 − k), 0, 1), k = (n + H) mod 6, n = 5, 3, 1 for R, G, B; this avoids
    materialising H, S, V and the sector gather (about 10× faster on CPU, same values to float rounding).
    """
    # written with in-place arithmetic and float masks: torch.where and fresh allocations dominate on CPU
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # aminmax over dim 1 is ~50x slower on CPU
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = delta.clamp(min=1e-12).reciprocal_()  # a gray pixel has zero numerators below, so any finite value
    red_max = (maxc == r).to(images.dtype)
    green_max = (maxc == g).to(images.dtype).mul_(1.0 - red_max)
    blue_max = (1.0 - red_max).sub_(green_max)
    # sextant position in [-1, 5): R max: (g-b)/Δ, G max: 2 + (b-r)/Δ, B max: 4 + (r-g)/Δ
    sextant = (g - b).mul_(red_max)
    sextant.add_((b - r).add_(delta, alpha=2.0).mul_(green_max))
    sextant.add_((r - g).add_(delta, alpha=4.0).mul_(blue_max))
    sextant.mul_(inv).add_((6.0 * factor.to(images)).reshape(-1, 1, 1) + 12.0)  # + 12 keeps it positive
    out = torch.empty_like(images)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = torch.fmod(sextant + offset, 6.0)
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, weight.mul_(delta), out=out[:, channel])
    return out


def solarize(images: Tensor, threshold: float = 128 / 255) -> Tensor:
    """Invert pixels at or above threshold (PIL `ImageOps.solarize` uses 128 of 255)."""
    # x + [x ≥ t](1 − 2x): arithmetic instead of torch.where, which is several times slower on CPU
    return (images >= threshold).to(images.dtype).mul_(1.0 - 2.0 * images).add_(images)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels (B, kernel_size), one per sigma."""
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - (kernel_size - 1) / 2
    logits = -0.5 * (offsets[None, :] / sigma.float()[:, None]) ** 2
    return torch.softmax(logits, dim=1)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, reflect padding, one sigma per sample (a depthwise conv over B×C groups).

    On CPU in chunks of a multiple of 4 images (12 channels, ~0.5 M values): the oneDNN depthwise kernels
    ran ~1.6× faster on one core on such chunks than on a whole batch of 224 px views (cache), and channel
    counts that are multiples of 12 avoided its slow path (chunks of 2 images were slower than the batch).
    The blur is per sample, so chunks give the values of the whole batch (to float rounding)."""
    if images.device.type == "cpu":
        per_image = images.shape[1] * images.shape[2] * images.shape[3]
        chunk = 4 * max(1, (1 << 19) // (4 * per_image))
        if images.shape[0] > chunk:
            parts = zip(images.split(chunk), sigma.split(chunk), strict=True)
            return torch.cat([_gaussian_blur(part, part_sigma, kernel_size) for part, part_sigma in parts])
    return _gaussian_blur(images, sigma, kernel_size)


def _gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    batch, channels, height, width = images.shape
    kernels = gaussian_kernels(sigma.to(images.device), kernel_size).to(images.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # (B*C, k)
    half = kernel_size // 2
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernels[:, None, None, :], groups=batch * channels)
    x = F.conv2d(x, kernels[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------------- composed jitter
def apply_to(images: Tensor, selected: Tensor, op: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply op to the samples where selected (bool (B,)) is true, in place of those rows."""
    index = selected.to(images.device).nonzero().flatten()
    if index.numel() == 0:
        return images
    if index.numel() == images.shape[0]:
        return op(images)
    # index_select / index_copy_ are plain row copies, ~1.5-3x faster on CPU than advanced indexing;
    # in place: callers own their intermediate tensors
    return images.index_copy_(0, index, op(images.index_select(0, index)))


def _call(op: Callable[[Tensor, Tensor], Tensor], factor: Tensor, images: Tensor) -> Tensor:
    return op(images, factor)


def color_jitter(
    images: Tensor,
    apply: Tensor,
    order: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
) -> Tensor:
    """`ColorJitter` per sample; order (B, 4) permutes 0 brightness, 1 contrast, 2 saturation, 3 hue.

    torchvision skips an adjustment of strength 0; here the caller passes factor 1 (hue 0) for it, and the
    adjustment is skipped when every factor is the identity, so results match and no time is spent.
    Selected rows are written in place, as `apply_to` does (callers own their intermediate tensors).
    """
    enabled = (
        bool((brightness != 1).any()),
        bool((contrast != 1).any()),
        bool((saturation != 1).any()),
        bool((hue != 0).any()),
    )
    ops: list[Callable[[Tensor, Tensor], Tensor]] = [
        adjust_brightness,
        adjust_contrast,
        adjust_saturation,
        adjust_hue,
    ]
    factors = tuple(f.to(images.device) for f in (brightness, contrast, saturation, hue))
    apply = apply.to(images.device)
    order = order.to(images.device)
    if images.device.type == "cpu":
        return _color_jitter_image_by_image(images, apply, order, factors, enabled, ops)
    for slot in range(4):
        for op_id in range(4):
            if not enabled[op_id]:
                continue
            selected = apply & (order[:, slot] == op_id)
            index = selected.nonzero().flatten()
            if index.numel() == 0:
                continue
            images = apply_to(images, selected, functools.partial(_call, ops[op_id], factors[op_id][index]))
    return images


def _color_jitter_image_by_image(
    images: Tensor,
    apply: Tensor,
    order: Tensor,
    factors: tuple[Tensor, ...],
    enabled: tuple[bool, ...],
    ops: list[Callable[[Tensor, Tensor], Tensor]],
) -> Tensor:
    """`color_jitter` on CPU: each image through its own sequence of adjustments, in place of its row.

    The adjustments make ~40 elementwise passes; one 224 px image's intermediates stay in L2 where a
    batch's are tens of MB that no pass finds in cache (~2-3× faster on one core). Every adjustment is
    per sample, so the values are those of the batched path."""
    selected = apply.nonzero().flatten().tolist()
    sequences = order.tolist()
    for row in selected:
        image = images[row : row + 1]
        for op_id in sequences[row]:
            if enabled[op_id]:
                image = ops[op_id](image, factors[op_id][row : row + 1])
        images[row : row + 1] = image
    return images
