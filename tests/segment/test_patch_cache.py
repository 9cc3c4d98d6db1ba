"""The decoded-image cache of HoVer-Net patches: identical patches, bounded memory, read-only arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pathssl_cli.segment.datasets import NucleiSample, NucleiSource
from pathssl_cli.segment.patches import AugmentConfig, DecodedImageCache, HoVerNetPatches


class CountingSource(NucleiSource):
    """Random 64 px images with square nuclei; counts decodes and hands out fresh arrays each time."""

    def __init__(self, count: int = 3, size: int = 64) -> None:
        self.names = [f"im{i}" for i in range(count)]
        self.num_types = 2
        self.side = size
        self.loads = 0

    def size(self, index: int) -> tuple[int, int]:
        return self.side, self.side

    def load(self, index: int) -> NucleiSample:
        self.loads += 1
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)
        inst = np.zeros((self.side, self.side), np.int32)
        for k in range(6):
            top, left = rng.integers(0, self.side - 9, 2)
            inst[top:top + 8, left:left + 8] = k + 1
        types = np.where(inst > 0, 1 + inst % 2, 0).astype(np.uint8)
        return NucleiSample(self.names[index], image, inst, types)


def _sample_bytes(source: CountingSource) -> int:
    sample = source.load(0)
    source.loads = 0
    return sample.image.nbytes + sample.inst_map.nbytes + sample.type_map.nbytes


@pytest.mark.parametrize("context", [0, 8])
def test_cached_patches_equal_decoded_ones_across_epochs(context: int) -> None:
    kwargs = dict(train=True, typed=True, augment=AugmentConfig(stain=0.05), target_context=context)
    cached = HoVerNetPatches([CountingSource()], 32, 32, cache_mb=64, **kwargs)
    plain = HoVerNetPatches([CountingSource()], 32, 32, cache_mb=0, **kwargs)
    for epoch in range(3):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for index in range(len(cached)):
            a, b = cached[index], plain[index]
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # 3 images x 4 patches x 3 epochs: each image decoded once with the cache, every time without.
    assert cached.sources[0].loads == 3
    assert plain.sources[0].loads == 3 * 4 * 3


def test_cache_stays_within_its_budget_and_evicts_the_least_recently_used() -> None:
    source = CountingSource(count=4)
    per_image = _sample_bytes(source)
    cache = DecodedImageCache([source], budget_bytes=2 * per_image)
    for index in (0, 1, 0, 2):  # 0 was used after 1, so 1 is the one to go when 2 arrives
        cache.get(0, index)
        assert cache.bytes <= cache.budget_bytes
    assert source.loads == 3
    cache.get(0, 0)
    assert source.loads == 3  # still cached
    cache.get(0, 1)
    assert source.loads == 4  # evicted earlier, decoded again
    assert cache.bytes == 2 * per_image


def test_an_image_larger_than_the_budget_is_not_cached() -> None:
    source = CountingSource(count=1)
    cache = DecodedImageCache([source], budget_bytes=_sample_bytes(source) - 1)
    cache.get(0, 0)
    cache.get(0, 0)
    assert source.loads == 2 and cache.bytes == 0


def test_cached_arrays_are_read_only_so_an_in_place_edit_fails_loudly() -> None:
    source = CountingSource(count=1)
    sample = DecodedImageCache([source], budget_bytes=2**20).get(0, 0)
    with pytest.raises(ValueError, match="read-only"):
        sample.image[0, 0, 0] = 0
    with pytest.raises(ValueError, match="read-only"):
        sample.inst_map[0, 0] = 0


@pytest.mark.parametrize("train", [False, True])
def test_patches_of_a_cached_image_never_hand_out_its_read_only_arrays(train: bool) -> None:
    # A whole-image window is a view of the cached arrays when nothing needs padding; torch.from_numpy on a
    # read-only array warns that writing to the tensor is undefined behaviour. The patch must own its arrays.
    patches = HoVerNetPatches([CountingSource(count=1)], 64, 64, train=train, typed=True, cache_mb=64,
                              augment=AugmentConfig(stain=0.05, rotations=False, flips=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            patches.set_epoch(epoch)
            patches[0]
