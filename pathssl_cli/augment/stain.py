"""Stain augmentation for H&E tiles: RandStainNA and HED jitter, batched, plus the colour-space conversions.

RandStainNA (Shen et al., MICCAI 2022; yiqings/RandStainNA): each image's per-channel mean and std in a colour
space (LAB, HSV or HED) are moved to a *virtual template* sampled from the distribution of those
statistics over
the training tiles (Reinhard transfer): x' = (x - mean_img) / std_img * std_tgt + mean_tgt. Kang et al.
(CVPR 2023, §4) use it as one of the four pathology techniques. Differences from the reference code, on
purpose:

- colour spaces are in their natural units, computed in float: LAB as skimage (L ∈ [0, 100], D65), HSV in
  [0, 1],
  HED as `skimage.color.rgb2hed`; the reference converts with 8-bit OpenCV LAB/HSV. Statistics fitted here are
  only valid for this module (they are saved with the space they belong to).
- "laplace" is fitted by maximum likelihood (median, mean absolute deviation); the reference reuses mean/std.
- "gmm" fits a Gaussian mixture to the joint 6-d vector (3 means, 3 stds) so correlated statistics are sampled
  together (the RandStainNA-GMM variant).
- back-conversion clips to [0, 1]; the reference min-max rescales HED output, which changes brightness.
- a sampled target std is kept ≥ 1 % of its fitted mean: a negative std would mirror the image's contrast.
- `BatchViews` converts each tile once and transfers its views' crops in the stain space with the tile's
  statistics (the reference normalises the whole image before cropping); `rand_stain` here works on any
  batch of images with their own statistics.

HED jitter (Tellez et al., 2018 and 2019): per stain, od' = od · α + β with α ~ U(1-σ, 1+σ) and
β ~ U(-b, b), β in optical density (−ln I) in every command (see `hed_jitter`). Tellez et al. 2019 call
σ = b = 0.05 "HED-light" and 0.2 "HED-strong".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pathssl_cli.augment.color_spaces import (
    OD_PER_HED_UNIT,
    ColorSpace,
    channel_stats,
    from_space,
    hed_to_rgb,
    rgb_to_hed,
    to_space,
)

Distribution = Literal["normal", "laplace", "gmm"]

#: RandStainNA's std_hyper in the reference's training usage (yiqings/RandStainNA `main.py`:
#: `RandStainNA(..., std_hyper=-0.3, ...)`): templates are drawn with 0.7 × the fitted spread.
RANDSTAINNA_STD_HYPER = -0.3


# -------------------------------------------------------------------------------- fitted statistics
@dataclass
class StainStats:
    """The distribution of per-image channel statistics over training tiles, in one colour space.

    params, by distribution (lists are per channel of the space, in order):
    - normal / laplace: `mean_loc`, `mean_scale` (of the images' channel means), `std_loc`, `std_scale`
      (of their channel stds).
      normal: loc = average, scale = standard deviation; laplace: loc = median, scale = mean |x - median|.
    - gmm: `weights` (K,), `means` (K, 6), `covariances` (K, 6, 6) over the vector (mean_1..3, std_1..3).
    """

    space: ColorSpace
    distribution: Distribution
    params: dict[str, Any]
    n_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path | str) -> None:
        from pathssl_cli.fileio import atomic_write

        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path | str) -> StainStats:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "distribution": self.distribution,
            "params": self.params,
            "n_images": self.n_images,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainStats:
        return cls(
            space=data["space"],
            distribution=data["distribution"],
            params=data["params"],
            n_images=int(data.get("n_images", 0)),
            extra=dict(data.get("extra", {})),
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n virtual templates: target channel means and stds, (n, 3) float64 each, on the generator's
        device."""
        device = generator.device if generator is not None else torch.device("cpu")
        p = self.params
        if self.distribution == "gmm":
            weights = torch.tensor(p["weights"], dtype=torch.float64, device=device)
            means = torch.tensor(p["means"], dtype=torch.float64, device=device)
            chol = torch.linalg.cholesky(torch.tensor(p["covariances"], dtype=torch.float64, device=device))
            component = torch.multinomial(weights, n, replacement=True, generator=generator)
            noise = torch.randn(n, means.shape[1], dtype=torch.float64, device=device, generator=generator)
            spread = 1.0 + float(self.extra.get("std_hyper", 0.0))  # scales every component's spread
            vectors = means[component] + spread * torch.einsum("nij,nj->ni", chol[component], noise)
            target_mean, target_std = vectors[:, :3], vectors[:, 3:]
            std_floor = 0.01 * means[:, 3:].min(dim=0).values.abs()
        else:
            spread = 1.0 + float(self.extra.get("std_hyper", 0.0))  # RandStainNA's std_hyper
            tensors = {k: torch.tensor(p[k], dtype=torch.float64, device=device) for k in _MOMENT_KEYS}
            draws = _standard_draws(self.distribution, (2, n, 3), device, generator)
            target_mean = tensors["mean_loc"] + tensors["mean_scale"] * spread * draws[0]
            target_std = tensors["std_loc"] + tensors["std_scale"] * spread * draws[1]
            std_floor = 0.01 * tensors["std_loc"].abs()
        return target_mean, torch.maximum(target_std, std_floor.expand_as(target_std))


_MOMENT_KEYS = ("mean_loc", "mean_scale", "std_loc", "std_scale")


def _standard_draws(
    distribution: Distribution,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    if distribution == "normal":
        return torch.randn(shape, dtype=torch.float64, device=device, generator=generator)
    # Laplace(0, 1) by inverse CDF of u ~ U(-1/2, 1/2)
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator) - 0.5
    return -torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-12))


