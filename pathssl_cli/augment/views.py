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

`original` recipes, each from the method's official code:
- mocov2: facebookresearch/moco `main_moco.py --aug-plus`: 2×224 crops, scale (0.2, 1), jitter
  (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur σ ∈ [0.1, 2] p 0.5, horizontal flip.
- swav: facebookresearch/swav `multicropdataset.py` + README multi-crop: 2×224 scale (0.14, 1) + 6×96
  scale (0.05, 0.14), `get_color_distortion(s=1)` = jitter (0.8, 0.8, 0.8, 0.2) p 0.8 + grayscale 0.2,
  blur p 0.5 with a 23 px kernel, horizontal flip. SwAV's std typo (0.228, ...) is not reproduced:
  mean/std come from the backbone.
- barlow_twins: facebookresearch/barlowtwins `main.py` Transform: 2×224 bicubic, scale (0.08, 1), jitter
  (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarisation p 0.0 / 0.2.
- dino: facebookresearch/dino `main_dino.py` DataAugmentationDINO: 2×224 bicubic scale (0.4, 1) with
  blur p 1.0 / 0.1 and solarisation 0 / 0.2; local 96 px crops scale (0.05, 0.4) with blur p 0.5; jitter
  (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2. 10 local crops, as the released ViT-S/16 runs
  (`--local_crops_number 10`; the argparse default is 8).

Blur is an exact Gaussian with a 23 px kernel for every method (SwAV's cv2 kernel; PIL's `GaussianBlur`,
used by DINO, Barlow Twins and MoCo, approximates the same σ with box filters), as torchvision v2
`GaussianBlur(23, (0.1, 2))`.

`pathology` = `original` + the four techniques of Kang et al., "Benchmarking Self-Supervised Learning on
Diverse Pathology Datasets", CVPR 2023, §4 (techniques to adapt SSL for pathology):
1. random vertical flips (p 0.5): tissue has no canonical orientation;
2. RandStainNA stain augmentation (p 0.8, LAB, normal; needs `StainStats` fitted on the training tiles);
3. weaker colour jitter: stain augmentation already varies colour realistically, and strong hue and
   saturation jitter makes colours no H&E slide has. We halve each method's strengths: brightness and
   contrast 0.4 → 0.2 (SwAV 0.8 → 0.4), saturation 0.2 → 0.1 (MoCo 0.4 → 0.2, SwAV 0.8 → 0.4), hue
   0.1 → 0.05 (SwAV 0.2 → 0.1). The factor ½ is our reading of "weaker", not a value from the paper;
   override any strength with `recipe_for(..., brightness=...)`;
4. several fields of view: done by the data stream (`TileStream(mpp_weights=...)`), not here.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pathssl_cli.augment import ops
from pathssl_cli.augment.stain import (
    RANDSTAINNA_STD_HYPER,
    ColorSpace,
    Distribution,
    StainStats,
    channel_stats,
    from_space,
    hed_jitter,
    rand_stain,
    to_space,
)
from pathssl_cli.specs.core import Section

Preset = Literal["original", "pathology"]
_CPU_CHUNK_ELEMENTS = 1 << 23  # floats per chunk of tiles on CPU (32 MB), see BatchViews.__call__
METHODS = ("mocov2", "swav", "barlow_twins", "dino")


class StainOptions(Section):
    """RandStainNA options (Shen et al. 2022)."""

    p: float = Field(0.0, ge=0, le=1, description="Probability per view; 0 turns it off (original recipes).")
    space: ColorSpace = Field(
        "lab", description="Colour space of the statistics; LAB was best in RandStainNA."
    )
    distribution: Distribution = Field(
        "normal", description="Distribution fitted to per-image channel statistics: normal, laplace or gmm."
    )
    std_hyper: float = Field(
        RANDSTAINNA_STD_HYPER,
        ge=-1,
        description="Scales the spread of the sampled templates by (1 + std_hyper): > 0 widens, < 0 narrows, "
        "0 = as fitted. -0.3 as the reference's training usage (yiqings/RandStainNA main.py).",
    )


class HedJitterOptions(Section):
    """HED jitter (Tellez et al. 2018/2019): per stain channel h·α + β, α ~ U(1-σ, 1+σ), β ~ U(-b, b)."""

    p: float = Field(0.0, ge=0, le=1, description="Probability per view; off by default (an option).")
    alpha: float = Field(0.05, ge=0, le=1, description="σ of the multiplicative factor; 0.05 = 'HED-light'.")
    beta: float = Field(
        0.05,
        ge=0,
        le=1,
        description="b of the additive offset in optical density (-ln of intensity); 0.05 = 'HED-light', "
        "a few percent of the intensity range.",
    )


class ViewRecipe(Section):
    """How each view of an image is made. Defaults are DINO's official recipe."""

    n_global: int = Field(2, ge=1, description="Number of global views (every method uses 2).")
    global_size: int = Field(224, ge=8, description="Global view side in px (224 in all official recipes).")
    global_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="Crop area range as a fraction of the tile, for global views."
    )
    n_local: int = Field(10, ge=0, description="Number of local (small) views; 0 for two-view methods.")
    local_size: int = Field(96, ge=8, description="Local view side in px (96 in SwAV and DINO).")
    local_scale: tuple[float, float] = Field((0.05, 0.4), description="Crop area range for local views.")
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="Crop aspect-ratio range (torchvision's RandomResizedCrop default)."
    )
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bicubic",
        description="Resize filter, antialiased; DINO and Barlow Twins use bicubic, MoCo and SwAV bilinear.",
    )
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip per view.")
    vflip: float = Field(
        0.0, ge=0, le=1, description="Probability of a vertical flip; 0.5 in the pathology preset."
    )
    jitter_p: float = Field(
        0.8, ge=0, le=1, description="Probability of colour jitter per view (0.8 everywhere)."
    )
    brightness: float = Field(0.4, ge=0, description="Brightness factor drawn from [1-b, 1+b].")
    contrast: float = Field(0.4, ge=0, description="Contrast factor drawn from [1-c, 1+c].")
    saturation: float = Field(0.2, ge=0, description="Saturation factor drawn from [1-s, 1+s].")
    hue: float = Field(
        0.1, ge=0, le=0.5, description="Hue shift drawn from [-h, h] (fraction of the circle)."
    )
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Probability of converting a view to grayscale.")
    blur_p: list[float] = Field(
        [1.0, 0.1], description="Blur probability of each global view (cycled if shorter than n_global)."
    )
    local_blur_p: float = Field(0.5, ge=0, le=1, description="Blur probability of every local view.")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Blur σ range in px, drawn uniformly.")
    blur_kernel: int = Field(
        23,
        ge=3,
        description="Blur kernel side in px (odd); 23 as SwAV/SimCLR; capped at 2 × side − 1 on tiny views.",
    )
    solarize_p: list[float] = Field(
        [0.0, 0.2], description="Solarisation probability of each global view (cycled if shorter)."
    )
    local_solarize_p: float = Field(0.0, ge=0, le=1, description="Solarisation probability of local views.")
    stain: StainOptions = Field(default_factory=StainOptions, description="RandStainNA (pathology preset).")
    hed_jitter: HedJitterOptions = Field(default_factory=HedJitterOptions, description="HED jitter (option).")

    @model_validator(mode="after")
    def _check(self) -> ViewRecipe:
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be an increasing pair of positive numbers, got {(low, high)}")
        for name in ("blur_p", "solarize_p"):
            values = getattr(self, name)
            if not values or any(not 0 <= v <= 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of probabilities, got {values}")
        return self

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local


_ORIGINAL: dict[str, dict[str, object]] = {
    "mocov2": dict(
        n_local=0,
        global_scale=(0.2, 1.0),
        interpolation="bilinear",
        saturation=0.4,
        blur_p=[0.5],
        solarize_p=[0.0],
    ),
    "swav": dict(
        n_local=6,
        global_scale=(0.14, 1.0),
        local_scale=(0.05, 0.14),
        interpolation="bilinear",
        brightness=0.8,
        contrast=0.8,
        saturation=0.8,
        hue=0.2,
        blur_p=[0.5],
        local_blur_p=0.5,
        solarize_p=[0.0],
    ),
    "barlow_twins": dict(
        n_local=0,
        global_scale=(0.08, 1.0),
        interpolation="bicubic",
        blur_p=[1.0, 0.1],
        solarize_p=[0.0, 0.2],
    ),
    "dino": dict(
        n_local=10,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        interpolation="bicubic",
        blur_p=[1.0, 0.1],
        local_blur_p=0.5,
        solarize_p=[0.0, 0.2],
        local_solarize_p=0.0,
    ),
}


def recipe_for(method: str, preset: Preset = "original", **overrides: object) -> ViewRecipe:
    """The view recipe of `method` (mocov2, swav, barlow_twins, dino) in `preset`, with field overrides."""
    if method not in _ORIGINAL:
        raise ValueError(f"no view recipe for method {method!r}; known: {', '.join(METHODS)}")
    if preset not in ("original", "pathology"):
        raise ValueError(f"unknown augmentation preset {preset!r}; use 'original' or 'pathology'")
    fields: dict[str, object] = dict(_ORIGINAL[method])
    if preset == "pathology":
        base = ViewRecipe(**fields)  # type: ignore[arg-type]
        fields.update(
            vflip=0.5,
            stain=StainOptions.model_validate({"p": 0.8}),
            brightness=base.brightness / 2,
            contrast=base.contrast / 2,
            saturation=base.saturation / 2,
            hue=base.hue / 2,
        )
    for name, value in overrides.items():
        current = fields.get(name)
        if isinstance(value, dict) and isinstance(current, (StainOptions, HedJitterOptions)):
            value = {**current.model_dump(), **value}  # {stain = {space = "hed"}} keeps the preset's p
        fields[name] = value
    return ViewRecipe(**fields)  # type: ignore[arg-type]


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
        # CPU crops resize the uint8 tiles directly (see `ops.resized_crop_flip`); accelerators crop floats
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
            crop = ops.resized_crop_flip(
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
            crop = ops.resized_crop_flip(
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

        boxes = ops.random_resized_crop_boxes(batch, height, width, scale, r.ratio, generator)
        hflip, vflip = coin(r.hflip), coin(r.vflip)
        # parameters are drawn on the generator's device; the images may live elsewhere
        boxes, hflip, vflip = boxes.to(source.device), hflip.to(source.device), vflip.to(source.device)
        if stain_source is None:
            x = ops.resized_crop_flip(source, boxes, size, r.interpolation, hflip, vflip)
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
