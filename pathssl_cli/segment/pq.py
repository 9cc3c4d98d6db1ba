"""Instance pairing and panoptic quality: what `metrics.py` (HoVer-Net's statistics) and `metrics_pannuke.py`
(PanNuke's mPQ/bPQ) both build on, in a module of its own so that neither imports the other.

`panoptic_quality` is `get_fast_pq` of vqdang/hover_net (`metrics/stats_utils.py`) and of
TissueImageAnalytics/PanNuke-metrics (`utils.py`), with one deliberate difference: SQ is ``sum(IoU) / tp``, where
the official code divides by ``tp + 1e-6``. Ours is larger by the factor ``(tp + 1e-6) / tp``, so SQ and PQ differ
from the official values by a relative ``1e-6 / tp`` (at most 1e-6, an absolute difference below 1e-6 since both
lie in [0, 1]), and a perfect prediction scores 1 where the official code gives ``1 / (1 + 1e-6 / tp)``. With
``tp == 0`` both give SQ 0. Pairing, DQ and everything else are the official arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

_NAN = float("nan")


def remap_label(inst: np.ndarray, by_size: bool = False) -> np.ndarray:
    """Relabel instances to 1..N (0 stays background), keeping the order of the original ids.

    With `by_size`, larger instances get smaller ids (ties keep the original id order, as the official stable
    sort does). Returns a new int32 array; the input is not modified.
    """
    inst = np.asarray(inst)
    if (
        inst.size
        and np.issubdtype(inst.dtype, np.integer)
        and inst.min() >= 0
        and inst.max() <= 4 * inst.size
    ):
        # Non-negative ids of moderate range: a lookup table is O(pixels), where np.unique sorts them all.
        present = np.bincount(inst.ravel()) > 0
        present[0] = False
        if by_size:
            sizes = np.bincount(inst.ravel())
            order = np.flatnonzero(present)
            order = order[np.argsort(-sizes[order], kind="stable")]
        else:
            order = np.flatnonzero(present)
        lookup = np.zeros(len(present), dtype=np.int32)
        lookup[order] = np.arange(1, len(order) + 1, dtype=np.int32)
        return lookup[inst]
    ids, inverse = np.unique(inst, return_inverse=True)
    inverse = inverse.reshape(inst.shape)
    is_instance = ids != 0
    n_instances = int(is_instance.sum())
    new_id = np.zeros(len(ids), dtype=np.int32)
    if by_size and n_instances:
        sizes = np.bincount(inverse.ravel(), minlength=len(ids))
        order = np.flatnonzero(is_instance)
        order = order[np.argsort(-sizes[order], kind="stable")]
        new_id[order] = np.arange(1, n_instances + 1, dtype=np.int32)
    else:
        new_id[is_instance] = np.arange(1, n_instances + 1, dtype=np.int32)
    return new_id[inverse]


def overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections (T, P) and instance sizes of two maps already remapped to 1..N.

    One `np.unique` over the joint labels of the overlapping pixels replaces the official per-instance mask
    loop.
    """
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    true_sizes = np.bincount(true.ravel(), minlength=n_true + 1)[1:].astype(np.float64)
    pred_sizes = np.bincount(pred.ravel(), minlength=n_pred + 1)[1:].astype(np.float64)
    both = (true > 0) & (pred > 0)
    joint = (true[both].astype(np.int64) - 1) * max(n_pred, 1) + (pred[both].astype(np.int64) - 1)
    pair_ids, pair_counts = np.unique(joint, return_counts=True)
    inter = np.zeros((n_true, n_pred), dtype=np.float64)
    if n_pred:
        inter[pair_ids // n_pred, pair_ids % n_pred] = pair_counts
    return inter, true_sizes, pred_sizes


def ratio(numerator: float, denominator: float, *, undefined: float = 0.0) -> float:
    return float(numerator / denominator) if denominator > 0 else undefined


def pq_pairs(iou: np.ndarray, match_iou: float) -> np.ndarray:
    """IoUs of the matched pairs: IoU > match_iou, unique (direct at >= 0.5, Hungarian below)."""
    if iou.size == 0:
        return np.zeros(0)
    if match_iou >= 0.5:
        # IoU > 0.5 implies each instance overlaps more than half of its partner, so at most one partner
        # exists.
        return iou[iou > match_iou]
    rows, cols = linear_sum_assignment(-iou)
    paired = iou[rows, cols]
    return paired[paired > match_iou]


def panoptic_quality(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict[str, float]:
    """DQ, SQ, PQ and counts of one pair of instance maps (`get_fast_pq`), without the AJI/Dice work.

    Both empty gives NaN; otherwise 0/0 terms are 0, as in `instance_stats`.
    """
    true, pred = remap_label(true), remap_label(pred)
    inter, true_sizes, pred_sizes = overlaps(true, pred)
    union = true_sizes[:, None] + pred_sizes[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    paired_iou = pq_pairs(iou, match_iou)
    tp = len(paired_iou)
    fp, fn = len(pred_sizes) - tp, len(true_sizes) - tp
    if tp + fp + fn == 0:
        return {"dq": _NAN, "sq": _NAN, "pq": _NAN, "tp": 0, "fp": 0, "fn": 0}
    dq = ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = ratio(float(paired_iou.sum()), tp)
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": tp, "fp": fp, "fn": fn}


def nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else _NAN
