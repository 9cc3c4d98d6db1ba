"""HoVer-Net network shapes and losses against values worked out independently."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize(("backbone", "stem"), [("resnet_tiny", "stride4"), ("resnet_tiny", "full"),
                                               ("vit_tiny", "stride4")])
def test_channels_last_computes_the_same_outputs_and_gradients(backbone: str, stem: str) -> None:
    torch.manual_seed(0)
    nchw = build_hovernet(backbone, mode="same", input_size=64, num_types=3, decoder_width=0.125,
                          encoder_stem=stem)
    nhwc = copy.deepcopy(nchw).use_channels_last()
    assert nhwc.decoder["np"].u0[1].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64)
    outputs = [model(x) for model in (nchw, nhwc)]
    # Float rounding differs between the layouts' kernels (~1e-5 of the outputs' range); a layout bug such
    # as a view that mixes channels and pixels would differ by O(1).
    for key in outputs[0]:
        scale = float(outputs[0][key].detach().abs().max())
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=0, atol=1e-4 * scale)
    for out in outputs:
        torch.stack([(v ** 2).mean() for v in out.values()]).sum().backward()
    pairs = [(a.grad, b.grad) for a, b in zip(nchw.parameters(), nhwc.parameters(), strict=True)]
    assert all((ga is None) == (gb is None) for ga, gb in pairs)
    # Per element, rounding dominates gradients that are ~0 in exact arithmetic (a bias before BatchNorm),
    # so compare the whole gradient vector.
    flat_a = torch.cat([ga.flatten() for ga, _ in pairs if ga is not None])
    flat_b = torch.cat([gb.contiguous().flatten() for ga, gb in pairs if ga is not None])
    assert float((flat_b - flat_a).norm() / flat_a.norm()) < 1e-3


def test_vit_adapter_uses_shallow_to_deep_blocks() -> None:
    model = build_hovernet("vit_tiny", mode="same", input_size=64, decoder_width=0.125)
    n_maps = len(model.encoder.map_strides)
    sources = model.adapter.sources
    strides = model.adapter.skip_strides
    assert strides == (1, 2, 4, 8)
    assert [sources[s] for s in strides] == sorted(sources[s] for s in strides)
    assert sources[1] == 0 and sources[8] == n_maps - 1


def test_vit_finest_maps_see_the_image_through_a_light_stem() -> None:
    """With the 'full' stem, a ViT's stride-1 and stride-2 skips also come from convolutions on the image
    (not from upsampled tokens alone): the light stem receives gradient from the output."""
    model = build_hovernet("vit_tiny", mode="same", input_size=64, decoder_width=0.125)
    stem = model.adapter.light_stem
    assert stem is not None
    sum(v.sum() for v in model(torch.rand(2, 3, 64, 64)).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    assert build_hovernet("vit_tiny", mode="same", input_size=64, decoder_width=0.125,
                          encoder_stem="stride4").adapter.light_stem is None


@pytest.mark.parametrize("backbone", ["resnet_tiny", "resnet18"])
def test_full_stem_keeps_resolution_and_stride4_does_not(backbone: str) -> None:
    full = build_hovernet(backbone, mode="same", input_size=64, decoder_width=0.125)
    assert full.encoder.map_strides == [1, 2, 4, 8]
    assert full.adapter.skip_strides == (1, 2, 4, 8)
    assert all(len(branch.up_convs) == 0 for branch in full.decoder.values())
    stride4 = build_hovernet(backbone, mode="same", input_size=64, decoder_width=0.125, encoder_stem="stride4")
    assert stride4.encoder.map_strides == [4, 8, 16, 32]
    assert all(len(branch.up_convs) == 2 for branch in stride4.decoder.values())


def test_full_stem_resnet50_has_the_official_layer_shapes() -> None:
    """Official HoVer-Net (net_desc.py): conv0 7x7 3->64 stride 1, no max-pool; d0..d3 = ResNet-50 stages at
    strides 1, 2, 4, 8 with 256, 512, 1024, 2048 channels; conv_bot 1x1 2048 -> 1024; decoder u3 1024 -> 256
    conv + 8 dense units (128 -> 32, 4 groups) + 1x1 512 -> 512; u2 512 -> 128 + 4 units + 1x1 256 -> 256;
    u1 256 -> 64; u0 BN-ReLU-1x1 64 -> out. 'fast' mode: 256 px in, 164 out (shapes checked on the meta
    device: no arithmetic is run)."""
    model = build_hovernet("resnet50", mode="fast", num_types=6)  # PanNuke: 5 types + background
    enc = model.encoder.timm_model
    assert (enc.conv1.kernel_size, enc.conv1.stride, enc.conv1.out_channels) == ((7, 7), (1, 1), 64)
    assert isinstance(enc.maxpool, torch.nn.Identity)
    projections = model.adapter.projections
    assert all(isinstance(projections[str(s)], torch.nn.Identity) for s in (1, 2, 4))
    conv_bot = projections["8"][-1]
    assert conv_bot.weight.shape == (1024, 2048, 1, 1)
    branch = model.decoder["np"]
    assert branch.u3_conv.weight.shape == (256, 1024, 3, 3)
    assert len(branch.u3_dense.units) == 8 and branch.u3_dense.units[0][1].weight.shape == (128, 256, 1, 1)
    assert branch.u3_dense.units[0][3].weight.shape == (32, 32, 3, 3)  # 128 in, 4 groups -> 32 per group
    assert branch.u3_out.weight.shape == (512, 512, 1, 1)
    assert branch.u2_conv.weight.shape == (128, 512, 3, 3)
    assert len(branch.u2_dense.units) == 4 and branch.u2_out.weight.shape == (256, 256, 1, 1)
    assert branch.u1_conv.weight.shape == (64, 256, 3, 3)
    assert branch.u0[1].weight.shape == (2, 64, 1, 1) and model.decoder["tp"].u0[1].weight.shape == (6, 64, 1, 1)
    model = model.to("meta").eval()
    maps = model.encoder.forward_maps(torch.empty(1, 3, 256, 256, device="meta"))
    assert [tuple(m.shape[1:]) for m in maps] == [(256, 256, 256), (512, 128, 128), (1024, 64, 64), (2048, 32, 32)]
    out = model(torch.empty(1, 3, 256, 256, device="meta"))
    assert out["np"].shape == (1, 2, 164, 164) and out["tp"].shape == (1, 6, 164, 164)
    assert build_hovernet("resnet50", mode="original").decoder["hv"].u3_conv.kernel_size == (5, 5)


@pytest.mark.parametrize("layout", ["torchvision", "lunit"])
def test_resnet50_weights_load_strictly_into_the_full_stem(tmp_path, layout: str) -> None:
    """torchvision's ResNet-50 state dict (with fc) and Lunit's release layout (torchvision keys, no fc) load
    strictly into the full-resolution encoder, shape for shape."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    if layout == "lunit":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": state}, path)
    model = build_hovernet("resnet50", weights=str(path), mode="fast")
    loaded = model.encoder.timm_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert model.encoder.timm_model.conv1.stride == (1, 1)
    assert model.encoder.map_strides == [1, 2, 4, 8]


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

