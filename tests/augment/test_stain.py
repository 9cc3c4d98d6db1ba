"""Colour conversions against skimage, RandStainNA by its definition, fitting against numpy, HED jitter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2hsv, rgb2lab

from pathssl_cli.augment import color_spaces, stain
from pathssl_cli.augment.stain import StainStats, fit_stain_stats


def _rgb(batch: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(
        batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _he_like(n: int, size: int = 16, seed: int = 0, noise: tuple[float, float] = (5, 25)) -> list[np.ndarray]:
    """Pink/purple tiles with per-tile stain strength: uint8 H×W×3 as the data stream gives them."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        base = np.array([200, 120, 180]) + rng.normal(0, 15, 3)
        pixels = base + rng.normal(0, rng.uniform(*noise), (size, size, 3))
        tiles.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return tiles


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_lab_matches_skimage_both_ways() -> None:
    x = _rgb()
    torch.testing.assert_close(color_spaces.rgb_to_lab(x), _nchw(rgb2lab(_nhwc(x))), atol=1e-9, rtol=0)
    lab = _nchw(rgb2lab(_nhwc(x)))
    torch.testing.assert_close(color_spaces.lab_to_rgb(lab), _nchw(lab2rgb(_nhwc(lab))), atol=1e-9, rtol=0)
    torch.testing.assert_close(color_spaces.lab_to_rgb(color_spaces.rgb_to_lab(x)), x, atol=1e-9, rtol=0)


def test_hed_matches_skimage_and_unclipped_round_trip() -> None:
    x = _rgb()
    hed = _nchw(rgb2hed(_nhwc(x)))
    torch.testing.assert_close(color_spaces.rgb_to_hed(x), hed, atol=1e-12, rtol=0)
    torch.testing.assert_close(color_spaces.hed_to_rgb(hed), _nchw(hed2rgb(_nhwc(hed))), atol=1e-12, rtol=0)
    # unclipped densities invert exactly, also for pixels outside the H-E-DAB gamut
    torch.testing.assert_close(
        color_spaces.hed_to_rgb(color_spaces.rgb_to_hed(x.clamp(min=1e-6), clip=False)),
        x.clamp(min=1e-6),
        atol=1e-9,
        rtol=0,
    )


def test_hsv_space_round_trips() -> None:
    x = _rgb()
    hsv = color_spaces.to_space(x, "hsv")
    torch.testing.assert_close(hsv, _nchw(rgb2hsv(_nhwc(x))), atol=1e-9, rtol=0)
    torch.testing.assert_close(color_spaces.from_space(hsv, "hsv"), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("space", ["lab", "hsv", "hed"])
def test_reinhard_transfer_hits_the_target_statistics(space: str) -> None:
    values = color_spaces.to_space(_rgb(), space)
    target_mean = torch.tensor([[50.0, 3.0, -2.0], [0.4, 0.3, 0.7], [0.1, 0.2, 0.0]], dtype=torch.float64)
    target_std = torch.tensor([[9.0, 4.0, 5.0], [0.1, 0.05, 0.2], [0.03, 0.02, 0.01]], dtype=torch.float64)
    out = stain.reinhard_transfer(values, target_mean, target_std)
    flat = out.flatten(2).numpy()
    np.testing.assert_allclose(flat.mean(axis=2), target_mean.numpy(), atol=1e-9)
    np.testing.assert_allclose(flat.std(axis=2), target_std.numpy(), rtol=1e-9)


def test_rand_stain_moves_lab_statistics_to_the_sampled_template() -> None:
    # mild tiles: their sampled templates stay inside the sRGB gamut, so clipping barely interferes
    tiles = _he_like(6, size=32, noise=(3, 8))
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).double() / 255
    stats = fit_stain_stats(_he_like(40, seed=1, noise=(3, 8)), "lab", "normal")
    out = stain.rand_stain(x, stats, torch.Generator().manual_seed(7), std_hyper=0.0)  # the fitted spread
    target_mean, target_std = stats.sample(6, torch.Generator().manual_seed(7))  # the same draws
    lab = rgb2lab(_nhwc(out)).reshape(6, -1, 3)  # measured independently with skimage
    # in-gamut templates: only float rounding and rare clipped pixels separate output from target
    np.testing.assert_allclose(lab.mean(axis=1), target_mean.numpy(), atol=0.05)
    np.testing.assert_allclose(lab.std(axis=1), target_std.numpy(), rtol=0.01, atol=0.05)


