"""Synthetic H&E data: truth maps are consistent, textures are distinct, slides read back right."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tiffslide

from pathssl_cli import synthetic
from pathssl_cli.synthetic import (
    NUCLEUS_TYPES,
    TEXTURES,
    labelled_tiles,
    render_tissue,
    write_image_folder,
)
from pathssl_cli.synthetic_slide import write_synthetic_slide


@pytest.mark.parametrize("texture", TEXTURES)
def test_render_tissue_truth_maps_are_consistent(texture: str) -> None:
    rgb, inst, types = render_tissue(np.random.default_rng(3), 96, 80, texture, mpp=0.5)
    assert rgb.shape == (96, 80, 3) and rgb.dtype == np.uint8
    assert inst.shape == types.shape == (96, 80) and inst.dtype == np.int32 and types.dtype == np.uint8
    ids = np.unique(inst[inst > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # ids 1..N, none missing
    np.testing.assert_array_equal(types > 0, inst > 0)  # a type exactly where there is a nucleus
    for i in ids:  # one type per instance, within 1..K
        assert len(np.unique(types[inst == i])) == 1
    assert types.max() <= len(NUCLEUS_TYPES)


def test_types_follow_texture() -> None:
    rng = np.random.default_rng(0)
    _, inst, types = render_tissue(rng, 128, 128, "lymphocytes")
    assert inst.max() > 10 and set(np.unique(types[inst > 0])) == {NUCLEUS_TYPES.index("inflammatory") + 1}
    _, inst, types = render_tissue(rng, 128, 128, "tumour")
    values, counts = np.unique(types[inst > 0], return_counts=True)
    assert values[counts.argmax()] == NUCLEUS_TYPES.index("neoplastic") + 1


def test_nuclei_keep_their_physical_size() -> None:
    # Same tissue at half the µm/px: each nucleus covers about 4x the pixels.
    def mean_area(mpp: float) -> float:
        areas = []
        for seed in range(6):
            _, inst, _ = render_tissue(np.random.default_rng(seed), 160, 160, "lymphocytes", mpp)
            areas += list(np.bincount(inst.ravel())[1:])
        return float(np.median(areas))

    assert 3.0 < mean_area(0.25) / mean_area(0.5) < 5.0


def test_nuclei_are_haematoxylin_dark_and_blue() -> None:
    rgb, inst, _ = render_tissue(np.random.default_rng(1), 128, 128, "tumour")
    nuc = rgb[inst > 0].astype(float).mean(0)
    rest = rgb[inst == 0].astype(float).mean(0)
    assert nuc.sum() < rest.sum() - 60  # darker
    assert nuc[2] > nuc[0]  # blue-purple: more blue than red
    assert rest[0] > rest[1]  # eosin pink: more red than green


def test_textures_are_separable_by_simple_features() -> None:
    # A nearest-centroid classifier on colour statistics must tell the textures apart, so an SSL
    # model has signal to learn; features computed independently of the generator's parameters.
    def features(images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1, 3).astype(np.float32)
        dark = (x.sum(-1) < 400).mean(1, keepdims=True)
        return np.concatenate([x.mean(1) / 255, x.std(1) / 64, dark * 4], 1)

    train, y_train = labelled_tiles(8, 64, seed=0)
    test, y_test = labelled_tiles(8, 64, seed=1)
    f_train, f_test = features(train), features(test)
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(len(TEXTURES))])
    pred = ((f_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y_test).mean() >= 0.9


def test_labelled_tiles_are_seeded_and_class_major() -> None:
    a, la = labelled_tiles(2, 32, seed=5)
    b, _lb = labelled_tiles(2, 32, seed=5)
    c, _ = labelled_tiles(2, 32, seed=6)
    assert a.shape == (2 * len(TEXTURES), 32, 32, 3)
    np.testing.assert_array_equal(la, np.repeat(np.arange(len(TEXTURES)), 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_write_image_folder_layout(tmp_path, image_format: str) -> None:
    root = write_image_folder(
        tmp_path / "ds", 2, 32, seed=0, splits=("train", "val"), image_format=image_format
    )
    for split in ("train", "val"):
        for texture in TEXTURES:
            files = sorted((root / split / texture).glob(f"*.{image_format}"))
            assert len(files) == 2
            assert cv2.imread(str(files[0])).shape == (32, 32, 3)
    train = cv2.imread(str(next((root / "train" / "tumour").iterdir())))
    val = cv2.imread(str(next((root / "val" / "tumour").iterdir())))
    assert not np.array_equal(train, val)


def test_synthetic_slide_reads_back_with_pyramid_and_mpp(tmp_path) -> None:
    truth = write_synthetic_slide(tmp_path / "s.tif", width=1100, height=900, mpp=0.25, tile_size=128, seed=2)
    slide = tiffslide.TiffSlide(truth.path)
    assert slide.dimensions == (1100, 900)
    assert slide.level_dimensions == ((1100, 900), (550, 450), (275, 225))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.properties["tiffslide.level[0].tile-width"] == 128
    # Level 1 is level 0 area-downsampled by 2 (JPEG on both sides, hence the tolerance).
    level0 = np.asarray(slide.read_region((0, 0), 0, (1100, 900)).convert("RGB")).astype(np.float32)
    level1 = np.asarray(slide.read_region((0, 0), 1, (550, 450)).convert("RGB")).astype(np.float32)
    expected = cv2.resize(level0, (550, 450), interpolation=cv2.INTER_AREA)
    assert np.abs(level1 - expected).mean() < 3.0
    # The truth mask marks the stained pixels: background is near-white, tissue is not (except
    # inside fat cells, which are white in real slides too).
    mask = truth.mask_resized(550, 450)
    textures = cv2.resize(truth.texture_map, (550, 450), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(textures > 0, mask)
    saturation = cv2.cvtColor(level1.astype(np.uint8), cv2.COLOR_RGB2HSV)[..., 1]
    not_fat = textures != TEXTURES.index("adipose") + 1
    agree = ((saturation > 20) == mask)[not_fat].mean()
    assert 0.2 < mask.mean() < 0.8 and agree > 0.95


def test_synthetic_slide_without_mpp(tmp_path) -> None:
    truth = write_synthetic_slide(
        tmp_path / "n.tif", width=300, height=260, tile_size=128, n_levels=1, write_mpp=False
    )
    slide = tiffslide.TiffSlide(truth.path)
    assert slide.properties["tiffslide.mpp-x"] is None and slide.level_count == 1
    assert not truth.mpp_written and not list(tmp_path.glob(".*"))  # no temporary files left


def test_pixel_noise_bank_shapes() -> None:
    rng = np.random.default_rng(0)
    assert synthetic._pixel_noise(rng, 7, 9, 1).shape == (7, 9, 1)
    assert synthetic._pixel_noise(rng, 600, 3, 3).shape == (600, 3, 3)
