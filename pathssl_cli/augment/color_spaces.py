"""Colour-space conversions of float RGB batches (B, 3, H, W) in [0, 1], in their natural units.

- LAB as skimage (`rgb2lab`, D65 white, L ∈ [0, 100]);
- HSV in [0, 1] as torchvision's `rgb_to_hsv` / `hsv_to_rgb`;
- HED as skimage's `rgb2hed` / `hed2rgb` (Ruifrok & Johnston stain vectors; optical density over −ln 1e-6).
`channel_stats` gives the per-image channel mean and std that RandStainNA and Reinhard transfer use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ColorSpace = Literal["lab", "hsv", "hed"]


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB in [0,1] → HSV with h, s, v in [0, 1) / [0, 1] (PIL's and torchvision's convention)."""
    r, g, b = images.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    gray = delta == 0
    safe_delta = torch.where(gray, torch.ones_like(delta), delta)
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = torch.remainder(sector, 6.0)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    choices = torch.stack([v, p, q, t], dim=1)  # index 0..3
    table = torch.tensor(
        [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=hsv.device, dtype=torch.long
    )
    select = table[:, sector.long()].permute(1, 0, 2, 3)  # (B, 3, H, W)
    return choices.gather(1, select)

# sRGB (D65) ↔ CIE XYZ, the matrix skimage uses
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as skimage.color.rgb_from_hed
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_RGB_TO_HED_MIX, _HED_TO_RGB_MIX = _HED_FROM_RGB.T.contiguous(), _RGB_FROM_HED.T.contiguous()
_LOG_EPS = float(np.log(1e-6))  # skimage clips RGB at 1e-6 before the optical-density log
OD_PER_HED_UNIT = -_LOG_EPS  # optical density (-ln I) per unit of skimage's rgb2hed output


@functools.lru_cache(maxsize=64)
def _cast(constant: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A module constant in the images' dtype and device, converted once (the conversions run image by
    image, where re-casting the 3×3 matrices on every call was a visible share of the time)."""
    return constant.to(dtype=dtype, device=device)


def _mix(images: Tensor, matrix: Tensor, offset: Tensor | None = None) -> Tensor:
    """out[:, i] = Σ_j matrix[i, j] · images[:, j] (+ offset[i]) for (B, 3, H, W); a batched matmul, which
    is ~4× faster on CPU than the equivalent einsum or 1×1 convolution."""
    out = torch.matmul(_cast(matrix, images.dtype, images.device), images.reshape(images.shape[0], 3, -1))
    if offset is not None:
        out.add_(_cast(offset, images.dtype, images.device).reshape(1, 3, 1))
    return out.reshape(images.shape)


def _piecewise(x: Tensor, threshold: float, above: Tensor, below: Callable[[], Tensor]) -> Tensor:
    """above where x > threshold else below(), blended by a float mask (torch.where is several times slower
    on CPU). The low branches of the sRGB/LAB curves only serve near-black pixels, rare in H&E: when no
    pixel is at or below the threshold, below() is never computed."""
    if bool(x.amin() > threshold):  # a min-reduction is ~20× cheaper than building the mask and all()
        return above
    weight = (x > threshold).to(x.dtype)
    return above.mul_(weight).add_(below().mul_(1.0 - weight))


def _power(x: Tensor, exponent: float) -> Tensor:
    """x ** exponent for x > 0 as 2^(exponent · log2 x): vectorised exp2/log2 beat pow by ~2× on CPU (and
    exp2 is ~2.5× faster than exp)."""
    return torch.log2(x).mul_(exponent).exp2_()


# L = 116 fy − 16, a = 500 (fx − fy), b = 200 (fy − fz): a linear map of f = (fx, fy, fz)
_LAB_FROM_F = torch.tensor(
    [[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64
)
_F_FROM_LAB = torch.linalg.inv(_LAB_FROM_F)
_LAB_OFFSET = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64)
_F_OFFSET = -_F_FROM_LAB @ _LAB_OFFSET
_XYZ_WHITE_FROM_RGB = _XYZ_FROM_RGB / _D65_WHITE[:, None]  # XYZ relative to the white point
_RGB_FROM_XYZ_WHITE = _RGB_FROM_XYZ * _D65_WHITE[None, :]


def _srgb_to_linear(images: Tensor) -> Tensor:
    return _piecewise(images, 0.04045, _power((images + 0.055) / 1.055, 2.4), lambda: images / 12.92)


# the sRGB → linear curve at the 256 levels of 8-bit input, in float64 (rounded once to the output dtype)
_LINEAR_FROM_SRGB8 = _srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0)


def _image_by_image(convert: Callable[[Tensor], Tensor], images: Tensor, dtype: torch.dtype) -> Tensor:
    """convert applied one image at a time on CPU, into one output tensor.

    The conversions chain ~15 elementwise passes; over a whole batch every intermediate is a fresh tensor of
    tens of MB (served by new mmaps, page-faulted on first touch) and no pass hits the cache. One image of
    224 px is 0.6 MB of float32, so its intermediates stay in L2: 1.5–2.5× faster on one core. Elementwise
    maths, so the values are those of the batched call (also the near-black branch of `_piecewise`, now
    decided per image)."""
    if images.device.type != "cpu" or images.shape[0] <= 1:
        return convert(images)
    out = torch.empty(images.shape, dtype=dtype)
    for image, target in zip(images.split(1), out.split(1), strict=True):
        target.copy_(convert(image))
    return out


def rgb_to_lab(images: Tensor) -> Tensor:
    """sRGB in [0, 1] → CIE L*a*b* (D65), as `skimage.color.rgb2lab`.

    uint8 images (0..255) give float32 LAB; their sRGB → linear step is a lookup in a 256-entry table
    computed in float64, which replaces the power curve (the costliest pass) and is more exact than it."""
    if images.dtype == torch.uint8:
        table = _LINEAR_FROM_SRGB8.to(device=images.device, dtype=torch.float32)
        return _image_by_image(  # index_select: ~5× faster than advanced indexing on CPU
            lambda image: _linear_to_lab(table.index_select(0, image.flatten().int()).view(image.shape)),
            images,
            torch.float32,
        )
    return _image_by_image(lambda image: _linear_to_lab(_srgb_to_linear(image)), images, images.dtype)


def _linear_to_lab(linear: Tensor) -> Tensor:
    xyz = _mix(linear, _XYZ_WHITE_FROM_RGB)
    f = _piecewise(xyz, 0.008856, _power(xyz.clamp(min=1e-12), 1.0 / 3.0), lambda: xyz * 7.787 + 16.0 / 116.0)
    return _mix(f, _LAB_FROM_F, _LAB_OFFSET)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE L*a*b* (D65) → sRGB clipped to [0, 1], as `skimage.color.lab2rgb`."""
    return _image_by_image(_lab_to_rgb, lab, lab.dtype)


def _lab_to_rgb(lab: Tensor) -> Tensor:
    f = _mix(lab, _F_FROM_LAB, _F_OFFSET)
    xyz = _piecewise(f, 0.2068966, f * f * f, lambda: (f - 16.0 / 116.0) / 7.787).clamp_(min=0.0)
    linear = _mix(xyz, _RGB_FROM_XYZ_WHITE).clamp_(min=0.0)
    srgb = _piecewise(
        linear,
        0.0031308,
        _power(linear.clamp(min=1e-12), 1.0 / 2.4).mul_(1.055).sub_(0.055),
        lambda: linear * 12.92,
    )
    return srgb.clamp_(0.0, 1.0)


def rgb_to_hed(images: Tensor, clip: bool = True) -> Tensor:
    """Optical densities of haematoxylin, eosin and DAB, as `skimage.color.rgb2hed`.

    clip=False keeps the negative densities skimage clips away, so `hed_to_rgb` inverts it exactly: the
    augmentations use that, or an identity transfer would already change off-gamut pixels.
    """
    density = torch.log(images.clamp(min=1e-6)) / _LOG_EPS
    hed = _mix(density, _RGB_TO_HED_MIX)
    return hed.clamp(min=0.0) if clip else hed


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of `rgb_to_hed` (as `skimage.color.hed2rgb`), clipped to [0, 1]."""
    log_rgb = _mix(hed * _LOG_EPS, _HED_TO_RGB_MIX)
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def to_space(images: Tensor, space: ColorSpace) -> Tensor:
    """RGB → space; HED unclipped (see `rgb_to_hed`), so that `from_space` inverts it."""
    if space == "lab":
        return rgb_to_lab(images)
    if space == "hed":
        return rgb_to_hed(images, clip=False)
    return rgb_to_hsv(images)


def from_space(values: Tensor, space: ColorSpace) -> Tensor:
    if space == "lab":
        return lab_to_rgb(values)
    if space == "hed":
        return hed_to_rgb(values)
    hue = torch.remainder(values[:, 0], 1.0)
    return hsv_to_rgb(torch.stack([hue, values[:, 1].clamp(0, 1), values[:, 2].clamp(0, 1)], dim=1))


def channel_stats(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image channel mean and population std (B, 3) each, as the reference (np.mean / np.std)."""
    # from the first two moments: 4× faster than Tensor.std on CPU, and float32 sums over a tile keep the
    # std accurate to ~1e-5 of the channel range
    flat = values.flatten(2)
    mean = flat.mean(dim=2)
    variance = (flat * flat).mean(dim=2) - mean * mean
    return mean, variance.clamp_(min=0.0).sqrt_()
