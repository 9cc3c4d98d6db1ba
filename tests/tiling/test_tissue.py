"""Tissue detection against a known mask, and tissue fractions against brute force."""

from __future__ import annotations

import numpy as np

from pathssl_cli.tiling.slide import open_slide
from pathssl_cli.tiling.tissue import TissueMask, detect_tissue, tissue_mask


def test_tissue_mask_matches_truth(synthetic_slide) -> None:
    for truth in (synthetic_slide,):
        found = tissue_mask(open_slide(truth.path), truth.mpp)
        h, w = found.mask.shape
        expected = truth.mask_resized(w, h)
        iou = (expected & found.mask).sum() / (expected | found.mask).sum()
        assert iou >= 0.9, f"{truth.path.name}: IoU {iou:.3f}"
        assert found.scale * w == truth.width


def test_blank_glass_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(240, 2, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass, 4.0).any()


def test_holes_are_filled_and_specks_dropped() -> None:
    image = np.full((200, 200, 3), 240, np.uint8)
    image[40:160, 40:160] = (200, 120, 180)  # tissue 480 µm square at 4 µm/px
    image[80:120, 80:120] = 245  # a lumen inside: a hole to fill
    image[5:8, 190:193] = (200, 120, 180)  # 12 µm speck: below the minimum area
    mask = detect_tissue(image, 4.0)
    assert mask[100, 100] and mask[50, 50] and not mask[6, 191] and not mask[10, 10]


def test_fraction_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((40, 60)) > 0.5
    tm = TissueMask(mask, scale=8.0, thumbnail=np.zeros((40, 60, 3), np.uint8))
    for _ in range(50):
        # rectangles aligned to mask pixels (in level-0 px) so the reference is an exact mean
        x0, y0 = int(rng.integers(0, 50)), int(rng.integers(0, 30))
        w, h = int(rng.integers(1, 60 - x0)), int(rng.integers(1, 40 - y0))
        expected = mask[y0 : y0 + h, x0 : x0 + w].mean()
        assert abs(tm.fraction(x0 * 8, y0 * 8, w * 8, h * 8) - expected) < 1e-12
    assert tm.fraction(-1000, -1000, 10, 10) == 0.0


def test_grid_fractions_equal_scalar_fractions() -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((30, 50)) > 0.4
    tm = TissueMask(mask, scale=7.3, thumbnail=np.zeros((30, 50, 3), np.uint8))
    xs = np.array([-100, 0, 13, 200, 355, 364, 400])
    ys = np.array([-60, 0, 41, 150, 210, 219])
    grid = tm.grid_fractions(xs, ys, 33.5)
    expected = np.array([[tm.fraction(x, y, 33.5, 33.5) for x in xs] for y in ys])
    np.testing.assert_allclose(grid, expected, atol=1e-12)


def test_mask_resolution_is_capped_for_huge_slides(monkeypatch) -> None:
    # A 200 mm slide at 0.25 µm/px would give a 50000 px mask at 4 µm/px; the cap keeps it at 4096.
    from pathssl_cli.tiling import tissue

    asked = {}

    def fake_thumbnail(slide, base_mpp, target_mpp):
        asked["mpp"] = target_mpp
        return np.full((8, 8, 3), 240, np.uint8), 1.0

    class Huge:
        dimensions = (800_000, 400_000)

    monkeypatch.setattr(tissue, "slide_thumbnail", fake_thumbnail)
    tissue.tissue_mask(Huge(), 0.25)
    assert asked["mpp"] == 800_000 * 0.25 / tissue.MASK_MAX_SIDE
