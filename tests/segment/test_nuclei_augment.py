"""HoVer-Net's augmentations (pathssl_cli.augment.nuclei): maps move with the image, ids survive, ranges hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from pathssl_cli.augment import nuclei
from pathssl_cli.segment.datasets import NucleiSample, NucleiSource
from pathssl_cli.segment.patches import AugmentConfig, HoVerNetPatches
from pathssl_cli.segment.targets import hv_map


def _disc_scene(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes the instance id of each pixel, and its instance map (discs)."""
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    centres = [(30, 30), (30, 90), (64, 64), (95, 35), (100, 100)]
    for k, (cy, cx) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] = k
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = inst * 40
    image[..., 1] = 200
    return image, inst


def test_geometric_moves_maps_with_the_image_and_keeps_ids() -> None:
    image, inst = _disc_scene()
    types = (inst % 3 + (inst > 0)).astype(np.int32)  # a type per instance, a function of the id
    for seed in range(10):
        out, (inst2, types2) = nuclei.geometric(image, [inst, types], 64, np.random.default_rng(seed))
        assert out.shape == (64, 64, 3) and inst2.shape == types2.shape == (64, 64)
        ids = set(np.unique(inst2)) - {0}
        assert ids <= set(range(1, 6))  # nearest-neighbour: no new or blended ids
        # Both maps went through one warp: the type of every pixel is still the function of its id.
        np.testing.assert_array_equal(types2, (inst2 % 3 + (inst2 > 0)).astype(np.int32))
        for k in ids:  # the image moved with the map: nucleus k's interior carries nucleus k's colour
            interior = binary_erosion(inst2 == k, iterations=2)  # bilinear image vs nearest map at edges
            if interior.sum() < 10:  # a sliver cut by the crop
                continue
            assert np.median(out[..., 0][interior]) == pytest.approx(40 * k, abs=2)


def test_geometric_ranges() -> None:
    """Scale 0.8-1.2 per axis: a disc's area changes by at most 1.2^2, at least 0.8^2 (+- edge pixels);
    over many draws the rotation takes all orientations (a marked corner lands in all four quadrants)."""
    size = 128
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    inst[(yy - 64) ** 2 + (xx - 64) ** 2 <= 20**2] = 1
    inst[8:20, 84:96] = 2  # a marker up and to the right of the centre, inside the 64 px crop after warping
    area = (inst == 1).sum()
    quadrants = set()
    for seed in range(40):
        _, (warped,) = nuclei.geometric(np.zeros((size, size, 3), np.uint8), [inst], 96, np.random.default_rng(seed))
        assert 0.6 * area <= (warped == 1).sum() <= 1.5 * area
        ys, xs = np.nonzero(warped == 2)
        if len(ys):
            quadrants.add((bool(ys.mean() < 48), bool(xs.mean() < 48)))
    assert len(quadrants) == 4


def test_photometric_stays_in_range_and_changes_colour() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)
    outs = [nuclei.photometric(image.copy(), np.random.default_rng(s)) for s in range(20)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    means = np.array([o.mean() for o in outs])
    assert means.std() > 2  # brightness +-26, contrast, saturation: the images differ
    assert np.abs(means - image.mean()).max() < 60


def test_contrast_takes_effect() -> None:
    """Regression of the official add_to_contrast bug (it clips the input, a no-op): a contrast draw > 1
    spreads the values around the mean."""
    image = np.full((8, 8, 3), 100, np.uint8)
    image[:4] = 140
    out = nuclei._contrast(image, np.random.default_rng(1))
    value = np.random.default_rng(1).uniform(*nuclei.CONTRAST)
    expected = np.clip(image * value + image.mean(axis=(0, 1), keepdims=True) * (1 - value), 0, 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert not np.array_equal(out, image)


class _OneImage(NucleiSource):
    def __init__(self, image: np.ndarray, inst: np.ndarray) -> None:
        self.image, self.inst = image, inst
        self.names = ["scene"]
        self.num_types = 0

    def size(self, index: int) -> tuple[int, int]:
        return self.inst.shape  # type: ignore[return-value]

    def load(self, index: int) -> NucleiSample:
        return NucleiSample("scene", self.image, self.inst, None)


def test_patches_hv_targets_are_computed_after_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HV target of an augmented patch is the HV map of the augmented instances: inside every nucleus of
    the output, x runs from -1 to +1 across the nucleus as it now lies, and it is 0 on background."""
    monkeypatch.setattr(nuclei, "photometric", lambda image, rng: image)  # keep the colour-coded ids
    image, inst = _disc_scene(160)
    ds = HoVerNetPatches([_OneImage(image, inst)], 64, 64, train=True,
                         augment=AugmentConfig(hovernet=True), seed=3)
    for index in range(len(ds)):
        item = ds[index]
        hv, fg = item["hv"].numpy(), item["np"].numpy().astype(bool)
        assert np.all(hv[:, ~fg] == 0)
        assert np.all(np.abs(hv) <= 1)
        # Recover the augmented instances from the image colour (it encodes the id) and recompute HV.
        ids = np.rint(item["image"][0].numpy() * 255 / 40).astype(np.int32) * fg
        interior = fg & (ids > 0)
        expected = hv_map(ids)
        agree = np.isclose(hv[:, interior], expected[:, interior], atol=0.25).mean()
        assert agree > 0.8


def test_patches_augmentation_is_deterministic_per_epoch() -> None:
    image, inst = _disc_scene(160)
    ds = HoVerNetPatches([_OneImage(image, inst)], 64, 64, train=True, augment=AugmentConfig(hovernet=True))
    first = ds[0]["image"]
    assert torch.equal(first, ds[0]["image"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["image"])
