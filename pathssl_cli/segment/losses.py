"""HoVer-Net losses as pure functions of tensors.

Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei in multi-tissue
histology images", Medical Image Analysis 2019, Eq. 1-3; reference code vqdang/hover_net
`models/hovernet/utils.py` (`xentropy_loss`, `dice_loss`, `mse_loss`, `msge_loss`) and the loss weights in
`models/hovernet/opt.py`.

Layout is NCHW throughout (the official code is NHWC). Deliberate differences from the official code:
- Cross-entropy is computed from logits with `F.cross_entropy` (log-softmax), not by clamping softmax
  probabilities at 1e-7 and taking the log: same value wherever no probability is below 1e-7, and stable in
  fp16/bf16.
- The MSGE Sobel kernels differentiate the horizontal map along x and the vertical map along y, as the paper
  and the original TensorFlow release do. The PyTorch port builds its kernels with `torch.meshgrid`
  ('ij' indexing), which transposes them, so it differentiates each map along the other axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-3  # official `dice_loss` default


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy (the official "bce" term, which is a softmax cross-entropy).

    logits: (B, C, H, W) raw scores; target: (B, H, W) int64 class ids in [0, C). Returns a scalar.
    """
    return F.cross_entropy(logits.float(), target)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss summed over classes (background included), pooled over the batch and pixels.

    logits: (B, C, H, W); target: (B, H, W) int64. Per class c with p = softmax(logits)[:, c] and
    t = [target == c]: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth); the result is the sum over c,
    as in the official `dice_loss`.
    """
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, num_classes=logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    intersection = (prob * onehot).sum(dims)
    total = prob.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).sum()


def mse_loss(pred_hv: torch.Tensor, true_hv: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels and both channels. pred_hv, true_hv: (B, 2, H, W)."""
    return ((pred_hv.float() - true_hv.float()) ** 2).mean()


def sobel_kernels(size: int = 5, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HoVer-Net's generalised Sobel kernels, (size, size) each: k_x[i, j] = x / (x^2 + y^2), k_y likewise,
    with x = j - size//2 (columns) and y = i - size//2 (rows); the centre is 0."""
    if size % 2 != 1:
        raise ValueError(f"Sobel kernel size must be odd, got {size}")
    offsets = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    norm = x * x + y * y + 1e-15
    return x / norm, y / norm


def hv_gradients(hv: torch.Tensor, size: int = 5) -> torch.Tensor:
    """(B, 2, H, W) -> (B, 2, H, W): d(horizontal map)/dx and d(vertical map)/dy, zero padding as official."""
    kx, ky = sobel_kernels(size, hv.device)
    weight = torch.stack([kx, ky])[:, None].to(hv.dtype)  # (2, 1, k, k), one kernel per channel
    return F.conv2d(hv, weight, padding=size // 2, groups=2)


def msge_loss(pred_hv: torch.Tensor, true_hv: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the HV gradients, inside nuclei only (HoVer-Net Eq. 3, L_b).

    pred_hv, true_hv: (B, 2, H, W), channel 0 horizontal, 1 vertical; focus: (B, H, W) bool/0-1 nuclear mask.
    Returns sum(focus * (grad_pred - grad_true)^2) / (2 * sum(focus) + 1e-8), i.e. the mean over both
    channels of the focused pixels, as the official code divides by the focus summed over its two channels.
    """
    pred_grad = hv_gradients(pred_hv.float())
    true_grad = hv_gradients(true_hv.float())
    focus2 = focus.float()[:, None].expand_as(pred_grad)
    return (focus2 * (pred_grad - true_grad) ** 2).sum() / (focus2.sum() + 1e-8)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the six terms. Defaults follow the HoVer-Net paper (Sec. 3.3: MSGE weighted 2, others 1);
    the released `opt.py` uses 1 for MSGE."""

    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 2.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0


def hovernet_loss(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total HoVer-Net loss and its terms.

    outputs: "np" (B, 2, H, W) logits, "hv" (B, 2, H, W), optional "tp" (B, C, H, W) logits.
    targets: "np" (B, H, W) int64 in {0, 1}, "hv" (B, 2, H, W) float, "tp" (B, H, W) int64 (when typed).
    Returns (scalar loss with gradient, {term name: float value}).
    """
    true_np = targets["np"]
    terms: dict[str, torch.Tensor] = {
        "np_ce": cross_entropy_loss(outputs["np"], true_np),
        "np_dice": dice_loss(outputs["np"], true_np),
        "hv_mse": mse_loss(outputs["hv"], targets["hv"]),
        "hv_msge": msge_loss(outputs["hv"], targets["hv"], true_np > 0),
    }
    if "tp" in outputs:
        terms["tp_ce"] = cross_entropy_loss(outputs["tp"], targets["tp"])
        terms["tp_dice"] = dice_loss(outputs["tp"], targets["tp"])
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    assert isinstance(total, torch.Tensor)
    # One device sync for all terms instead of one per `.item()`.
    values = torch.stack([v.detach() for v in terms.values()]).cpu().tolist()
    return total, dict(zip(terms, values, strict=False))
