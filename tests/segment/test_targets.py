"""HV targets: properties of the maps, and equality with a naive per-instance version of the official code."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pathssl_cli.segment.targets import hv_map


def _naive_official_hv(inst: np.ndarray, min_size: int = 30) -> np.ndarray:
    """hover_net `gen_instance_hv_map` as written there (fix_mirror_padding, bbox +-2 crop, centre of mass
    rounded half up, grid from 1, per-side normalisation), one instance at a time. The map is zero-padded
    first so the expanded boxes never leave the array, as the official code relies on its own padding."""
    pad = 3
    ann = np.pad(inst.astype(np.int64), pad)
    # fix_mirror_padding: every extra 4-connected piece of an id gets a new id.
    current_max = ann.max()
    for inst_id in [i for i in np.unique(ann) if i != 0]:
        pieces = ndimage.label(ann == inst_id)[0]
        pieces[pieces > 1] += current_max
        ann[pieces > 1] = pieces[pieces > 1]
        current_max = ann.max()
    sizes = np.bincount(ann.ravel())
    x_map = np.zeros(ann.shape, np.float32)
    y_map = np.zeros(ann.shape, np.float32)
    for inst_id in [i for i in np.unique(ann) if i != 0 and sizes[i] >= min_size]:
        mask = (ann == inst_id).astype(np.uint8)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        r0, r1, c0, c1 = rows[0] - 2, rows[-1] + 3, cols[0] - 2, cols[-1] + 3
        crop = mask[r0:r1, c0:c1]
        com = ndimage.center_of_mass(crop)
        com = [int(com[0] + 0.5), int(com[1] + 0.5)]
        xs = np.arange(1, crop.shape[1] + 1) - com[1]
        ys = np.arange(1, crop.shape[0] + 1) - com[0]
        ix, iy = np.meshgrid(xs, ys)
        ix[crop == 0] = 0
        iy[crop == 0] = 0
        ix, iy = ix.astype("float32"), iy.astype("float32")
        for arr in (ix, iy):
            if arr.min() < 0:
                arr[arr < 0] /= -arr[arr < 0].min()
            if arr.max() > 0:
                arr[arr > 0] /= arr[arr > 0].max()
        x_map[r0:r1, c0:c1][crop > 0] = ix[crop > 0]
        y_map[r0:r1, c0:c1][crop > 0] = iy[crop > 0]
    return np.stack([x_map, y_map])[:, pad:-pad, pad:-pad]


def _nuclei(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for k in range(1, 10):
        cy, cx = rng.uniform(0, size, 2)
        a, b, t = rng.uniform(3, 9), rng.uniform(2.5, 6), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        inst[u * u + v * v <= 1] = k * 7  # non-contiguous ids, later nuclei overlap earlier ones
    return inst


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_official(seed: int) -> None:
    inst = _nuclei(seed)
    np.testing.assert_allclose(hv_map(inst), _naive_official_hv(inst), atol=1e-6)


def test_split_instance_pieces_are_normalised_separately() -> None:
    inst = np.zeros((40, 60), np.int32)
    inst[5:15, 5:15] = 3
    inst[25:35, 40:55] = 3  # same id, second piece (as after mirror padding)
    hv = hv_map(inst)
    np.testing.assert_allclose(hv, _naive_official_hv(inst), atol=1e-6)
    for piece in (np.s_[5:15, 5:15], np.s_[25:35, 40:55]):
        assert hv[0][piece].min() == -1 and hv[0][piece].max() == 1
        assert hv[1][piece].min() == -1 and hv[1][piece].max() == 1


@pytest.mark.parametrize("seed", range(3))
def test_properties(seed: int) -> None:
    inst = _nuclei(seed)
    hv = hv_map(inst, min_size=0)
    assert hv.shape == (2, *inst.shape) and hv.dtype == np.float32
    assert hv.min() >= -1 and hv.max() <= 1
    assert np.all(hv[:, inst == 0] == 0)  # zero outside nuclei
    for inst_id in np.unique(inst[inst > 0]):
        pieces, n_pieces = ndimage.label(inst == inst_id)  # overlaps can split an id: each piece is a nucleus
        for piece_id in range(1, n_pieces + 1):
            mask = pieces == piece_id
            rows, cols = np.nonzero(mask)
            cy, cx = rows.mean(), cols.mean()
            x, y = hv[0][mask], hv[1][mask]
            # Sign by side of the centroid: left/above by more than 1.5 px -> negative; right/below ->
            # positive
            # (the official grid starts at 1, shifting the zero one pixel left of / above the centroid).
            assert np.all(x[cols < cx - 1.5] < 0) and np.all(x[cols > cx + 0.5] > 0)
            assert np.all(y[rows < cy - 1.5] < 0) and np.all(y[rows > cy + 0.5] > 0)
            # Per-side normalisation: each side reaches exactly -1 / +1 where it exists.
            if (x < 0).any():
                assert x.min() == pytest.approx(-1.0)
            if (x > 0).any():
                assert x.max() == pytest.approx(1.0)
            # x grows along each row of the instance.
            for r in np.unique(rows):
                row_vals = hv[0][r][mask[r]]
                assert np.all(np.diff(row_vals) >= 0)


def test_small_pieces_get_no_hv_and_ids_do_not_matter() -> None:
    inst = np.zeros((32, 32), np.int32)
    inst[2:6, 2:6] = 1  # 16 px < 30
    inst[10:20, 10:20] = 2
    hv = hv_map(inst)
    assert np.all(hv[:, 2:6, 2:6] == 0) and np.abs(hv[:, 10:20, 10:20]).max() == 1
    relabelled = np.where(inst == 2, 900, np.where(inst == 1, 5, 0))
    np.testing.assert_array_equal(hv_map(relabelled), hv)
    assert not hv_map(np.zeros((8, 8), np.int32)).any()
