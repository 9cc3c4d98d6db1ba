"""View recipes (official values, pathology preset) and batched view generation (shapes, determinism, ops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from pydantic import ValidationError
from torchvision.transforms import InterpolationMode

from pathssl_cli.augment import crops
from pathssl_cli.augment.recipes import METHODS, recipe_for
from pathssl_cli.augment.stain import fit_stain_stats
from pathssl_cli.augment.views import BatchViews

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(n: int = 4, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _stats():
    tiles = [img.permute(1, 2, 0).numpy() for img in _batch(8, 16, seed=5)]
    return fit_stain_stats(tiles, "lab", "normal")


# values typed from the official code (main_moco.py, multicropdataset.py/README, barlowtwins main.py,
# main_dino.py)
OFFICIAL = {
    "mocov2": dict(
        n_local=0,
        global_scale=(0.2, 1.0),
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        blur_p=[0.5],
        solarize_p=[0.0],
        interpolation="bilinear",
    ),
    "swav": dict(
        n_local=6,
        global_scale=(0.14, 1.0),
        local_scale=(0.05, 0.14),
        brightness=0.8,
        contrast=0.8,
        saturation=0.8,
        hue=0.2,
        blur_p=[0.5],
        local_blur_p=0.5,
        interpolation="bilinear",
    ),
    "barlow_twins": dict(
        n_local=0,
        global_scale=(0.08, 1.0),
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        blur_p=[1.0, 0.1],
        solarize_p=[0.0, 0.2],
        interpolation="bicubic",
    ),
    "dino": dict(
        n_local=10,
        global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4),
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        blur_p=[1.0, 0.1],
        local_blur_p=0.5,
        solarize_p=[0.0, 0.2],
        interpolation="bicubic",
    ),
    # dinov2/data/augmentations.py DataAugmentationDINO with ssl_default_config.yaml's crops. Its GaussianBlur
    # is a RandomApply with keep_p = 1 - p (dinov2/data/transforms.py), so the p=1.0 / 0.1 / 0.5 it is given
    # blur the first global crop never, the second 90% of the time and local crops half of the time.
    "dinov2": dict(
        n_local=8,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        blur_p=[0.0, 0.9],
        local_blur_p=0.5,
        blur_kernel=9,
        solarize_p=[0.0, 0.2],
        interpolation="bicubic",
    ),
}


@pytest.mark.parametrize("method", METHODS)
def test_original_recipes_are_the_official_ones(method: str) -> None:
    recipe = recipe_for(method, "original")
    for name, value in OFFICIAL[method].items():
        assert getattr(recipe, name) == value, name
    assert recipe.n_global == 2 and recipe.global_size == 224 and recipe.local_size == 96
    assert recipe.jitter_p == 0.8 and recipe.grayscale_p == 0.2 and recipe.hflip == 0.5
    assert recipe.vflip == 0.0 and recipe.stain.p == 0.0 and recipe.hed_jitter.p == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_pathology_preset_adds_the_papers_techniques(method: str) -> None:
    original, pathology = recipe_for(method, "original"), recipe_for(method, "pathology")
    assert pathology.vflip == 0.5 and pathology.stain.p > 0
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert getattr(pathology, name) == pytest.approx(getattr(original, name) / 2)
    assert pathology.n_local == original.n_local and pathology.blur_p == original.blur_p


def test_overrides_merge_into_nested_options_and_are_validated() -> None:
    recipe = recipe_for("dino", "pathology", n_local=2, stain={"space": "hed"})
    assert recipe.n_local == 2 and recipe.stain.space == "hed" and recipe.stain.p == 0.8
    with pytest.raises(ValidationError):
        recipe_for("dino", "original", blur_kernel=4)
    with pytest.raises(ValidationError):
        recipe_for("dino", "original", brightnes=0.3)  # typo: extra fields are forbidden
    with pytest.raises(ValueError, match="known"):
        recipe_for("simclr", "original")


@pytest.mark.parametrize("preset", ["original", "pathology"])
@pytest.mark.parametrize("method", METHODS)
def test_view_shapes_counts_and_order(method: str, preset: str) -> None:
    recipe = recipe_for(method, preset, global_size=32, local_size=16)
    views = BatchViews(recipe, MEAN, STD, stain=_stats())(_batch(), torch.Generator().manual_seed(0))
    assert len(views) == recipe.n_global + recipe.n_local
    shapes = [tuple(v.shape) for v in views]
    assert shapes == [(4, 3, 32, 32)] * recipe.n_global + [(4, 3, 16, 16)] * recipe.n_local
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_views_are_deterministic_for_a_generator_state() -> None:
    recipe = recipe_for("dino", "pathology", global_size=32, local_size=16, n_local=3, hed_jitter={"p": 0.5})
    make = BatchViews(recipe, MEAN, STD, stain=_stats())
    images = _batch()
    first = make(images, torch.Generator().manual_seed(3))
    second = make(images, torch.Generator().manual_seed(3))
    other = make(images, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_fully_determined_view_equals_torchvision_per_image() -> None:
    # every probability 0 or 1 and no random colour factors: the view is fixed by the crop boxes alone
    recipe = recipe_for(
        "barlow_twins",
        "original",
        n_global=1,
        global_size=24,
        jitter_p=0.0,
        grayscale_p=1.0,
        blur_p=[1.0],
        blur_sigma=(1.5, 1.5),
        blur_kernel=5,
        solarize_p=[1.0],
        hflip=1.0,
        vflip=1.0,
    )
    images = _batch()
    (view,) = BatchViews(recipe, MEAN, STD)(images, torch.Generator().manual_seed(9))
    boxes = crops.random_resized_crop_boxes(
        4, 48, 48, recipe.global_scale, recipe.ratio, torch.Generator().manual_seed(9)
    )  # the first draws of the same seed
    for b in range(4):
        top, left, h, w = boxes[b].tolist()
        # the uint8 crop, then floats: as PIL's RandomResizedCrop → ToTensor in the official recipes
        x = TF.resized_crop(images[b], top, left, h, w, [24, 24], interpolation=InterpolationMode.BICUBIC)
        x = TF.to_dtype(x, torch.float32, scale=True)
        x = TF.vertical_flip(TF.horizontal_flip(x))
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
        x = TF.gaussian_blur(x, [5, 5], [1.5, 1.5])
        x = TF.normalize(TF.solarize(x, 128 / 255), MEAN, STD)
        torch.testing.assert_close(view[b], x, atol=1e-5, rtol=0)


def test_probabilities_are_respected() -> None:
    # solarised pixels of a dark image become bright: count solarised views over many samples
    recipe = recipe_for(
        "barlow_twins",
        "original",
        n_global=2,
        global_size=8,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=[0.0],
        solarize_p=[0.0, 0.3],
    )
    images = torch.full((4000, 3, 12, 12), 200, dtype=torch.uint8)
    first, second = BatchViews(recipe, (0.0,) * 3, (1.0,) * 3)(images, torch.Generator().manual_seed(0))
    assert (first > 0.5).all()
    rate = (second.mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert abs(rate - 0.3) < 0.03


def test_stain_augmentation_needs_statistics_in_the_same_space() -> None:
    with pytest.raises(ValueError, match="stain statistics"):
        BatchViews(recipe_for("dino", "pathology"), MEAN, STD)
    hed_recipe = recipe_for("dino", "pathology", stain={"space": "hed"})
    with pytest.raises(ValueError, match="space"):
        BatchViews(hed_recipe, MEAN, STD, stain=_stats())
    with pytest.raises(ValueError, match="uint8"):
        BatchViews(recipe_for("dino", "original"), MEAN, STD)(torch.zeros(2, 3, 16, 16))


def test_stain_changes_colour_statistics_per_view() -> None:
    recipe = recipe_for(
        "mocov2",
        "pathology",
        global_size=16,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=[0.0],
        stain={"p": 1.0},
        hflip=0.0,
        vflip=0.0,
        global_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
    )
    images = _batch(size=16)
    a, b = BatchViews(recipe, (0.0,) * 3, (1.0,) * 3, stain=_stats())(
        images, torch.Generator().manual_seed(1)
    )
    # full-image crops with no other op: the two views differ only by their sampled stain templates
    assert not torch.allclose(a, b)
    assert np.isfinite(a.numpy()).all() and a.min() >= 0 and a.max() <= 1


def test_grayscale_views_stay_grey_through_normalisation() -> None:
    # every view grey and nothing after it: the in-place normalisation must not hit a broadcast tensor
    recipe = recipe_for(
        "dino",
        "original",
        grayscale_p=1.0,
        jitter_p=0.0,
        blur_p=[0.0],
        local_blur_p=0.0,
        solarize_p=[0.0],
        global_size=16,
        local_size=8,
        n_local=1,
    )
    views = BatchViews(recipe, (0.5,) * 3, (0.5,) * 3)(_batch(3, 20), torch.Generator().manual_seed(0))
    for view in views:
        assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])


@pytest.mark.parametrize("space", ["lab", "hed", "hsv"])
@pytest.mark.parametrize("tile_size", [24, 60])  # 24: one tile conversion shared by views; 60: per view
def test_full_tile_stained_views_have_the_template_statistics(space: str, tile_size: int) -> None:
    # a template distribution with zero spread: every stained view must carry exactly its loc statistics
    from pathssl_cli.augment.stain import StainStats, image_statistics

    tiles = [
        np.clip(
            np.array([190, 130, 175]) + np.random.default_rng(i).normal(0, 6, (tile_size, tile_size, 3)),
            0,
            255,
        ).astype(np.uint8)
        for i in range(4)
    ]
    fitted = image_statistics(tiles, space)
    template = fitted[0] * 0.98 + fitted[1] * 0.02  # near the tiles' own colours: in gamut, little clipping
    params = {
        "mean_loc": list(template[:3]),
        "mean_scale": [0.0] * 3,
        "std_loc": list(template[3:]),
        "std_scale": [0.0] * 3,
    }
    stats = StainStats(space, "normal", params)  # type: ignore[arg-type]
    recipe = recipe_for(
        "mocov2",
        "pathology",
        global_size=24,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=[0.0],
        hflip=0.0,
        vflip=0.0,
        global_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        stain={"p": 1.0, "space": space},
    )
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    views = BatchViews(recipe, (0.0,) * 3, (1.0,) * 3, stain=stats)(images, torch.Generator().manual_seed(0))
    for view in views:
        measured = image_statistics([v.permute(1, 2, 0).double().numpy() * 255 for v in view], space)
        np.testing.assert_allclose(measured, np.tile(template, (4, 1)), rtol=3e-3, atol=1e-3)


def test_hed_light_changes_colours_by_a_few_percent() -> None:
    # Tellez's HED-light (σ = b = 0.05, β in optical density) is a mild colour change, not a restaining
    base = dict(
        global_size=24,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=[0.0],
        solarize_p=[0.0],
        hflip=0.0,
        global_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
    )
    images = (
        torch.from_numpy(
            np.stack(
                [
                    np.clip(
                        np.array([190, 120, 175]) + np.random.default_rng(i).normal(0, 10, (24, 24, 3)),
                        0,
                        255,
                    )
                    for i in range(16)
                ]
            ).astype(np.uint8)
        )
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    plain = BatchViews(recipe_for("mocov2", "original", **base), (0.0,) * 3, (1.0,) * 3)
    jittered = BatchViews(
        recipe_for("mocov2", "original", hed_jitter={"p": 1.0}, **base), (0.0,) * 3, (1.0,) * 3
    )
    a = plain(images, torch.Generator().manual_seed(0))[0]
    b = jittered(images, torch.Generator().manual_seed(0))[0]
    change = (a - b).abs().mean(dim=(1, 2, 3))
    assert (change > 0.002).all() and (change < 0.06).all()


def test_cpu_chunking_is_a_split_of_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pathssl_cli.augment.views as views_module

    recipe = recipe_for("swav", "original", global_size=16, local_size=8, n_local=2)
    make = BatchViews(recipe, MEAN, STD)
    images = _batch(10, 20)
    monkeypatch.setattr(views_module, "_CPU_CHUNK_ELEMENTS", 4 * 3 * 20 * 20)  # chunks of 4 tiles
    chunked = make(images, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    parts = [make._views(part, generator) for part in images.split(4)]  # the same draws, chunk by chunk
    assert [tuple(v.shape) for v in chunked] == [(10, 3, 16, 16)] * 2 + [(10, 3, 8, 8)] * 2
    for index, view in enumerate(chunked):
        torch.testing.assert_close(view, torch.cat([p[index] for p in parts]), atol=0, rtol=0)
