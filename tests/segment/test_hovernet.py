"""HoVer-Net network shapes and losses against values worked out independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathssl_cli.segment.hovernet import build_hovernet, mode_sizes
from pathssl_cli.segment.losses import (
    LossWeights,
    cross_entropy_loss,
    dice_loss,
    hovernet_loss,
    mse_loss,
    msge_loss,
    sobel_kernels,
)


# --------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("backbone", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize(
    ("mode", "in_size", "out_size"), [("original", 270, 80), ("fast", 256, 164), ("same", 64, 64)]
)
def test_output_shapes_per_mode(backbone: str, mode: str, in_size: int, out_size: int) -> None:
    model = build_hovernet(backbone, mode=mode, input_size=64, num_types=6, decoder_width=0.125).eval()
    assert mode_sizes(mode, 64) == (in_size, out_size)
    with torch.no_grad():
        out = model(torch.rand(1, 3, in_size, in_size))
    assert out["np"].shape == (1, 2, out_size, out_size)
    assert out["hv"].shape == (1, 2, out_size, out_size)
    assert out["tp"].shape == (1, 6, out_size, out_size)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_no_type_branch_and_wrong_size_rejected() -> None:
    model = build_hovernet("resnet_tiny", mode="same", input_size=64, num_types=0, decoder_width=0.125).eval()
    with torch.no_grad():
        assert set(model(torch.rand(1, 3, 64, 64))) == {"np", "hv"}
    with pytest.raises(ValueError, match="expects 64x64"):
        model(torch.rand(1, 3, 96, 96))


def test_output_is_the_centre_of_the_input() -> None:
    """Changing input pixels far outside the output window's receptive centre must not move the output much,
    while changing pixels inside it must: the output crop is centred, not anchored at a corner."""
    torch.manual_seed(0)
    model = build_hovernet("resnet_tiny", mode="original", num_types=0, decoder_width=0.125).eval()
    x = torch.rand(1, 3, 270, 270)
    with torch.no_grad():
        base = model(x)["hv"]
        centre = x.clone()
        centre[..., 130:140, 130:140] = 0.0
        moved_centre = (model(centre)["hv"] - base).abs().sum()
        corner = x.clone()
        corner[..., :10, :10] = 0.0
        moved_corner = (model(corner)["hv"] - base).abs().sum()
    assert moved_centre > 10 * moved_corner


def test_frozen_encoder_gets_no_gradient() -> None:
    model = build_hovernet("resnet_tiny", mode="same", input_size=64, num_types=3, decoder_width=0.125)
    model.freeze_encoder(True)
    out = model(torch.rand(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    model.freeze_encoder(False)
    model.zero_grad()
    out = model(torch.rand(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_vit_adapter_uses_shallow_to_deep_blocks() -> None:
    model = build_hovernet("vit_tiny", mode="same", input_size=64, decoder_width=0.125)
    n_maps = len(model.encoder.map_strides)
    sources = model.adapter.sources
    assert [sources[s] for s in (4, 8, 16, 32)] == sorted(sources[s] for s in (4, 8, 16, 32))
    assert sources[4] == 0 and sources[32] == n_maps - 1


# ---------------------------------------------------------------------------------------------- losses
def _logits_pair() -> tuple[torch.Tensor, torch.Tensor]:
    # Pixel 1: logits (0, ln 3) -> p = (1/4, 3/4), target 1. Pixel 2: logits (0, 0) -> p = 1/2, target 0.
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    return logits, target


def test_cross_entropy_by_hand() -> None:
    logits, target = _logits_pair()
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert cross_entropy_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand() -> None:
    logits, target = _logits_pair()
    s = 1e-3
    # class 0: p = (1/4, 1/2), t = (0, 1): inter 1/2, sums 3/4 + 1; class 1: p = (3/4, 1/2), t = (1, 0).
    expected = (1 - (2 * 0.5 + s) / (0.75 + 1 + s)) + (1 - (2 * 0.75 + s) / (1.25 + 1 + s))
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    perfect = torch.tensor([[[[-50.0, 50.0]], [[50.0, -50.0]]]])
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_by_hand() -> None:
    pred = torch.zeros(1, 2, 1, 2)
    true = torch.tensor([[[[1.0, -1.0]], [[0.5, 0.0]]]])
    assert mse_loss(pred, true).item() == pytest.approx((1 + 1 + 0.25 + 0) / 4)


def _numpy_sobel_grad(channel: np.ndarray, axis: str) -> np.ndarray:
    """Cross-correlation with the 5x5 kernel x/(x^2+y^2) (or y/...), zero padding, plain loops."""
    h, w = channel.shape
    out = np.zeros_like(channel, dtype=np.float64)
    for r in range(h):
        for c in range(w):
            acc = 0.0
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if dx == 0 and dy == 0:
                        continue
                    rr, cc = r + dy, c + dx
                    if 0 <= rr < h and 0 <= cc < w:
                        k = (dx if axis == "x" else dy) / (dx * dx + dy * dy)
                        acc += k * channel[rr, cc]
            out[r, c] = acc
    return out


def test_sobel_kernel_orientation() -> None:
    kx, ky = sobel_kernels(5)
    assert kx[2, 4] == pytest.approx(0.5) and kx[2, 0] == pytest.approx(-0.5) and kx[0, 2] == 0
    assert ky[4, 2] == pytest.approx(0.5) and ky[0, 2] == pytest.approx(-0.5) and ky[2, 0] == 0
    assert torch.allclose(kx, ky.T)


def test_msge_matches_numpy_sobel() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(-1, 1, (1, 2, 9, 11)).astype(np.float32)
    pred = rng.uniform(-1, 1, (1, 2, 9, 11)).astype(np.float32)
    focus = np.zeros((1, 9, 11), bool)
    focus[0, 2:7, 3:9] = True
    grad_diff = [
        _numpy_sobel_grad(pred[0, 0], "x") - _numpy_sobel_grad(true[0, 0], "x"),
        _numpy_sobel_grad(pred[0, 1], "y") - _numpy_sobel_grad(true[0, 1], "y"),
    ]
    expected = sum((d[focus[0]] ** 2).sum() for d in grad_diff) / (2 * focus.sum())
    got = msge_loss(torch.from_numpy(pred), torch.from_numpy(true), torch.from_numpy(focus))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_msge_ignores_gradients_outside_nuclei_and_axis_swaps() -> None:
    # A horizontal ramp in the horizontal channel has an x-gradient; the same ramp in the vertical channel has
    # no y-gradient, so swapping channels must change the loss (it would not with transposed kernels).
    x = torch.linspace(-1, 1, 16).repeat(16, 1)
    ramp_h = torch.stack([x, torch.zeros_like(x)])[None]
    zeros = torch.zeros_like(ramp_h)
    focus = torch.zeros(1, 16, 16, dtype=torch.bool)
    focus[0, 4:12, 4:12] = True
    assert msge_loss(ramp_h, zeros, focus).item() > 0
    ramp_v_along_x = torch.stack([torch.zeros_like(x), x])[None]
    assert msge_loss(ramp_v_along_x, zeros, focus).item() == pytest.approx(0.0, abs=1e-6)
    assert msge_loss(ramp_h, zeros, torch.zeros_like(focus)).item() == 0.0


def test_total_loss_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    outputs = {"np": torch.randn(2, 2, 8, 8), "hv": torch.randn(2, 2, 8, 8), "tp": torch.randn(2, 4, 8, 8)}
    targets = {
        "np": torch.randint(0, 2, (2, 8, 8)),
        "hv": torch.rand(2, 2, 8, 8) * 2 - 1,
        "tp": torch.randint(0, 4, (2, 8, 8)),
    }
    weights = LossWeights(np_ce=0.5, np_dice=2.0, hv_mse=3.0, hv_msge=0.25, tp_ce=1.5, tp_dice=0.0)
    total, terms = hovernet_loss(outputs, targets, weights)
    assert set(terms) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    expected = sum(getattr(weights, k) * v for k, v in terms.items())
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["hv_mse"] == pytest.approx(mse_loss(outputs["hv"], targets["hv"]).item())
    without_tp = {k: v for k, v in outputs.items() if k != "tp"}
    assert set(hovernet_loss(without_tp, targets)[1]) == {"np_ce", "np_dice", "hv_mse", "hv_msge"}

