"""View recipes of the four SSL methods and their batched generation on the training device.

Contract used by the pretraining loop (keep these names and signatures):

    recipe = recipe_for("dino", "pathology", n_local=6)          # a ViewRecipe (pydantic Section)
    views = BatchViews(recipe, mean, std, stain=stats)(images, generator)
    # images: uint8 (B, 3, H, W) on the training device; views: list of float (B, 3, s, s) normalised
    # with mean/std: the `n_global` global views first (global_size), then the `n_local` local views
    # (local_size). The same generator state gives the same views.

Per view, in the order of the official recipes: random resized crop (+ flips) → stain augmentation
(RandStainNA, pathology) → HED jitter (option) → colour jitter (p) → grayscale (p) → Gaussian blur (p) →
solarisation (p) → normalise. Stain augmentation runs before colour jitter, which then perturbs realistic
stainings. RandStainNA uses the channel statistics of the whole tile, as the reference applies it to the
image before any crop, and each view draws its own template (views much smaller than their tiles, or the
HSV space, use each view's own statistics instead; see `BatchViews._views`).

The recipes themselves (which crops, jitter strengths, blur and solarisation each method uses, and what the
`pathology` preset adds) are in `recipes.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pathssl_cli.augment import crops, ops
from pathssl_cli.augment.recipes import ViewRecipe
from pathssl_cli.augment.stain import (
    StainStats,
    channel_stats,
    from_space,
    hed_jitter,
    rand_stain,
    to_space,
)

_CPU_CHUNK_ELEMENTS = 1 << 23  # floats per chunk of tiles on CPU (32 MB), see BatchViews.__call__


class BatchViews:
    """Makes all views of a batch at once on the images' device (the contract is in the module docstring)."""

    def __init__(
        self,
        recipe: ViewRecipe,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        stain: StainStats | None = None,
    ) -> None:
        if recipe.stain.p > 0 and stain is None:
            raise ValueError(
                "the view recipe applies RandStainNA (stain.p > 0) but no stain statistics were given: "
                "fit them with pathssl_cli.augment.stain.fit_stain_stats or set augment stain p = 0"
            )
        if stain is not None and stain.space != recipe.stain.space:
            raise ValueError(
                f"stain statistics are in {stain.space!r} space but the recipe asks for "
                f"{recipe.stain.space!r}; refit them or change stain.space"
            )
        self.recipe = recipe
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.stain = stain

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.device.type != "cpu":
            return self._views(images, generator)
        # On CPU, elementwise passes over tensors beyond a few MB are dominated by page faults: glibc serves
        # blocks over 32 MB with fresh mmaps. Chunks of at most 32 MB of float tiles reuse the heap, and
        # were ~1.5x faster for 64 tiles of 256 px. The chunk size depends only on the tile size, so the
        # views stay a pure function of the generator state.
        chunk = max(1, _CPU_CHUNK_ELEMENTS // (3 * images.shape[2] * images.shape[3]))
        if images.shape[0] <= chunk:
            return self._views(images, generator)
        parts = [self._views(part, generator) for part in images.split(chunk)]
        return [torch.cat(views) for views in zip(*parts, strict=True)]

    def _views(self, images: Tensor, generator: torch.Generator | None) -> list[Tensor]:
        r = self.recipe
        # CPU crops resize the uint8 tiles directly (see `crops.resized_crop_flip`); accelerators crop floats
        source = images if images.device.type == "cpu" else images.float().div_(255.0)
        stain_source = None
        view_pixels = (r.n_global * r.global_size**2 + r.n_local * r.local_size**2) * r.stain.p
        tile_pixels = images.shape[2] * images.shape[3]
        if (
            r.stain.p > 0
            and self.stain is not None
            and self.stain.space != "hsv"
            and view_pixels >= tile_pixels
        ):
            # RandStainNA as the reference applies it, to the whole tile: the tile's channel statistics and
            # its colour-space values are computed once and shared by all views; each view crops the
            # converted tile and moves it to its own sampled template (see `_stained_crop`). Not for HSV:
            # interpolating hue across its 1 → 0 wrap would invent colours, so HSV converts each view. Nor
            # when the stained views hold fewer pixels than the tile (small views of large tiles): then each
            # view is converted on its own, with its own statistics, as RandStainNA after the crop.
            # LAB converts uint8 tiles directly (a table lookup replaces the sRGB curve, see `rgb_to_lab`)
            direct = self.stain.space == "lab" or source.is_floating_point()
            values = to_space(source if direct else source.float() / 255.0, self.stain.space)
            stain_source = (values, *channel_stats(values))
        views = []
        for index in range(r.n_views):
            is_global = index < r.n_global
            if is_global:
                size, scale = r.global_size, r.global_scale
                blur_p = r.blur_p[index % len(r.blur_p)]
                solarize_p = r.solarize_p[index % len(r.solarize_p)]
            else:
                size, scale, blur_p, solarize_p = (
                    r.local_size,
                    r.local_scale,
                    r.local_blur_p,
                    r.local_solarize_p,
                )
            views.append(self._view(source, stain_source, size, scale, blur_p, solarize_p, generator))
        return views

    def _stained_crop(
        self,
        source: Tensor,
        stain_source: tuple[Tensor, Tensor, Tensor],
        boxes: Tensor,
        size: int,
        hflip: Tensor,
        vflip: Tensor,
        selected: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Crops of the RGB tile for unselected images, and for selected ones crops of the tile in the stain
        space moved to a sampled template: (v − tile mean) · template std / tile std + template mean, then
        back to RGB. Each image is cropped once either way; the forward conversion was done per tile.

        Cropping in the stain space instead of RGB differs only by interpolating LAB/HED values (smooth,
        near-linear maps of RGB at the scale of one pixel); a full-tile crop has exactly the template's
        statistics (tested)."""
        assert self.stain is not None
        r = self.recipe
        values, tile_mean, tile_std = stain_source
        selected = selected.to(source.device)
        out = torch.empty(source.shape[0], 3, size, size, dtype=values.dtype, device=source.device)
        plain = (~selected).nonzero().flatten()
        if plain.numel():
            crop = crops.resized_crop_flip(
                source, boxes[plain], size, r.interpolation, hflip[plain], vflip[plain], index=plain
            )
            out.index_copy_(0, plain, crop)
        chosen = selected.nonzero().flatten()
        if chosen.numel():
            stats = StainStats(
                self.stain.space,
                self.stain.distribution,
                self.stain.params,
                extra={"std_hyper": r.stain.std_hyper},
            )
            target_mean, target_std = stats.sample(int(chosen.numel()), generator)
            crop = crops.resized_crop_flip(
                values,
                boxes[chosen],
                size,
                r.interpolation,
                hflip[chosen],
                vflip[chosen],
                clamp=False,
                index=chosen,
            )
            # (v − tile mean) · template std / tile std + template mean, as one multiply-add per pixel
            scale = target_std.to(crop) / tile_std[chosen].clamp(min=1e-4)
            shift = target_mean.to(crop) - tile_mean[chosen] * scale
            crop = crop.mul_(scale[..., None, None]).add_(shift[..., None, None])
            out.index_copy_(0, chosen, from_space(crop, self.stain.space).to(out.dtype))
        return out

    def _view(
        self,
        source: Tensor,
        stain_source: tuple[Tensor, Tensor, Tensor] | None,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One view of every image. All random draws happen here, in a fixed order, from `generator`."""
        r = self.recipe
        batch, _, height, width = source.shape
        device = generator.device if generator is not None else torch.device("cpu")

        def coin(p: float) -> Tensor:
            return torch.rand(batch, device=device, generator=generator) < p

        def uniform(low: float, high: float, shape: tuple[int, ...] = ()) -> Tensor:
            return torch.empty((batch, *shape), device=device).uniform_(low, high, generator=generator)

        boxes = crops.random_resized_crop_boxes(batch, height, width, scale, r.ratio, generator)
        hflip, vflip = coin(r.hflip), coin(r.vflip)
        # parameters are drawn on the generator's device; the images may live elsewhere
        boxes, hflip, vflip = boxes.to(source.device), hflip.to(source.device), vflip.to(source.device)
        if stain_source is None:
            x = crops.resized_crop_flip(source, boxes, size, r.interpolation, hflip, vflip)
        else:
            x = self._stained_crop(
                source, stain_source, boxes, size, hflip, vflip, coin(r.stain.p), generator
            )
        if stain_source is None and r.stain.p > 0 and self.stain is not None:
            stats, std_hyper = self.stain, r.stain.std_hyper
            x = ops.apply_to(x, coin(r.stain.p), lambda v: rand_stain(v, stats, generator, std_hyper))
        if r.hed_jitter.p > 0:
            selected = coin(r.hed_jitter.p)
            alpha = uniform(1 - r.hed_jitter.alpha, 1 + r.hed_jitter.alpha, (3,))
            beta = uniform(-r.hed_jitter.beta, r.hed_jitter.beta, (3,))  # optical density, as hed_jitter
            index = selected.to(x.device).nonzero().flatten()
            x = ops.apply_to(
                x, selected, lambda v: hed_jitter(v, alpha.to(x.device)[index], beta.to(x.device)[index])
            )
        if r.jitter_p > 0:
            apply = coin(r.jitter_p)
            order = torch.argsort(torch.rand(batch, 4, device=device, generator=generator), dim=1)
            brightness = uniform(max(0.0, 1 - r.brightness), 1 + r.brightness)
            contrast = uniform(max(0.0, 1 - r.contrast), 1 + r.contrast)
            saturation = uniform(max(0.0, 1 - r.saturation), 1 + r.saturation)
            hue = uniform(-r.hue, r.hue)
            x = ops.color_jitter(x, apply, order, brightness, contrast, saturation, hue)
        if r.grayscale_p > 0:
            x = ops.apply_to(x, coin(r.grayscale_p), lambda v: ops.rgb_to_grayscale(v).repeat(1, 3, 1, 1))
        if blur_p > 0:
            selected = coin(blur_p)
            sigma = uniform(*r.blur_sigma)
            kernel = min(r.blur_kernel, 2 * size - 1)  # reflect padding needs a kernel under twice the side
            index = selected.to(x.device).nonzero().flatten()
            x = ops.apply_to(x, selected, lambda v: ops.gaussian_blur(v, sigma.to(x.device)[index], kernel))
        if solarize_p > 0:
            x = ops.apply_to(x, coin(solarize_p), ops.solarize)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