def test_fit_normal_and_laplace_match_numpy_on_skimage_statistics() -> None:
    tiles = _he_like(30)
    per_image = []
    for tile in tiles:  # reference statistics computed with skimage + numpy only
        lab = rgb2lab(tile).reshape(-1, 3)
        per_image.append(np.concatenate([lab.mean(0), lab.std(0)]))
    reference = np.array(per_image)
    normal = fit_stain_stats(tiles, "lab", "normal")
    np.testing.assert_allclose(normal.params["mean_loc"], reference[:, :3].mean(0), rtol=1e-9)
    np.testing.assert_allclose(normal.params["mean_scale"], reference[:, :3].std(0), rtol=1e-6)
    np.testing.assert_allclose(normal.params["std_loc"], reference[:, 3:].mean(0), rtol=1e-9)
    np.testing.assert_allclose(normal.params["std_scale"], reference[:, 3:].std(0), rtol=1e-6)
    laplace = fit_stain_stats(tiles, "lab", "laplace")
    median = np.median(reference, axis=0)
    np.testing.assert_allclose(laplace.params["mean_loc"], median[:3], rtol=1e-9)
    np.testing.assert_allclose(
        laplace.params["std_scale"], np.abs(reference[:, 3:] - median[3:]).mean(0), rtol=1e-6
    )
    assert normal.n_images == 30


def test_gmm_with_one_component_is_the_sample_gaussian() -> None:
    tiles = _he_like(40)
    stats = fit_stain_stats(tiles, "hed", "gmm", gmm_components=1)
    reference = stain.image_statistics(tiles, "hed")
    np.testing.assert_allclose(stats.params["weights"], [1.0])
    np.testing.assert_allclose(stats.params["means"][0], reference.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.params["covariances"][0], np.cov(reference.T, bias=True), atol=1e-5)


@pytest.mark.parametrize("distribution", ["normal", "laplace"])
def test_sampling_follows_the_fitted_distribution(distribution: str) -> None:
    params = {
        "mean_loc": [60.0, 10.0, -5.0],
        "mean_scale": [4.0, 2.0, 1.0],
        "std_loc": [12.0, 5.0, 6.0],
        "std_scale": [1.0, 0.5, 0.5],
    }
    stats = StainStats("lab", distribution, params)  # type: ignore[arg-type]
    means, stds = stats.sample(40_000, torch.Generator().manual_seed(0))
    means_np, stds_np = means.numpy(), stds.numpy()
    if distribution == "normal":
        np.testing.assert_allclose(means_np.mean(0), params["mean_loc"], atol=0.1)
        np.testing.assert_allclose(means_np.std(0), params["mean_scale"], rtol=0.03)
    else:  # Laplace(loc, b): median = loc, mean |x - loc| = b
        np.testing.assert_allclose(np.median(means_np, 0), params["mean_loc"], atol=0.1)
        np.testing.assert_allclose(
            np.abs(means_np - params["mean_loc"]).mean(0), params["mean_scale"], rtol=0.03
        )
    np.testing.assert_allclose(np.median(stds_np, 0), params["std_loc"], atol=0.05)
    assert (stds_np > 0).all()


