"""Batched ops against torchvision's per-image functionals on the same parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from skimage.color import rgb2hsv
from torchvision.transforms import InterpolationMode

from pathssl_cli.augment import color_spaces, crops, ops

TOL = 2e-6


def _images(batch: int = 6, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, height, width, generator=g)
    x[0, :, :5] = 0.5  # gray pixels: hue undefined, saturation 0
    x[1, 1] = x[1, 0]  # ties between channels for the max
    x[2] = (x[2] * 4).round() / 4  # many exact ties and the solarisation threshold region
    return x


def _per_image(fn, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(images[b], float(factors[b])) for b in range(images.shape[0])])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [24, 64])  # downscaling and upscaling
@pytest.mark.parametrize("force_matmul", [False, True])
def test_resized_crop_flip_matches_torchvision(interpolation: str, size: int, force_matmul: bool) -> None:
    x = _images()
    g = torch.Generator().manual_seed(1)
    boxes = crops.random_resized_crop_boxes(6, 40, 48, (0.08, 1.0), (3 / 4, 4 / 3), g)
    hflip = torch.tensor([True, False, True, False, True, False])
    vflip = torch.tensor([False, True, True, False, False, True])
    out = crops.resized_crop_flip(x, boxes, size, interpolation, hflip, vflip, force_matmul=force_matmul)
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    for b in range(6):
        top, left, h, w = boxes[b].tolist()
        expected = TF.resized_crop(x[b], top, left, h, w, [size, size], interpolation=mode, antialias=True)
        expected = expected.clamp(0, 1)
        if hflip[b]:
            expected = TF.horizontal_flip(expected)
        if vflip[b]:
            expected = TF.vertical_flip(expected)
        torch.testing.assert_close(out[b], expected, atol=TOL, rtol=0)


def test_crop_boxes_follow_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(2)
    boxes = crops.random_resized_crop_boxes(4000, 64, 64, (0.2, 0.6), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = (h * w).float() / 64**2
    # rounding h and w to integers moves the area a little past the drawn fraction
    assert area.min() > 0.2 * 0.85 and area.max() < 0.6 * 1.15
    log_ratio = torch.log(w.float() / h.float())
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.1
    # offsets cover the whole valid range (uniform), not only the centre
    assert top.min() == 0 and (top + h).max() == 64


def test_crop_boxes_fall_back_to_the_centre_crop() -> None:
    # a 10×100 strip can never hold a square of 90 % of its area: torchvision's fallback is the central crop
    # clipped to the largest allowed ratio: h = 10, w = round(10 · 4/3) = 13, centred
    g = torch.Generator().manual_seed(3)
    boxes = crops.random_resized_crop_boxes(5, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert boxes.tolist() == [[0, 43, 10, 13]] * 5


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("adjust_brightness", 0.0, 2.0),
        ("adjust_contrast", 0.0, 2.0),
        ("adjust_saturation", 0.0, 2.0),
        ("adjust_hue", -0.5, 0.5),
    ],
)
def test_colour_adjustments_match_torchvision(name: str, low: float, high: float) -> None:
    x = _images()
    factors = torch.linspace(low, high, 6)
    out = getattr(ops, name)(x, factors)
    torch.testing.assert_close(out, _per_image(getattr(TF, name), x, factors), atol=TOL, rtol=0)


def test_grayscale_and_solarize_match_torchvision() -> None:
    x = _images()
    gray = ops.rgb_to_grayscale(x)
    torch.testing.assert_close(gray, torch.stack([TF.rgb_to_grayscale(i) for i in x]), atol=TOL, rtol=0)
    torch.testing.assert_close(ops.solarize(x), torch.stack([TF.solarize(i, 128 / 255) for i in x]))


def test_hsv_matches_skimage_and_round_trips() -> None:
    x = _images().double()
    hsv = color_spaces.rgb_to_hsv(x)
    expected = torch.from_numpy(rgb2hsv(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    torch.testing.assert_close(hsv, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(color_spaces.hsv_to_rgb(hsv), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kernel", [5, 23])
def test_gaussian_blur_matches_torchvision(kernel: int) -> None:
    x = _images(height=32, width=36)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    out = ops.gaussian_blur(x, sigma, kernel)
    expected = torch.stack(
        [TF.gaussian_blur(x[b], [kernel, kernel], [float(sigma[b])] * 2) for b in range(6)]
    )
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def test_gaussian_kernel_is_the_sampled_normal_density() -> None:
    kernel = ops.gaussian_kernels(torch.tensor([1.3]), 7)[0].double()
    offsets = torch.arange(-3, 4, dtype=torch.float64)
    density = torch.exp(-(offsets**2) / (2 * 1.3**2))
    torch.testing.assert_close(kernel, density / density.sum(), atol=1e-7, rtol=0)


def test_color_jitter_applies_the_per_sample_order() -> None:
    x = _images()
    g = torch.Generator().manual_seed(4)
    order = torch.argsort(torch.rand(6, 4, generator=g), dim=1)
    apply = torch.tensor([True, True, False, True, True, True])
    b, c, s = (torch.empty(6).uniform_(0.6, 1.4, generator=g) for _ in range(3))
    h = torch.empty(6).uniform_(-0.1, 0.1, generator=g)
    out = ops.color_jitter(x.clone(), apply, order, b, c, s, h)
    for i in range(6):
        expected = x[i]
        if apply[i]:
            for op_id in order[i].tolist():
                fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op_id]
                expected = fn(expected, float((b, c, s, h)[op_id][i]))
        torch.testing.assert_close(out[i], expected, atol=5e-6, rtol=0)


def test_apply_to_touches_only_selected_samples() -> None:
    x = _images()
    selected = torch.tensor([False, True, False, False, True, False])
    out = ops.apply_to(x.clone(), selected, lambda v: v * 0)
    assert (out[selected] == 0).all()
    torch.testing.assert_close(out[~selected], x[~selected])


@pytest.mark.parametrize("force_matmul", [False, True])
def test_resized_crop_of_selected_rows_equals_cropping_the_selection(force_matmul: bool) -> None:
    x = _images()
    boxes = crops.random_resized_crop_boxes(
        6, 40, 48, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5)
    )
    rows = torch.tensor([4, 1, 3])
    flips = torch.tensor([True, False, True])
    out = crops.resized_crop_flip(x, boxes[rows], 20, "bicubic", flips, ~flips, force_matmul, index=rows)
    expected = crops.resized_crop_flip(x[rows], boxes[rows], 20, "bicubic", flips, ~flips, force_matmul)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_uint8_crops_equal_torchvision_uint8_resize(interpolation: str) -> None:
    x = (_images() * 255).round().to(torch.uint8)
    boxes = crops.random_resized_crop_boxes(
        6, 40, 48, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(6)
    )
    hflip = torch.tensor([True, False, True, False, True, False])
    out = crops.resized_crop_flip(x, boxes, 32, interpolation, hflip)
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    for b in range(6):
        top, left, h, w = boxes[b].tolist()
        expected = TF.resized_crop(x[b], top, left, h, w, [32, 32], interpolation=mode, antialias=True)
        expected = TF.to_dtype(
            TF.horizontal_flip(expected) if hflip[b] else expected, torch.float32, scale=True
        )
        torch.testing.assert_close(out[b] * 255, expected * 255, atol=1e-4, rtol=0)  # the same 8-bit values
    if interpolation == "bilinear":
        # the batched (accelerator) path on the same input differs by the 8-bit rounding only (fixed-point
        # weights: at most one level). Bicubic in uint8 also clips the overshoot between its two passes, as
        # PIL does, so on this noise it may differ more.
        batched = crops.resized_crop_flip(x, boxes, 32, interpolation, hflip, force_matmul=True)
        assert (batched - out).abs().max() <= 1 / 255 + 1e-6


def test_hue_image_by_image_equals_the_batched_formula() -> None:
    # CPU rotates hue one image at a time; accelerators run the batched formula: same per-sample maths
    x = _images()
    factors = torch.linspace(-0.5, 0.5, x.shape[0])
    torch.testing.assert_close(ops.adjust_hue(x, factors), ops._adjust_hue_batch(x, factors), atol=0, rtol=0)
    torch.testing.assert_close(ops.adjust_hue(x, factors), _per_image(TF.adjust_hue, x, factors), atol=TOL, rtol=0)


def test_blur_in_cpu_chunks_equals_the_whole_batch_blur() -> None:
    # 48 images of 64 px exceed one CPU chunk (40 images): the split must not change any value
    x = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    sigma = torch.linspace(0.1, 2.0, 48)
    # oneDNN may pick another kernel for another channel count: equal up to float rounding
    torch.testing.assert_close(ops.gaussian_blur(x, sigma, 23), ops._gaussian_blur(x, sigma, 23), atol=1e-6, rtol=0)