def image_statistics(images: Iterable[np.ndarray], space: ColorSpace = "lab") -> np.ndarray:
    """(N, 6) per-image channel means and stds in `space` for uint8 H×W×3 RGB arrays."""
    rows = []
    for image in images:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double() / 255.0
        mean, std = channel_stats(to_space(tensor, space))
        rows.append(torch.cat([mean[0], std[0]]).numpy())
    return np.stack(rows) if rows else np.zeros((0, 6))


def fit_stain_stats(
    images: Iterable[np.ndarray],
    space: ColorSpace = "lab",
    distribution: Distribution = "normal",
    *,
    gmm_components: int = 3,
    seed: int = 0,
) -> StainStats:
    """Fit the distribution of per-image channel statistics on uint8 H×W×3 RGB tiles."""
    stats = image_statistics(images, space)
    n = stats.shape[0]
    if n < 2:
        raise ValueError(f"fitting stain statistics needs at least 2 images, got {n}")
    if distribution == "gmm":
        from sklearn.mixture import GaussianMixture

        components = max(1, min(gmm_components, n // 2))
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(
            stats
        )
        params: dict[str, Any] = {
            "weights": gmm.weights_.tolist(),
            "means": gmm.means_.tolist(),
            "covariances": gmm.covariances_.tolist(),
        }
    else:
        means, stds = stats[:, :3], stats[:, 3:]
        if distribution == "normal":
            loc_m, scale_m = means.mean(0), means.std(0)
            loc_s, scale_s = stds.mean(0), stds.std(0)
        else:
            loc_m, loc_s = np.median(means, 0), np.median(stds, 0)
            scale_m, scale_s = np.abs(means - loc_m).mean(0), np.abs(stds - loc_s).mean(0)
        params = {
            "mean_loc": loc_m.tolist(),
            "mean_scale": scale_m.tolist(),
            "std_loc": loc_s.tolist(),
            "std_scale": scale_s.tolist(),
        }
    return StainStats(space=space, distribution=distribution, params=params, n_images=n)


# ------------------------------------------------------------------------------------ augmentations
def reinhard_transfer(values: Tensor, target_mean: Tensor, target_std: Tensor) -> Tensor:
    """Move each image's channel mean/std (any space) to the targets (B, 3); std floored as the reference."""
    mean, std = channel_stats(values)
    scale = target_std.to(values) / std.clamp(min=1e-4)
    return (values - mean[..., None, None]) * scale[..., None, None] + target_mean.to(values)[..., None, None]


def rand_stain(
    images: Tensor,
    stats: StainStats,
    generator: torch.Generator | None = None,
    std_hyper: float = RANDSTAINNA_STD_HYPER,
) -> Tensor:
    """RandStainNA on float RGB (B, 3, H, W) in [0, 1]: every image gets its own sampled virtual template,
    drawn with the fitted spread × (1 + std_hyper), as the reference's `scale=std * (1 + std_adjust)`."""
    extra = dict(stats.extra)
    extra["std_hyper"] = std_hyper
    sampler = StainStats(stats.space, stats.distribution, stats.params, stats.n_images, extra)
    target_mean, target_std = sampler.sample(images.shape[0], generator)
    values = to_space(images, stats.space)
    return from_space(reinhard_transfer(values, target_mean, target_std), stats.space).to(images.dtype)


def hed_jitter(images: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Tellez HED jitter of float RGB (B, 3, H, W) in [0, 1] with per-sample, per-stain factors (B, 3):
    each stain's optical density becomes od · alpha + beta. The one implementation every command uses
    (pretraining views, `evaluate finetune`, `segment train`).

    Unit convention: beta is in optical density, OD = −ln(I) for intensity I in (0, 1], as Tellez et al.'s
    "HED-light" bound 0.05. `rgb_to_hed` works in skimage's units (OD / −ln(1e-6) = OD / 13.8), so beta is
    divided by `OD_PER_HED_UNIT` here and nowhere else; alpha is a unitless factor.
    """
    hed = rgb_to_hed(images, clip=False)
    shift = beta.to(hed) / OD_PER_HED_UNIT
    hed = hed * alpha.to(hed)[..., None, None] + shift[..., None, None]
    return hed_to_rgb(hed).to(images.dtype)


def hed_jitter_image(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """`hed_jitter` of one uint8 H×W×3 image with alpha ~ U(1 − σ, 1 + σ) and beta ~ U(−σ, σ) in optical density
    per stain, drawn from `rng` (alpha first), for per-sample pipelines such as segmentation patches."""
    alpha = torch.from_numpy(rng.uniform(1 - sigma, 1 + sigma, (1, 3)))
    beta = torch.from_numpy(rng.uniform(-sigma, sigma, (1, 3)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
    # One patch is far too small for intra-op threads: with workers=0 on a busy machine their start-up cost
    # was ~25x the work itself (60 ms vs 2.5 ms per 96 px patch). DataLoader workers already run 1 thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rgb = hed_jitter(x, alpha, beta)[0].permute(1, 2, 0).numpy()
    finally:
        torch.set_num_threads(threads)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