def test_stats_save_load_round_trip(tmp_path: Path) -> None:
    stats = fit_stain_stats(_he_like(10), "hsv", "gmm", gmm_components=2)
    stats.save(tmp_path / "stain.json")
    loaded = StainStats.load(tmp_path / "stain.json")
    assert loaded == stats
    a = loaded.sample(5, torch.Generator().manual_seed(1))
    b = stats.sample(5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_hed_jitter_identity_and_haematoxylin_shift() -> None:
    x = _rgb().clamp(0.05, 0.95)
    ones, zeros = torch.ones(3, 3), torch.zeros(3, 3)
    torch.testing.assert_close(stain.hed_jitter(x, ones, zeros), x, atol=1e-9, rtol=0)
    beta = torch.tensor([[0.02, 0.0, 0.0]] * 3)  # optical density (-ln I)
    out = stain.hed_jitter(x, ones, beta)
    shift = color_spaces.rgb_to_hed(out, clip=False) - color_spaces.rgb_to_hed(x, clip=False)
    unclipped = ((out > 0) & (out < 1)).all(dim=1)  # pixels where the RGB clip did not interfere
    assert unclipped.float().mean() > 0.5
    expected = 0.02 / -np.log(1e-6)  # rgb_to_hed (skimage) units are OD / -ln(1e-6)
    torch.testing.assert_close(
        shift[:, 0][unclipped], torch.full_like(shift[:, 0][unclipped], expected), atol=1e-9, rtol=0
    )
    assert shift[:, 1:].permute(1, 0, 2, 3)[:, unclipped].abs().max() < 1e-9


def test_std_hyper_widens_every_distribution() -> None:
    params = {
        "mean_loc": [60.0, 10.0, -5.0],
        "mean_scale": [4.0, 2.0, 1.0],
        "std_loc": [12.0, 5.0, 6.0],
        "std_scale": [1.0, 0.5, 0.5],
    }
    gmm = {
        "weights": [1.0],
        "means": [[60.0, 10.0, -5.0, 12.0, 5.0, 6.0]],
        "covariances": [np.diag([16.0, 4.0, 1.0, 1.0, 0.25, 0.25]).tolist()],
    }
    for distribution, p in (("normal", params), ("laplace", params), ("gmm", gmm)):
        plain = StainStats("lab", distribution, p).sample(20_000, torch.Generator().manual_seed(0))[0]  # type: ignore[arg-type]
        wide = StainStats("lab", distribution, p, extra={"std_hyper": 1.0}).sample(  # type: ignore[arg-type]
            20_000, torch.Generator().manual_seed(0)
        )[0]
        np.testing.assert_allclose(wide.std(0).numpy() / plain.std(0).numpy(), 2.0, rtol=1e-6)


def test_uint8_lab_matches_skimage_and_image_by_image_matches_one_image() -> None:
    # uint8 tiles take the 256-entry lookup table for the sRGB curve; skimage converts the same bytes in float64
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    tiles[0, :4] = 0  # near-black pixels take the linear branches of both curves
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    lab = color_spaces.rgb_to_lab(batch)
    assert lab.dtype == torch.float32
    expected = _nchw(rgb2lab(tiles))
    torch.testing.assert_close(lab.double(), expected, atol=2e-4, rtol=0)
    # the CPU conversions loop over images: each row must be what a one-image call gives
    for i in range(3):
        torch.testing.assert_close(lab[i : i + 1], color_spaces.rgb_to_lab(batch[i : i + 1]), atol=0, rtol=0)
    back = color_spaces.lab_to_rgb(expected)
    torch.testing.assert_close(back, _nchw(lab2rgb(_nhwc(expected))), atol=1e-9, rtol=0)
    torch.testing.assert_close(back[2:], color_spaces.lab_to_rgb(expected[2:]), atol=0, rtol=0)


def test_hed_jitter_offset_is_in_optical_density() -> None:
    # a pure haematoxylin offset β (OD = -ln I) multiplies each RGB intensity by exp(-β · rgb_from_hed[H])
    x = torch.full((1, 3, 2, 2), 0.8, dtype=torch.float64)
    beta = torch.tensor([[0.1, 0.0, 0.0]], dtype=torch.float64)
    out = stain.hed_jitter(x, torch.ones(1, 3, dtype=torch.float64), beta)
    expected = 0.8 * np.exp(-0.1 * np.array([0.65, 0.70, 0.29]))  # skimage.color.rgb_from_hed[0]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), expected, rtol=1e-9)


class _FixedDraws:
    """Stands in for np.random.Generator: returns the given arrays from uniform(), in order."""

    def __init__(self, *draws: np.ndarray) -> None:
        self.draws = list(draws)

    def uniform(self, low: float, high: float, size: tuple[int, ...]) -> np.ndarray:
        value = self.draws.pop(0)
        assert value.shape == size and (low <= value).all() and (value <= high).all()
        return value


def test_segmentation_jitter_equals_the_pretraining_and_finetuning_op_for_the_same_beta() -> None:
    """segment train once passed β in skimage's rgb2hed units (13.8x stronger); now every command runs
    `hed_jitter` with β in optical density."""
    from pathssl_cli.segment import patches

    image = (_rgb(1, 16, seed=4)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    alpha, beta = np.array([[1.03, 0.97, 1.01]]), np.array([[0.04, -0.03, 0.05]])
    assert patches.hed_jitter_image is stain.hed_jitter_image  # no private copy in segment/
    segmented = stain.hed_jitter_image(image, 0.05, _FixedDraws(alpha, beta))  # type: ignore[arg-type]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    shared = stain.hed_jitter(x, torch.from_numpy(alpha), torch.from_numpy(beta))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(segmented, np.clip(shared * 255 + 0.5, 0, 255).astype(np.uint8))


def test_glass_stays_near_glass_at_the_shipped_segmentation_strength() -> None:
    from pathssl_cli.segment.datasets import NucleiSample, NucleiSource
    from pathssl_cli.segment.patches import AugmentConfig, HoVerNetPatches
    from pathssl_cli.specs.segment import SegmentTrain

    glass = np.array([242, 237, 242], dtype=np.uint8)

    class Glass(NucleiSource):
        names, num_types = ["g"], 0

        def size(self, index: int) -> tuple[int, int]:
            return 32, 32

        def load(self, index: int) -> NucleiSample:
            return NucleiSample("g", np.tile(glass, (32, 32, 1)), np.zeros((32, 32), np.int32), None)

    strength = SegmentTrain.model_fields["stain"].default
    assert strength == pytest.approx(0.05)  # Tellez's HED-light, as evaluate's hed_sigma
    patches = HoVerNetPatches([Glass()], 32, 32, train=True, augment=AugmentConfig(stain=strength))
    changes = []
    for epoch in range(24):
        patches.set_epoch(epoch)
        changes.append((patches[0]["image"].numpy() * 255 - glass[:, None, None]).__abs__().max())
    # the worst corner (α = 1.05, β = +0.05 OD on all three stains) moves glass by 26 levels; β in rgb2hed
    # units turned it to (155, 146, 198) and worse
    assert 0 < max(changes) <= 27
    assert np.mean(changes) < 15


def test_randstainna_std_hyper_defaults_to_the_reference_usage() -> None:
    from pathssl_cli.augment.recipes import recipe_for

    assert recipe_for("dino", "pathology").stain.std_hyper == pytest.approx(-0.3)  # RandStainNA main.py
    stats = fit_stain_stats([(_rgb(1, 16, seed=s)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                             for s in range(8)], "lab", "normal")
    x = _rgb(4, 16, seed=9)
    default = stain.rand_stain(x, stats, torch.Generator().manual_seed(0))
    torch.testing.assert_close(default, stain.rand_stain(x, stats, torch.Generator().manual_seed(0), -0.3))
    assert not torch.allclose(default, stain.rand_stain(x, stats, torch.Generator().manual_seed(0), 0.0))


def test_pathology_preset_is_randstainna_gmm_for_every_method() -> None:
    """Kang et al.'s stain technique is RandStainNA with a Gaussian mixture; the preset drew from one Gaussian."""
    from pathssl_cli.augment.recipes import METHODS, recipe_for

    for method in METHODS:
        pathology = recipe_for(method, "pathology").stain
        assert (pathology.p, pathology.space, pathology.distribution) == (0.8, "lab", "gmm"), method
        assert recipe_for(method, "original").stain.p == 0.0
        overridden = recipe_for(method, "pathology", stain={"distribution": "normal"}).stain
        assert overridden.distribution == "normal" and overridden.p == 0.8


def test_gmm_templates_follow_the_mixture_moments() -> None:
    """Sampled templates have the mixture's mean and covariance (worked out from the parameters in numpy:
    E = Σ w μ, Cov = Σ w (Σ_k + μ_k μ_kᵀ) − E Eᵀ), including its correlations between channels."""
    weights = np.array([0.2, 0.5, 0.3])
    means = np.array([[60.0, 15, -10, 12, 4, 3], [70, 10, -5, 10, 5, 4], [80, 5, 0, 8, 6, 5]])
    rng = np.random.default_rng(0)
    covs = []
    for _ in range(3):
        a = rng.normal(0, 0.6, (6, 6))
        covs.append(a @ a.T + 0.05 * np.eye(6))
    covs = np.stack(covs)
    stats = StainStats("lab", "gmm", {"weights": weights.tolist(), "means": means.tolist(),
                                      "covariances": covs.tolist()})
    target_mean, target_std = stats.sample(400_000, torch.Generator().manual_seed(1))
    samples = torch.cat([target_mean, target_std], dim=1).numpy()
    expected_mean = (weights[:, None] * means).sum(0)
    second = sum(w * (c + np.outer(m, m)) for w, m, c in zip(weights, means, covs, strict=True))
    expected_cov = second - np.outer(expected_mean, expected_mean)
    np.testing.assert_allclose(samples.mean(0), expected_mean, atol=0.05)
    np.testing.assert_allclose(np.cov(samples, rowvar=False), expected_cov, atol=0.6)


def test_gmm_fit_recovers_separated_staining_batches() -> None:
    """Two staining batches with distinct LAB statistics: a 2-component fit puts one component on each."""
    pale = _he_like(30, seed=3, noise=(3, 6))
    dark = [np.clip(t.astype(np.int16) - 60, 0, 255).astype(np.uint8) for t in _he_like(30, seed=4, noise=(3, 6))]
    stats = fit_stain_stats(pale + dark, "lab", "gmm", gmm_components=2, seed=0)
    lightness = sorted(m[0] for m in stats.params["means"])
    reference = stain.image_statistics(pale + dark, "lab")
    np.testing.assert_allclose(lightness, sorted([reference[30:, 0].mean(), reference[:30, 0].mean()]), atol=0.5)
    np.testing.assert_allclose(sorted(stats.params["weights"]), [0.5, 0.5], atol=1e-6)
