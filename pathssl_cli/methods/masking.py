"""iBOT block masking as DINOv2 makes it (facebookresearch/dinov2 `data/masking.py` `MaskingGenerator` and the
mask part of `data/collate.py` `collate_data_and_cast`), drawn from an explicit generator so that a step's
masks are a pure function of its seed (exact resume).

Per batch of n global crops (crop-major, as the collate stacks them): int(n · p) crops are masked, the i-th
with a target of int(N · u) patches, u uniform in the i-th of the int(n · p) equal buckets of
[ratio_min, ratio_max] (a linspace, so masked crops spread over the whole range); the others are not masked;
then the list is shuffled. A target is reached by adding rectangular blocks of 4+ patches, area uniform in
[4, what is left] (at most half the grid per block), log-uniform aspect ratio in [0.3, 1/0.3]; a block that
would add nothing or more than is left is redrawn (10 tries), and the crop stops short when no try fits.
Masks cover patch tokens only: the CLS and register tokens are never masked (the method inserts the mask token
after the patch embedding, before those tokens are prepended).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MIN_NUM_PATCHES = 4  # dinov2 MaskingGenerator(min_num_patches=4)
MIN_ASPECT = 0.3  # dinov2 MaskingGenerator(min_aspect=0.3), max_aspect = 1 / 0.3
MAX_BLOCK_SHARE = 0.5  # dinov2 train.py: max_num_patches = 0.5 × the grid's patches
MAX_TRIES = 10  # dinov2 MaskingGenerator._mask: `for _ in range(10)`


class MaskingGenerator:
    """Block masks of one (height, width) patch grid; `__call__(n_patches, rng)` → bool (height, width)."""

    def __init__(self, grid: tuple[int, int], min_num_patches: int = MIN_NUM_PATCHES,
                 max_num_patches: float | None = None, min_aspect: float = MIN_ASPECT) -> None:
        self.height, self.width = grid
        self.min_num_patches = min_num_patches
        self.max_num_patches = (MAX_BLOCK_SHARE * self.height * self.width if max_num_patches is None
                                else max_num_patches)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        """Mask one block of at most `max_mask_patches` new patches; returns how many became masked (0: none
        of the tries fitted)."""
        for _ in range(MAX_TRIES):
            # random.uniform(a, b) = a + (b - a) · random(), also when b < a (few patches left)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            low, high = self.log_aspect_ratio
            aspect_ratio = math.exp(low + (high - low) * rng.random())
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))  # random.randint is inclusive
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                added = h * w - int(block.sum())
                if 0 < added <= max_mask_patches:
                    block[...] = True
                    return added
        return 0

    def __call__(self, n_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_patches:
            added = self._add_block(mask, min(n_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def batch_masks(n_crops: int, grid: tuple[int, int], ratio_min_max: tuple[float, float], probability: float,
                rng: np.random.Generator) -> Tensor:
    """Masks of `n_crops` global crops, bool (n_crops, height · width), row-major patches (dinov2
    `collate_data_and_cast`: `collated_masks`)."""
    generator = MaskingGenerator(grid)
    n_patches = grid[0] * grid[1]
    n_masked = int(n_crops * probability)
    # float32 buckets and products, as the collate computes them from a torch.linspace
    bounds = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1).numpy()
    masks = []
    for i in range(n_masked):
        low, high = bounds[i], bounds[i + 1]
        ratio = low + (high - low) * np.float32(rng.random())
        masks.append(generator(int(np.float32(n_patches) * ratio), rng))
    masks += [np.zeros(grid, dtype=bool)] * (n_crops - n_masked)
    order = rng.permutation(n_crops)  # random.shuffle(masks_list)
    stacked = np.stack([masks[i] for i in order]) if masks else np.zeros((0, *grid), dtype=bool)
    return torch.from_numpy(stacked.reshape(n_crops, n_patches))


def mask_weights(masks: Tensor) -> Tensor:
    """(M,) weight of each masked patch, 1 / its crop's masked count, in `masks.flatten().nonzero()` order
    (dinov2 collate `masks_weight`)."""
    per_crop = 1 / masks.sum(-1).clamp(min=1.0)
    return per_crop.unsqueeze(-1).expand_as(masks)[masks]
