"""HoVer-Net's training augmentations for an image patch with its instance (and type) map.

Reference: vqdang/hover_net `dataloader/train_loader.py` (`__get_augmentation`) and `dataloader/augs.py`.
Ranges and probabilities as there:

- geometric (image and maps together): affine with scale U(0.8, 1.2) per axis, translation U(-1 %, 1 %) per
  axis, x-shear U(-5, 5) deg, rotation U(-179, 179) deg; then horizontal and vertical flips, each p = 0.5. The
  official loader warps a patch twice the input size (540 px for 270) and centre-crops: callers pass such a
  patch (`context_size`) and get the centre `out_size` back, so rotated corners hold tissue, not fill.
- one of (each 1/3): Gaussian blur with kernel 1, 3 or 5 per axis (sigma from the kernel), median blur with
  kernel 1, 3 or 5, additive Gaussian noise with sigma U(0, 0.05 * 255) (per channel with p = 0.5);
- in random order: hue + U(-8, 8) (OpenCV's 0-179 hue units), saturation x (1 + U(-0.2, 0.2)) around grey,
  brightness + U(-26, 26), contrast x U(0.75, 1.25) around the mean.

Differences, and why:
- Geometric transforms run in torchvision v2 with the maps as `tv_tensors.Mask`, so maps are resampled
  nearest-neighbour (instance ids and types survive exactly); the image is resampled bilinearly, where the
  official code uses nearest for the image too (imgaug `order=0`), which adds jagged edges to the input.
  Per-axis scaling is a resize before the (isotropic) torchvision affine; imgaug's matrix applies scale first
  too, so the composition is the same.
- Contrast: the official `add_to_contrast` clips the input instead of the result and so never changes the
  image; here the published range takes effect.
HV targets are computed by the caller after these transforms, from the transformed instance map.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

# The official ranges (see module doc).
SCALE = (0.8, 1.2)
TRANSLATE = 0.01  # fraction of the patch size, per axis
SHEAR_DEG = 5.0
ROTATE_DEG = 179.0
BLUR_KSIZES = (1, 3, 5)
NOISE_SIGMA = 0.05 * 255
HUE = 8.0  # OpenCV 8-bit hue units (0-179): +-16 degrees
SATURATION = 0.2
BRIGHTNESS = 26.0
CONTRAST = (0.75, 1.25)
# Official patches are cut at twice the network input (540 px for 270) before the affine transform.
CONTEXT_FACTOR = 2


def context_size(out_size: int) -> int:
    """Side of the patch to cut around an `out_size` patch before `geometric`."""
    return CONTEXT_FACTOR * out_size


def geometric(
    image: np.ndarray, maps: list[np.ndarray], out_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random affine + flips of `image` (H, W, 3) uint8 and its label `maps` (H, W) int, then the centre
    `out_size` crop of each. Maps move with the image and are resampled nearest-neighbour."""
    height, width = image.shape[:2]
    sx, sy = rng.uniform(*SCALE, size=2)
    tx, ty = rng.uniform(-TRANSLATE, TRANSLATE, size=2) * out_size
    shear = float(rng.uniform(-SHEAR_DEG, SHEAR_DEG))
    angle = float(rng.uniform(-ROTATE_DEG, ROTATE_DEG))
    flip_h, flip_v = rng.random(2) < 0.5
    size = [max(1, round(height * sy)), max(1, round(width * sx))]

    def warp(x: torch.Tensor) -> torch.Tensor:
        x = TF.resize(x, size, antialias=False)
        x = TF.affine(x, angle=angle, translate=[round(tx), round(ty)], scale=1.0, shear=[shear, 0.0])
        x = TF.center_crop(x, [out_size, out_size])
        if flip_h:
            x = TF.horizontal_flip(x)
        if flip_v:
            x = TF.vertical_flip(x)
        return x

    # One patch is far too small for intra-op threads: their start-up cost exceeds the work (as in
    # augment.stain.hed_jitter_image); DataLoader workers run one thread anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        img = warp(tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)))
        # All maps in one Mask: one nearest-neighbour warp moves them with identical sampling.
        stack = np.stack([np.asarray(m, dtype=np.int32) for m in maps])
        warped = warp(tv_tensors.Mask(torch.from_numpy(stack))).numpy()
    finally:
        torch.set_num_threads(threads)
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy()), [np.ascontiguousarray(w) for w in warped]


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of blur / median blur / noise, then hue, saturation, brightness and contrast in random order, on
    an (H, W, 3) uint8 RGB image."""
    choice = int(rng.integers(3))
    if choice == 0:
        kx, ky = (int(k) for k in rng.choice(BLUR_KSIZES, size=2))
        image = cv2.GaussianBlur(image, (kx, ky), sigmaX=0, sigmaY=0, borderType=cv2.BORDER_REPLICATE)
    elif choice == 1:
        image = cv2.medianBlur(np.ascontiguousarray(image), int(rng.choice(BLUR_KSIZES)))
    else:
        sigma = rng.uniform(0.0, NOISE_SIGMA)
        shape = image.shape if rng.random() < 0.5 else (*image.shape[:2], 1)
        image = np.clip(image + rng.normal(0.0, sigma, shape), 0, 255).astype(np.uint8)
    for op in rng.permutation(4):
        image = _COLOUR_OPS[int(op)](image, rng)
    return image


def _hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + round(rng.uniform(-HUE, HUE))) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = 1.0 + rng.uniform(-SATURATION, SATURATION)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None]
    return np.clip(image * value + grey * (1.0 - value), 0, 255).astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.uniform(-BRIGHTNESS, BRIGHTNESS), 0, 255).astype(np.uint8)


def _contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = rng.uniform(*CONTRAST)
    mean = image.mean(axis=(0, 1), keepdims=True)
    return np.clip(image * value + mean * (1.0 - value), 0, 255).astype(np.uint8)


_COLOUR_OPS = (_hue, _saturation, _brightness, _contrast)
