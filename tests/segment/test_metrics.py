"""Metrics against hand-worked values, a naive loop version of HoVer-Net's stats_utils, and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pathssl_cli.segment.metrics import (
    METRIC_KEYS,
    aggregate,
    binarize,
    detection_f1,
    instance_stats,
    pair_coordinates,
    pannuke_scores,
    panoptic_quality,
    remap_label,
)


# ---------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_matches() -> None:
    # true: id 1 on cols 0-3 (4 px), id 2 on cols 6-7 (2 px); pred: id 3 on cols 0-2 (3 px), id 5 on cols 5-7.
    true = np.array([[1, 1, 1, 1, 0, 0, 2, 2, 0, 0]])
    pred = np.array([[3, 3, 3, 0, 0, 5, 5, 5, 0, 0]])
    s = instance_stats(true, pred)
    # IoU(1,3) = 3/4, IoU(2,5) = 2/3; both > 0.5 -> TP 2, FP 0, FN 0.
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["dq"] == pytest.approx(1.0)
    assert s["sq"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert s["pq"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    # Dice: 2 * 5 / (6 + 6); Dice2: 2 * (3 + 2) / ((4 + 3) + (2 + 3)).
    assert s["dice"] == pytest.approx(10 / 12)
    assert s["dice2"] == pytest.approx(10 / 12)
    # AJI = AJI+: (3 + 2) / (4 + 3) (unions 4 and 3).
    assert s["aji"] == pytest.approx(5 / 7)
    assert s["aji_plus"] == pytest.approx(5 / 7)


def test_hand_worked_merge_separates_aji_and_aji_plus() -> None:
    # One prediction (7 px) spans two true nuclei of 3 px each: IoU 3/7 with both.
    true = np.array([[1, 1, 1, 0, 2, 2, 2, 0]])
    pred = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
    s = instance_stats(true, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 2)  # 3/7 is not > 0.5
    assert s["dq"] == 0 and s["sq"] == 0 and s["pq"] == 0
    assert s["dice"] == pytest.approx(12 / 13)  # 2 * 6 / (6 + 7)
    assert s["dice2"] == pytest.approx(2 * 6 / 20)  # pairs (1,1) and (2,1): inter 3 + 3, totals 10 + 10
    assert s["aji"] == pytest.approx(6 / 14)  # the prediction is reused: unions 7 + 7
    assert s["aji_plus"] == pytest.approx(3 / 10)  # unique pair: inter 3, union 7 + unpaired true 3
    # Below 0.5 the Hungarian pairing takes one of the two: TP 1, FN 1, FP 0.
    low = instance_stats(true, pred, match_iou=0.4)
    assert (low["tp"], low["fp"], low["fn"]) == (1, 0, 1)
    assert low["dq"] == pytest.approx(1 / 1.5)
    assert low["pq"] == pytest.approx(1 / 1.5 * 3 / 7)


def test_iou_exactly_half_does_not_match() -> None:
    true = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0]])  # IoU = 1/2, matching needs > 0.5
    s = instance_stats(true, pred)
    assert s["tp"] == 0 and s["pq"] == 0


def test_unpaired_prediction_enters_aji_union() -> None:
    true = np.array([[1, 1, 0, 0, 0, 0]])
    pred = np.array([[1, 1, 0, 0, 2, 2]])
    s = instance_stats(true, pred)
    assert s["aji"] == pytest.approx(2 / 4)  # inter 2, union 2 + unpaired pred 2
    assert s["dq"] == pytest.approx(1 / 1.5) and s["sq"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- edge cases
def test_both_empty_is_nan_and_skipped_by_aggregate() -> None:
    empty = np.zeros((5, 5), int)
    s = instance_stats(empty, empty)
    assert all(math.isnan(s[k]) for k in METRIC_KEYS)
    perfect = instance_stats(np.array([[1, 1]]), np.array([[4, 4]]))
    agg = aggregate([s, perfect])
    assert agg["pq"] == pytest.approx(1.0) and agg["n_undefined"] == 1 and agg["n_images"] == 2


@pytest.mark.parametrize("which", ["true", "pred"])
def test_one_side_empty_scores_zero(which: str) -> None:
    some = np.array([[1, 1, 0, 2]])
    none = np.zeros_like(some)
    s = instance_stats(none, some) if which == "true" else instance_stats(some, none)
    assert all(s[k] == 0.0 for k in METRIC_KEYS)
    assert (s["fp"], s["fn"]) == ((2, 0) if which == "true" else (0, 2))


def test_non_contiguous_ids_and_permutations_change_nothing() -> None:
    rng = np.random.default_rng(0)
    true, pred = _random_pair(rng)
    base = instance_stats(true, pred)
    for _ in range(3):
        t_perm = _permute_ids(true, rng, spread=1000)
        p_perm = _permute_ids(pred, rng, spread=1000)
        other = instance_stats(t_perm, p_perm)
        for key in METRIC_KEYS:
            assert other[key] == pytest.approx(base[key]), key


def test_remap_label() -> None:
    inst = np.array([[0, 7, 7], [3, 0, 9], [3, 3, 3]])
    assert remap_label(inst).tolist() == [[0, 2, 2], [1, 0, 3], [1, 1, 1]]
    assert remap_label(inst, by_size=True).tolist() == [[0, 2, 2], [1, 0, 3], [1, 1, 1]]
    by_size = remap_label(np.array([[5, 9, 9, 9]]), by_size=True)
    assert by_size.tolist() == [[2, 1, 1, 1]]
    assert remap_label(np.zeros((2, 2), int)).max() == 0


# ---------------------------------------------------------------------------------------------- naive
# reference
def _official_like(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict[str, float]:
    """Loop-per-instance re-implementation of hover_net stats_utils (get_dice_1, get_fast_dice_2,
    get_fast_aji,
    get_fast_aji_plus, get_fast_pq), written from the official description, after remapping."""
    true, pred = _loop_remap(true), _loop_remap(pred)
    t_ids, p_ids = list(range(1, true.max() + 1)), list(range(1, pred.max() + 1))
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for t in t_ids:
        tm = true == t
        for p in np.unique(pred[tm]):
            if p == 0:
                continue
            pm = pred == p
            inter[t - 1, p - 1] = (tm & pm).sum()
            union[t - 1, p - 1] = (tm | pm).sum()
    t_size = np.array([(true == t).sum() for t in t_ids], float)
    p_size = np.array([(pred == p).sum() for p in p_ids], float)
    out = {"dice": 2 * ((true > 0) & (pred > 0)).sum() / ((true > 0).sum() + (pred > 0).sum())}
    ov = inter > 0
    with np.errstate(invalid="ignore"):  # 0/0 without overlapping pairs, where the official code raises
        out["dice2"] = 2 * inter[ov].sum() / (inter[ov] + union[ov]).sum()
    rank = inter / (union + 1e-6)
    for key, unique in (("aji", False), ("aji_plus", True)):
        if unique:
            rows, cols = linear_sum_assignment(-rank)
        else:
            rows, cols = np.arange(len(t_ids)), np.argmax(rank, axis=1)
        keep = rank[rows, cols] > 0
        rows, cols = rows[keep], cols[keep]
        total_inter, total_union = inter[rows, cols].sum(), union[rows, cols].sum()
        total_union += sum(t_size[i] for i in range(len(t_ids)) if i not in set(rows))
        total_union += sum(p_size[j] for j in range(len(p_ids)) if j not in set(cols))
        out[key] = total_inter / total_union
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0)
    if match_iou >= 0.5:
        paired = iou[iou > match_iou]
    else:
        rows, cols = linear_sum_assignment(-iou)
        paired = iou[rows, cols][iou[rows, cols] > match_iou]
    tp = len(paired)
    fp, fn = len(p_ids) - tp, len(t_ids) - tp
    out["dq"] = tp / (tp + 0.5 * fp + 0.5 * fn)
    out["sq"] = paired.sum() / (tp + 1e-6)
    out["pq"] = out["dq"] * out["sq"]
    return out


def _loop_remap(inst: np.ndarray) -> np.ndarray:
    out = np.zeros(inst.shape, np.int32)
    for new, old in enumerate([i for i in np.unique(inst) if i != 0], start=1):
        out[inst == old] = new
    return out


def _random_pair(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Touching discs as truth; the prediction shifts, grows, drops, merges and adds some of them."""
    true = np.zeros((size, size), np.int32)
    pred = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for k in range(1, 13):
        cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(3, 7)
        true[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        if rng.random() < 0.85:
            dy, dx, dr = rng.integers(-2, 3), rng.integers(-2, 3), rng.integers(-1, 3)
            pred[(yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 <= (r + dr) ** 2] = 20 + k * 3
    pred[rng.integers(0, size - 4) :, :3] = 99  # a spurious prediction
    return true, pred


def _permute_ids(inst: np.ndarray, rng: np.random.Generator, spread: int) -> np.ndarray:
    ids = np.unique(inst[inst > 0])
    new = rng.choice(np.arange(1, spread), size=len(ids), replace=False)
    lookup = dict(zip(ids.tolist(), new.tolist(), strict=True))
    return np.vectorize(lambda v: lookup.get(v, 0))(inst)


@pytest.mark.parametrize("seed", range(3))
def test_sq_differs_from_official_only_by_its_epsilon(seed: int) -> None:
    # The docstrings state the one difference: SQ (hence PQ) / (tp) here, / (tp + 1e-6) officially.
    true, pred = _random_pair(np.random.default_rng(seed))
    ours, ref = instance_stats(true, pred), _official_like(true, pred)
    tp = ours["tp"]
    assert tp > 0
    for key in ("sq", "pq"):
        assert ours[key] == pytest.approx(ref[key] * (tp + 1e-6) / tp, rel=1e-12), key
        assert 0 < ours[key] - ref[key] < 1e-6, key
    for key in ("dq", "dice", "dice2", "aji", "aji_plus"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-12), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("match_iou", [0.5, 0.3, 0.7])
def test_agrees_with_naive_official_reimplementation(seed: int, match_iou: float) -> None:
    rng = np.random.default_rng(seed)
    true, pred = _random_pair(rng)
    ours = instance_stats(true, pred, match_iou)
    ref = _official_like(true, pred, match_iou)
    for key in METRIC_KEYS:  # rel 1e-5 absorbs the official SQ's + 1e-6
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("seed", range(3))
def test_pq_agrees_with_torchmetrics_one_class(seed: int) -> None:
    torch = pytest.importorskip("torch")
    from torchmetrics.detection import PanopticQuality

    true, pred = _random_pair(np.random.default_rng(seed))

    def encode(m: np.ndarray) -> object:  # (1, H, W, 2): category 1 = nucleus (thing), 0 = background (stuff)
        return torch.tensor(np.stack([(m > 0).astype(np.int64), m.astype(np.int64)], -1)[None])

    metric = PanopticQuality(things={1}, stuffs={0}, return_per_class=True, return_sq_and_rq=True)
    pq_tm, sq_tm, rq_tm = metric(encode(pred), encode(true))[0].tolist()  # row 0: the thing class
    ours = panoptic_quality(true, pred)
    # torchmetrics keeps per-class IoU sums in float32, hence 1e-6.
    assert ours["pq"] == pytest.approx(pq_tm, rel=1e-6)
    assert ours["sq"] == pytest.approx(sq_tm, rel=1e-6)
    assert ours["dq"] == pytest.approx(rq_tm, rel=1e-6)


def test_aggregate_is_mean_of_images_and_pooled_counts() -> None:
    a = instance_stats(np.array([[1, 1, 0, 0]]), np.array([[1, 1, 0, 0]]))  # PQ 1
    b = instance_stats(np.array([[1, 1, 0, 2]]), np.array([[0, 0, 0, 0]]))  # PQ 0, FN 2
    agg = aggregate([a, b])
    assert agg["pq"] == pytest.approx(0.5)
    assert agg["pooled"]["dq"] == pytest.approx(1 / (1 + 0.5 * 2))  # TP 1, FN 2 pooled
    assert agg["pooled"]["aji"] == pytest.approx(2 / (2 + 3))


# ---------------------------------------------------------------------------------------------- detection
def test_detection_f1_hand_worked() -> None:
    true_c = np.array([[0, 0], [10, 0], [50, 50]], float)
    pred_c = np.array([[3, 4], [10, 13], [100, 100]], float)  # distances 5 (paired), 13 (> 12), far
    res = detection_f1(true_c, np.array([1, 2, 1]), pred_c, np.array([1, 2, 2]))
    assert (res["tp"], res["fp"], res["fn"]) == (1, 2, 2)
    assert res["f1"] == pytest.approx(2 / 6)
    assert res["accuracy"] == pytest.approx(1.0)
    # type 1: tp 1; unpaired true of type 1: one (50, 50) -> 2 / (2 + 1)
    assert res["per_type"]["1"] == pytest.approx(2 / 3)
    # type 2: no paired; unpaired preds of type 2: two, unpaired true of type 2: one -> 0 / 3
    assert res["per_type"]["2"] == pytest.approx(0.0)


def test_detection_pools_over_images_and_handles_empty() -> None:
    res = detection_f1(
        [np.zeros((0, 2)), np.array([[5.0, 5.0]])],
        [np.zeros(0), np.array([1])],
        [np.array([[5.0, 5.0]]), np.array([[6.0, 5.0]])],
        [np.array([1]), np.array([1])],
    )
    assert (res["tp"], res["fp"], res["fn"]) == (1, 1, 0)  # no pair crosses images
    none = detection_f1(np.zeros((0, 2)), None, np.zeros((0, 2)), None)
    assert math.isnan(none["f1"])


def test_pair_coordinates_minimises_total_distance_then_filters() -> None:
    pairs, un_a, un_b = pair_coordinates(np.array([[0, 0], [20, 0]]), np.array([[11, 0]]), radius=12)
    assert pairs.tolist() == [[0, 0]] or pairs.tolist() == [[1, 0]]
    assert len(un_a) == 1 and len(un_b) == 0


# ---------------------------------------------------------------------------------------------- PanNuke
def _disc(mask: np.ndarray, cy: int, cx: int, r: int, value: int) -> None:
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def test_pannuke_hand_worked() -> None:
    true = np.zeros((3, 32, 32, 6))
    pred = np.zeros((3, 32, 32, 6))
    # image 0 (tissue A): class 0 perfect; class 1 missed; class 2 has a false positive but no truth
    # (skipped).
    _disc(true[0, :, :, 0], 8, 8, 4, 1)
    _disc(pred[0, :, :, 0], 8, 8, 4, 5)
    _disc(true[0, :, :, 1], 24, 24, 4, 2)
    _disc(pred[0, :, :, 2], 24, 6, 3, 1)
    # image 1 (tissue B): nothing true, nothing predicted -> NaN everywhere, skipped.
    # image 2 (tissue A): class 3, prediction a 6x5 box inside a 6x6 truth box: IoU 30/36.
    true[2, 10:16, 10:16, 3] = 1
    pred[2, 10:16, 10:15, 3] = 1
    res = pannuke_scores(true, pred, ["A", "B", "A"])
    img0, img1, img2 = res["per_image"]
    assert img0["neoplastic"] == pytest.approx(1.0) and img0["inflammatory"] == 0.0
    assert math.isnan(img0["connective"])  # FP of a class absent from the truth is not penalised
    assert img0["mpq"] == pytest.approx(0.5)
    # bPQ image 0: true {class0, class1}, pred {class0, class2 FP}: TP 1, FP 1, FN 1 -> DQ 0.5, SQ 1.
    assert img0["bpq"] == pytest.approx(0.5)
    assert math.isnan(img1["mpq"]) and math.isnan(img1["bpq"])
    assert img2["mpq"] == pytest.approx(30 / 36) and img2["bpq"] == pytest.approx(30 / 36)
    assert res["per_tissue"]["A"]["mpq"] == pytest.approx((0.5 + 30 / 36) / 2)
    assert math.isnan(res["per_tissue"]["B"]["mpq"])
    assert res["mpq"] == pytest.approx((0.5 + 30 / 36) / 2)  # tissue B (NaN) is skipped
    assert res["bpq"] == pytest.approx((0.5 + 30 / 36) / 2)
    assert res["per_class"]["neoplastic"] == pytest.approx(1.0)


def test_binarize_matches_official_loop() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((24, 24, 5))
    for c in range(5):
        for _ in range(3):
            _disc(
                masks[:, :, c],
                *rng.integers(3, 21, size=2),
                int(rng.integers(2, 5)),
                int(rng.integers(1, 50)),
            )
    # official: each channel in order, each unique id -> next count, later channels overwrite.
    expected = np.zeros((24, 24))
    count = 1
    for c in range(5):
        for j in [v for v in np.unique(masks[:, :, c]) if v != 0]:
            hit = masks[:, :, c] == j
            expected = expected * (1 - hit) + count * hit
            count += 1
    assert np.array_equal(binarize(masks), expected.astype(np.int32))


def _official_pannuke(true: np.ndarray, pred: np.ndarray, tissues: list[str]) -> tuple[float, float]:
    """PanNuke-metrics run.py, as a loop: per image binary PQ and per class PQ (NaN where the truth is empty),
    nanmean per image, per tissue, then over tissues."""
    mpq_img, bpq_img = [], []
    for i in range(true.shape[0]):
        t_bin, p_bin = _loop_binarize(true[i, :, :, :5]), _loop_binarize(pred[i, :, :, :5])
        bpq_img.append(np.nan if len(np.unique(t_bin)) == 1 else _official_like(t_bin, p_bin)["pq"])
        pqs = []
        for c in range(5):
            t_c, p_c = true[i, :, :, c].astype(np.int32), pred[i, :, :, c].astype(np.int32)
            if len(np.unique(t_c)) == 1:
                pqs.append(np.nan)
            elif p_c.max() == 0:
                pqs.append(0.0)  # official PQ with no prediction (our helper's AJI argmax needs one)
            else:
                pqs.append(_official_like(t_c, p_c)["pq"])
        mpq_img.append(np.nan if np.all(np.isnan(pqs)) else np.nanmean(pqs))
    tissue_m, tissue_b = [], []
    for tissue in sorted(set(tissues)):
        idx = [i for i, t in enumerate(tissues) if t == tissue]
        m = [mpq_img[i] for i in idx if not np.isnan(mpq_img[i])]
        b = [bpq_img[i] for i in idx if not np.isnan(bpq_img[i])]
        tissue_m.append(np.mean(m) if m else np.nan)
        tissue_b.append(np.mean(b) if b else np.nan)
    return float(np.nanmean(tissue_m)), float(np.nanmean(tissue_b))


def _loop_binarize(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[:2])
    count = 1
    for c in range(x.shape[2]):
        for j in [v for v in np.unique(x[:, :, c]) if v != 0]:
            hit = x[:, :, c] == j
            out = out * (1 - hit) + count * hit
            count += 1
    return out.astype(np.int32)


@pytest.mark.parametrize("seed", range(3))
def test_pannuke_agrees_with_naive_official(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 6
    true = np.zeros((n, 40, 40, 6))
    pred = np.zeros((n, 40, 40, 6))
    for i in range(n):
        for _ in range(int(rng.integers(0, 7))):
            c = int(rng.integers(0, 5))
            cy, cx, r = (int(v) for v in rng.integers(5, 35, size=3) % [30, 30, 5] + [5, 5, 3])
            _disc(true[i, :, :, c], cy, cx, r, int(rng.integers(1, 90)))
            if rng.random() < 0.8:  # detected, maybe shifted, maybe as another class
                pc = c if rng.random() < 0.7 else int(rng.integers(0, 5))
                _disc(pred[i, :, :, pc], cy + int(rng.integers(-2, 3)), cx, r, int(rng.integers(1, 90)))
        if rng.random() < 0.5:  # a false positive somewhere
            _disc(pred[i, :, :, int(rng.integers(0, 5))], *(int(v) for v in rng.integers(4, 36, 2)), 3, 99)
    tissues = [["Breast", "Colon", "Liver"][i % 3] for i in range(n)]
    ours = pannuke_scores(true, pred, tissues)
    mpq, bpq = _official_pannuke(true, pred, tissues)
    assert 0.05 < mpq < 0.95 and 0.05 < bpq < 0.95  # a case with real errors, not a trivial 0 or 1
    assert ours["mpq"] == pytest.approx(mpq, rel=1e-5)
    assert ours["bpq"] == pytest.approx(bpq, rel=1e-5)
