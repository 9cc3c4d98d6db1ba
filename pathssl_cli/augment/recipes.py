"""View recipes of the SSL methods: the `original` preset of each method's official code, and the `pathology`
preset that adds Kang et al.'s techniques. `views.BatchViews` turns a recipe into views.

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
2. RandStainNA stain augmentation with a Gaussian mixture over the per-image statistics (RandStainNA-GMM), as
   Kang et al. specify; what they leave open is set here: LAB space (RandStainNA's best), 3 components,
   p 0.8 per view and std_hyper -0.3 (RandStainNA's training usage). Needs `StainStats` fitted on the
   training tiles;
3. weaker colour jitter: stain augmentation already varies colour realistically, and strong hue and
   saturation jitter makes colours no H&E slide has. We halve each method's strengths: brightness and
   contrast 0.4 → 0.2 (SwAV 0.8 → 0.4), saturation 0.2 → 0.1 (MoCo 0.4 → 0.2, SwAV 0.8 → 0.4), hue
   0.1 → 0.05 (SwAV 0.2 → 0.1). The factor ½ is our reading of "weaker", not a value from the paper;
   override any strength with `recipe_for(..., brightness=...)`;
4. several fields of view: done by the data stream (`TileStream(mpp_weights=...)`), not here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pathssl_cli.augment.stain import RANDSTAINNA_STD_HYPER, ColorSpace, Distribution
from pathssl_cli.specs.core import Section

Preset = Literal["original", "pathology"]
METHODS = ("mocov2", "swav", "barlow_twins", "dino")


class StainOptions(Section):
    """RandStainNA options (Shen et al. 2022)."""

    p: float = Field(0.0, ge=0, le=1, description="Probability per view; 0 turns it off (original recipes).")
    space: ColorSpace = Field(
        "lab", description="Colour space of the statistics; LAB was best in RandStainNA."
    )
    distribution: Distribution = Field(
        "normal", description="Distribution fitted to per-image channel statistics: normal, laplace or gmm "
        "(a Gaussian mixture over the joint (means, stds) vector; the pathology preset's choice, after Kang et "
        "al.). Plain RandStainNA draws from independent Gaussians, hence 'normal' outside the preset."
    )
    gmm_components: int = Field(
        3, ge=1, le=32, description="Mixture components when distribution = 'gmm' (components; capped at half "
        "the fitted tiles). Neither Kang et al. nor RandStainNA report a number; 3 lets a stream of a few "
        "scanners or staining batches keep them apart without fitting noise on the default 1000 tiles."
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
            stain=StainOptions.model_validate({"p": 0.8, "distribution": "gmm"}),
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
