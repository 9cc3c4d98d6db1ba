"""Post-processing: agreement with the naive official algorithm, ideal-output recovery, instance records."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from pathssl_cli.segment.metrics import aggregate, instance_stats, panoptic_quality
from pathssl_cli.segment.postproc import describe_instances, hovernet_postprocess
from pathssl_cli.segment.targets import hv_map

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "postproc_throughput.py"


@pytest.fixture(scope="module")
def official() -> ModuleType:
    """The naive official-style post-processing lives in the benchmark: tests and figures share it."""
    spec = importlib.util.spec_from_file_location("postproc_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _synthetic(seed: int, texture: str, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    from pathssl_cli.synthetic import render_tissue

    # 0.25 um/px = 40x, the magnification HoVer-Net's fixed kernel sizes (Sobel 21, 5x5 opening) are made for.
    _, inst, types = render_tissue(np.random.default_rng(seed), size, size, texture, mpp=0.25)
    return inst, types.astype(np.int64)


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_agrees_with_official_on_consep(official: ModuleType, shared_data: Path, noise: float) -> None:
    from pathssl_cli.segment.io import read_consep_label

    labels = sorted((shared_data / "nuclei" / "consep-tiles" / "Labels").glob("*.mat"))[:6]
    rng = np.random.default_rng(0)
    for path in labels:
        label = read_consep_label(path)
        outputs = official.ideal_outputs(label.inst_map, label.type_map, 5, rng, noise=noise)
        ref_map, ref_info = official.official_postprocess(*outputs)
        ours_map, ours_info = hovernet_postprocess(*outputs)
        assert panoptic_quality(ref_map, ours_map)["pq"] >= 0.95, path.name
        _assert_same_records(ref_map, ref_info, ours_map, ours_info)


def _assert_same_records(ref_map: np.ndarray, ref_info: dict, ours_map: np.ndarray, ours_info: dict) -> None:
    """Instances matched by identical pixel sets must have the official bbox, centroid, contour and type."""
    for ref_id, ref in ref_info.items():
        ours_ids = np.unique(ours_map[ref_map == ref_id])
        if len(ours_ids) != 1 or not np.array_equal(ours_map == ours_ids[0], ref_map == ref_id):
            continue
        ours = ours_info[int(ours_ids[0])]
        assert ours.bbox == tuple(ref["bbox"])
        np.testing.assert_allclose(ours.centroid, ref["centroid"], atol=1e-9)
        np.testing.assert_array_equal(ours.contour, ref["contour"])
        assert ours.type == ref["type"]
        assert ours.type_prob == pytest.approx(ref["type_prob"], abs=1e-5)


def _touching_nuclei(seed: int, size: int = 192, n: int = 60) -> np.ndarray:
    """Densely packed ellipses 10-26 px across that may touch but never overlap, ids 1..n."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    count = 0
    for _ in range(n * 20):
        disc = np.zeros((size, size), np.uint8)
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(6, 13)), int(rng.integers(5, 10)))
        cv2.ellipse(disc, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if (inst[disc > 0] > 0).any():
            continue
        count += 1
        inst[disc > 0] = count
        if count == n:
            break
    return inst


def _drop_small(inst: np.ndarray) -> np.ndarray:
    # HoVer-Net gives no HV target to pieces under 30 px (border slivers): it is never taught to find them.
    sizes = np.bincount(inst.ravel())
    return np.where((sizes < 30)[inst], 0, inst)


def test_ideal_outputs_recover_touching_nuclei() -> None:
    stats, touching = [], 0
    for seed in range(4):
        inst = _drop_small(_touching_nuclei(seed))
        right = (inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)
        below = (inst[1:] != inst[:-1]) & (inst[1:] > 0) & (inst[:-1] > 0)
        touching += int(right.sum() + below.sum())
        pred, _ = hovernet_postprocess((inst > 0).astype(np.float32), hv_map(inst))
        stats.append(instance_stats(inst, pred))
    assert touching > 50  # the watershed really has nuclei to split
    assert aggregate(stats)["pooled"]["pq"] >= 0.95


@pytest.mark.parametrize("texture", ["tumour", "lymphocytes"])
def test_ideal_outputs_recover_synthetic_tissue(texture: str) -> None:
    """render_tissue paints nuclei over each other, leaving crescents that HoVer-Net's algorithm (fixed 5x5
    marker opening, Sobel 21) partly merges even from perfect outputs: measured pooled PQ about 0.90-0.92."""
    stats = []
    for seed in range(4):
        inst = _drop_small(_synthetic(seed, texture, size=192)[0])
        pred, _ = hovernet_postprocess((inst > 0).astype(np.float32), hv_map(inst))
        stats.append(instance_stats(inst, pred))
    pooled = aggregate(stats)["pooled"]
    assert pooled["pq"] >= 0.85 and pooled["dq"] >= 0.9


def test_ideal_outputs_recover_consep(shared_data: Path) -> None:
    """Real tiles: HoVer-Net's algorithm on perfect outputs has a lower ceiling (dense, touching, cut)."""
    from pathssl_cli.segment.io import read_consep_label

    stats = []
    for path in sorted((shared_data / "nuclei" / "consep-tiles" / "Labels").glob("*.mat"))[:8]:
        inst = read_consep_label(path).inst_map
        pred, _ = hovernet_postprocess((inst > 0).astype(np.float32), hv_map(inst))
        stats.append(instance_stats(inst, pred))
    agg = aggregate(stats)
    assert agg["dq"] >= 0.85 and agg["sq"] >= 0.9


def test_type_vote_and_records_hand_worked() -> None:
    inst = np.zeros((12, 12), np.int32)
    inst[1:6, 1:6] = 1  # 25 px: 15 background votes, 10 type 2 -> type 2 (background loses), prob 10/25
    inst[7:11, 7:11] = 2  # 16 px: 8 type 1, 8 type 3 -> tie, smaller id wins: type 1, prob 0.5
    pixel_type = np.zeros((12, 12), np.int64)
    pixel_type[1:3, 1:6] = 2
    pixel_type[7:9, 7:11] = 3
    pixel_type[9:11, 7:11] = 1
    type_prob = np.eye(4, dtype=np.float32)[pixel_type].transpose(2, 0, 1)
    records = describe_instances(inst, type_prob)
    assert (records[1].type, records[1].type_prob) == (2, pytest.approx(0.4))
    assert (records[2].type, records[2].type_prob) == (1, pytest.approx(0.5))
    assert records[1].bbox == (1, 1, 6, 6)
    assert records[1].centroid == pytest.approx((3.0, 3.0))
    assert sorted(map(tuple, records[1].contour.tolist())) == [(1, 1), (1, 5), (5, 1), (5, 5)]
    assert describe_instances(inst)[1].type is None


def test_records_are_consistent_with_the_map() -> None:
    inst, types = _synthetic(0, "tumour")
    type_prob = np.eye(6, dtype=np.float32)[types].transpose(2, 0, 1)
    pred, records = hovernet_postprocess((inst > 0).astype(np.float32), hv_map(inst), type_prob)
    assert sorted(records) == list(range(1, pred.max() + 1))  # ids 1..N, every one described
    for idx, rec in records.items():
        rmin, cmin, rmax, cmax = rec.bbox
        rows, cols = np.nonzero(pred == idx)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (rmin, cmin, rmax, cmax)
        assert rec.centroid == pytest.approx((cols.mean(), rows.mean()))
        assert np.all(pred[rec.contour[:, 1], rec.contour[:, 0]] == idx)  # contour points lie on the instance
        assert rec.type in range(1, 6)


def test_empty_and_flat_outputs(official: ModuleType) -> None:
    pred, records = hovernet_postprocess(np.zeros((32, 32), np.float32), np.zeros((2, 32, 32), np.float32))
    assert not pred.any() and records == {}
    blob = np.zeros((32, 32), np.float32)
    blob[8:20, 8:20] = 1
    # No HV signal: the min-max of a constant Sobel map is 0, so every pixel reads as a boundary and no marker
    # survives. That is the official behaviour too; a real network never outputs a constant HV map.
    flat = np.zeros((2, 32, 32), np.float32)
    pred, records = hovernet_postprocess(blob, flat)
    assert not pred.any() and records == {}
    assert not official.official_instance_map(blob, flat).any()
    pred, records = hovernet_postprocess(blob, hv_map((blob > 0).astype(np.int32)))  # ideal HV: one nucleus
    assert pred.max() == 1 and (pred > 0).sum() == 144 and len(records) == 1
    with pytest.raises(ValueError, match="hv"):
        hovernet_postprocess(blob, np.zeros((32, 32), np.float32))


def _naive_records(inst: np.ndarray) -> dict[int, tuple[tuple[int, int, int, int], np.ndarray]]:
    """Per-instance full-image mask: bbox and longest outer contour of each id traced alone."""
    records = {}
    for idx in np.unique(inst)[1:]:
        rows, cols = np.nonzero(inst == idx)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop = np.pad((inst[r0:r1, c0:c1] == idx).astype(np.uint8), 1)
        contours = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        longest = max(contours, key=len).reshape(-1, 2) + np.array([c0 - 1, r0 - 1])
        records[int(idx)] = ((int(r0), int(c0), int(r1), int(c1)), longest)
    return records


def test_contours_and_boxes_match_per_instance_tracing() -> None:
    """The whole-map contour pass gives each instance the contour it has traced alone, whatever touches it:
    packed neighbours, an instance inside another's hole, ids in two pieces, diagonal-only links, the border."""
    maps = [_touching_nuclei(seed, size=96, n=30) for seed in range(3)]
    special = np.zeros((40, 40), np.int32)
    special[2:20, 2:20] = 1
    special[6:14, 6:14] = 2  # inside 1's hole
    special[8:10, 8:10] = 0  # hole inside 2
    special[0:5, 30:40] = 3  # on the border, and a second piece of id 3 below
    special[30:36, 30:36] = 3
    special[22, 22] = special[23, 23] = special[24, 24] = 4  # diagonal-only chain
    special[22:26, 25:27] = 5  # touches 4 diagonally
    special[39, 0:40] = 7  # gap in ids (no 6), full bottom row
    maps.append(special)
    for inst in maps:
        records = describe_instances(inst)
        naive = _naive_records(inst)
        assert sorted(records) == sorted(naive)
        for idx, (bbox, contour) in naive.items():
            assert records[idx].bbox == bbox, idx
            np.testing.assert_array_equal(records[idx].contour, contour, err_msg=str(idx))


def test_public_watershed_fallback_gives_the_same_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without scikit-image's private flood core, the public `watershed` on the same box gives the same map."""
    from pathssl_cli.segment import postproc

    inst = _drop_small(_touching_nuclei(5))
    rng = np.random.default_rng(1)
    hv = np.clip(hv_map(inst) + rng.normal(0, 0.1, (2, *inst.shape)), -1, 1).astype(np.float32)
    outputs = ((inst > 0).astype(np.float32), hv)
    fast = postproc.instance_map(*outputs)
    monkeypatch.setattr(postproc, "_watershed_raveled", None)
    assert np.array_equal(postproc.instance_map(*outputs), fast)
    assert fast.max() > 20


def test_channel_argmax_matches_numpy_with_ties() -> None:
    from pathssl_cli.segment.postproc import _argmax_channels

    rng = np.random.default_rng(0)
    channels = rng.integers(0, 3, (5, 400)).astype(np.float32)  # many ties: the first maximum must win
    where = np.flatnonzero(rng.random(400) > 0.3)
    np.testing.assert_array_equal(_argmax_channels(channels, where), np.argmax(channels[:, where], axis=0))


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_instance_maps_identical_to_official_on_consep(official: ModuleType, shared_data: Path, noise: float) -> None:
    """The vectorised pipeline and its shortcuts (see the module docstring) give the official instances exactly:
    the same pixel sets, whatever the ids."""
    from pathssl_cli.segment.io import read_consep_label

    labels = sorted((shared_data / "nuclei" / "consep-tiles" / "Labels").glob("*.mat"))[6:14]
    rng = np.random.default_rng(1)
    for path in labels:
        label = read_consep_label(path)
        outputs = official.ideal_outputs(label.inst_map, label.type_map, 5, rng, noise=noise)
        ref, ours = official.official_postprocess(*outputs)[0], hovernet_postprocess(*outputs)[0]
        assert np.array_equal(ref > 0, ours > 0), path.name
        pairs = np.unique(np.stack([ref[ref > 0], ours[ours > 0]]), axis=1)
        assert pairs.shape[1] == len(np.unique(ref[ref > 0])) == len(np.unique(ours[ours > 0])), path.name


def test_energy_shortcuts_give_the_official_bits() -> None:
    """-blur((1 - overall) * fg) (official) == blur over a reflect-101 padding of (overall - 1) * fg, inside."""
    rng = np.random.default_rng(0)
    overall = rng.random((61, 47), dtype=np.float32)
    overall[rng.random(overall.shape) < 0.2] = 1.0  # exact zeros of 1 - overall
    fg = rng.random(overall.shape) < 0.7
    reference = -cv2.GaussianBlur((1.0 - overall.astype(np.float64)) * fg, (3, 3), 0)
    shifted = np.subtract(overall, 1.0, dtype=np.float64) * fg
    padded = cv2.GaussianBlur(cv2.copyMakeBorder(shifted, 1, 1, 1, 1, cv2.BORDER_REFLECT_101), (3, 3), 0)
    assert np.array_equal(padded[1:-1, 1:-1], reference)  # == treats -0.0 and 0.0 alike, as the flood does
