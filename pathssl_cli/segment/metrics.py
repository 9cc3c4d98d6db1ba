"""Nuclei instance metrics, computed as HoVer-Net's `compute_stats.py` computes them (vqdang/hover_net).

Per image (`instance_stats`): ids are remapped to 1..N first (`remap_label`), then
- ``dice``: binary Dice of foreground (`get_dice_1`);
- ``dice2``: "ensemble" Dice over every overlapping (true, pred) pair (`get_fast_dice_2`);
- ``aji``: every true instance is paired with its highest-IoU prediction (a prediction may be reused),
  unpaired instances of both sides are added to the union (`get_fast_aji`, the MoNuSeg AJI);
- ``aji_plus``: as AJI but with a unique pairing by Hungarian matching (`get_fast_aji_plus`);
- ``dq``, ``sq``, ``pq``: pairs need IoU > `match_iou` (strictly). At ``match_iou >= 0.5`` such pairs are
  unique by construction, so they are taken directly; below 0.5 a maximal unique pairing comes from
  `scipy.optimize.linear_sum_assignment` and is then filtered by IoU > `match_iou` (`get_fast_pq`).
`aggregate` averages the per-image values, as `compute_stats.run_nuclei_inst_stat` does (AJI is *not* pooled
over the dataset there: it is a mean of per-image AJIs). Pooled variants are returned beside it under
``pooled``.

Where the official code divides by zero or raises, we return (and why):

=====================  ============================================  ======================================
case                   official                                      here
=====================  ============================================  ======================================
both maps empty        dice nan, AJI/dice2/PQ raise, AJI+ nan        all NaN: undefined, `aggregate` skips
truth empty, pred not  dice 0, dice2 raises, AJI/AJI+/DQ/SQ/PQ 0     all 0
pred empty, truth not  dice 0, dice2 and AJI raise, AJI+/DQ/SQ/PQ 0  all 0
no overlapping pair    dice2 raises (0/0)                            dice2 0
tp == 0                SQ = 0 / (0 + 1e-6) = 0                       SQ 0
=====================  ============================================  ======================================
One deliberate difference from the official arithmetic: SQ is ``sum(IoU) / tp``, where `get_fast_pq` divides by
``tp + 1e-6``. Our SQ and PQ are therefore larger than the official ones by the factor ``(tp + 1e-6) / tp``: a
relative difference of ``1e-6 / tp`` (absolute below 1e-6), and a perfect prediction scores 1 instead of
``1 / (1 + 1e-6 / tp)``. DQ, Dice, Dice2, AJI and AJI+ are the official arithmetic. Non-contiguous ids are always
remapped, so they never matter. The pairing and PQ live in `pq.py`, shared with `metrics_pannuke.py`.

`detection_f1` is HoVer-Net's `run_nuclei_type_stat`: centroids are paired by Hungarian matching on Euclidean
distance and pairs farther than `radius` dropped (`pair_coordinates`); counts are pooled over all images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from pathssl_cli.segment.metrics_pannuke import binarize, pannuke_scores
from pathssl_cli.segment.pq import nanmean, overlaps, panoptic_quality, pq_pairs, ratio, remap_label

METRIC_KEYS: tuple[str, ...] = ("dice", "dice2", "aji", "aji_plus", "dq", "sq", "pq")
_NAN = float("nan")


def instance_stats(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict[str, Any]:
    """Per-image instance metrics of integer maps `true`, `pred` (H, W; 0 = background, any ids).

    Returns ``dice, dice2, aji, aji_plus, dq, sq, pq`` (floats, NaN when both maps are empty) plus raw counts
    for dataset-level aggregation: ``n_true, n_pred, tp, fp, fn, iou_sum, dice_inter, dice_total, aji_inter,
    aji_union, aji_plus_inter, aji_plus_union``.
    """
    if match_iou < 0:
        raise ValueError(f"match_iou must be >= 0, got {match_iou}")
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true and pred shapes differ: {true.shape} vs {pred.shape}")
    true, pred = remap_label(true), remap_label(pred)
    inter, true_sizes, pred_sizes = overlaps(true, pred)
    n_true, n_pred = len(true_sizes), len(pred_sizes)
    union = true_sizes[:, None] + pred_sizes[None, :] - inter

    # Binary Dice (get_dice_1).
    dice_inter = float(inter.sum())
    dice_total = float(true_sizes.sum() + pred_sizes.sum())

    # Ensemble Dice (get_fast_dice_2): every pair with any overlap contributes.
    overlapping = inter > 0
    dice2_inter = float(inter[overlapping].sum())
    dice2_total = float(union[overlapping].sum() + inter[overlapping].sum())

    # AJI and AJI+ rank pairs by inter / (union + 1e-6) as the official code does, so ties break identically.
    aji_iou = inter / (union + 1.0e-6) if inter.size else inter
    aji_inter, aji_union = _aji_totals(aji_iou, inter, union, true_sizes, pred_sizes, unique=False)
    ajip_inter, ajip_union = _aji_totals(aji_iou, inter, union, true_sizes, pred_sizes, unique=True)

    # PQ (get_fast_pq), IoU without epsilon.
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    paired_iou = pq_pairs(iou, match_iou)
    tp = len(paired_iou)
    fp, fn = n_pred - tp, n_true - tp
    iou_sum = float(paired_iou.sum())

    stats: dict[str, Any] = {
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "iou_sum": iou_sum,
        "dice_inter": dice_inter,
        "dice_total": dice_total,
        "aji_inter": aji_inter,
        "aji_union": aji_union,
        "aji_plus_inter": ajip_inter,
        "aji_plus_union": ajip_union,
    }
    if n_true == 0 and n_pred == 0:
        stats.update(dict.fromkeys(METRIC_KEYS, _NAN))
        return stats
    dq = ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = ratio(iou_sum, tp)
    stats.update(
        dice=ratio(2.0 * dice_inter, dice_total),
        dice2=ratio(2.0 * dice2_inter, dice2_total),
        aji=ratio(aji_inter, aji_union),
        aji_plus=ratio(ajip_inter, ajip_union),
        dq=dq,
        sq=sq,
        pq=dq * sq,
    )
    return stats


def _aji_totals(
    rank_iou: np.ndarray,
    inter: np.ndarray,
    union: np.ndarray,
    true_sizes: np.ndarray,
    pred_sizes: np.ndarray,
    *,
    unique: bool,
) -> tuple[float, float]:
    """Overall intersection and union of AJI (best pred per true, reusable) or AJI+ (Hungarian, unique)."""
    n_true, n_pred = rank_iou.shape
    if n_true == 0 or n_pred == 0:
        return 0.0, float(true_sizes.sum() + pred_sizes.sum())
    if unique:
        rows, cols = linear_sum_assignment(-rank_iou)
    else:
        rows, cols = np.arange(n_true), np.argmax(rank_iou, axis=1)
    keep = rank_iou[rows, cols] > 0.0
    rows, cols = rows[keep], cols[keep]
    paired_true = np.zeros(n_true, dtype=bool)
    paired_true[rows] = True
    paired_pred = np.zeros(n_pred, dtype=bool)
    paired_pred[cols] = True
    overall_inter = float(inter[rows, cols].sum())
    overall_union = float(
        union[rows, cols].sum() + true_sizes[~paired_true].sum() + pred_sizes[~paired_pred].sum()
    )
    return overall_inter, overall_union


def aggregate(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset summary as `compute_stats.run_nuclei_inst_stat`: the mean of the per-image metrics.

    Images where a metric is NaN (both maps empty) are left out of that metric's mean (the official code would
    have crashed on them); ``n_images`` and ``n_undefined`` say how many there were. ``pooled`` holds the same
    metrics computed from counts summed over all images (dataset-level DQ/SQ/PQ, AJI, Dice), for reference.
    """
    out: dict[str, Any] = {key: nanmean([s[key] for s in per_image]) for key in METRIC_KEYS}
    out["n_images"] = len(per_image)
    out["n_undefined"] = sum(1 for s in per_image if np.isnan(s["pq"]))
    total = {
        key: sum(s[key] for s in per_image)
        for key in (
            "tp",
            "fp",
            "fn",
            "iou_sum",
            "dice_inter",
            "dice_total",
            "aji_inter",
            "aji_union",
            "aji_plus_inter",
            "aji_plus_union",
        )
    }
    dq = ratio(total["tp"], total["tp"] + 0.5 * total["fp"] + 0.5 * total["fn"], undefined=_NAN)
    sq = ratio(total["iou_sum"], total["tp"], undefined=0.0 if total["fp"] + total["fn"] else _NAN)
    out["pooled"] = {
        "dice": ratio(2 * total["dice_inter"], total["dice_total"], undefined=_NAN),
        "aji": ratio(total["aji_inter"], total["aji_union"], undefined=_NAN),
        "aji_plus": ratio(total["aji_plus_inter"], total["aji_plus_union"], undefined=_NAN),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
    }
    return out


def pair_coordinates(
    set_a: np.ndarray,
    set_b: np.ndarray,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian pairing of points A (N, 2) with points B (M, 2) on Euclidean distance; pairs > radius
    dropped.

    Returns (pairs (K, 2) of indices into A and B, unpaired A indices, unpaired B indices). Note that, as in
    HoVer-Net, the assignment minimises total distance first and filters by radius afterwards.
    """
    set_a = np.asarray(set_a, dtype=np.float64).reshape(-1, 2)
    set_b = np.asarray(set_b, dtype=np.float64).reshape(-1, 2)
    if len(set_a) == 0 or len(set_b) == 0:
        return np.zeros((0, 2), dtype=np.int64), np.arange(len(set_a)), np.arange(len(set_b))
    distance = np.sqrt(((set_a[:, None, :] - set_b[None, :, :]) ** 2).sum(-1))
    rows, cols = linear_sum_assignment(distance)
    keep = distance[rows, cols] <= radius
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    unpaired_a = np.setdiff1d(np.arange(len(set_a)), pairs[:, 0])
    unpaired_b = np.setdiff1d(np.arange(len(set_b)), pairs[:, 1])
    return pairs, unpaired_a, unpaired_b


def _as_image_list(value: Any, dims: int) -> list[np.ndarray]:
    """Accept one image's array or a list of per-image arrays."""
    if isinstance(value, np.ndarray) and value.ndim == dims:
        return [value]
    return [np.asarray(v) for v in value]


def detection_f1(
    true_centroids: np.ndarray | Sequence[np.ndarray],
    true_types: np.ndarray | Sequence[np.ndarray] | None,
    pred_centroids: np.ndarray | Sequence[np.ndarray],
    pred_types: np.ndarray | Sequence[np.ndarray] | None,
    radius: float = 12.0,
    type_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """HoVer-Net's detection F1 and per-type F1 (`run_nuclei_type_stat`), pooled over images.

    Centroids are (N, 2) x, y arrays (or lists of them, one per image; pairs never cross images). `radius` is
    12 px at 40x as in HoVer-Net. Returns ``f1`` (detection), ``accuracy`` (type accuracy of paired nuclei),
    ``per_type`` {type: F1} for `type_ids` (default: types present in the truth), and counts ``tp, fp, fn``.
    Per-type F1 is ``2 tp_t / (2 tp_t + 2 fp_t + 2 fn_t + fp_d + fn_d)`` over pairs where truth or prediction
    is type t (the official ``tn`` term is always zero on that subset). Unlike the official script, images
    with no nuclei add no dummy nucleus at (0, 0). 0/0 gives NaN.
    """
    true_c = _as_image_list(true_centroids, 2)
    pred_c = _as_image_list(pred_centroids, 2)
    if len(true_c) != len(pred_c):
        raise ValueError(f"{len(true_c)} true images but {len(pred_c)} predicted images")
    with_types = true_types is not None and pred_types is not None
    true_t = _as_image_list(true_types, 1) if with_types else [np.zeros(len(c), np.int64) for c in true_c]
    pred_t = _as_image_list(pred_types, 1) if with_types else [np.zeros(len(c), np.int64) for c in pred_c]

    paired_true, paired_pred, unpaired_true, unpaired_pred = [], [], [], []
    for tc, tt, pc, pt in zip(true_c, true_t, pred_c, pred_t, strict=True):
        tt, pt = np.asarray(tt).reshape(-1).astype(np.int64), np.asarray(pt).reshape(-1).astype(np.int64)
        pairs, un_t, un_p = pair_coordinates(tc, pc, radius)
        paired_true.append(tt[pairs[:, 0]])
        paired_pred.append(pt[pairs[:, 1]])
        unpaired_true.append(tt[un_t])
        unpaired_pred.append(pt[un_p])
    p_true, p_pred = np.concatenate(paired_true), np.concatenate(paired_pred)
    u_true, u_pred = np.concatenate(unpaired_true), np.concatenate(unpaired_pred)

    tp, fp, fn = len(p_true), len(u_pred), len(u_true)
    result: dict[str, Any] = {
        "f1": ratio(2 * tp, 2 * tp + fp + fn, undefined=_NAN),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }
    if not with_types:
        return result
    result["accuracy"] = ratio(float((p_true == p_pred).sum()), tp, undefined=_NAN)
    if type_ids is None:
        type_ids = sorted(
            set(np.concatenate([np.asarray(t).reshape(-1) for t in true_t]).astype(int).tolist())
        )
    per_type: dict[str, float] = {}
    for t in type_ids:
        subset = (p_true == t) | (p_pred == t)
        st, sp = p_true[subset], p_pred[subset]
        tp_t = float(((st == t) & (sp == t)).sum())
        fp_t = float(((st != t) & (sp == t)).sum())
        fn_t = float(((st == t) & (sp != t)).sum())
        fp_d, fn_d = float((u_pred == t).sum()), float((u_true == t).sum())
        per_type[str(t)] = ratio(2 * tp_t, 2 * tp_t + 2 * fp_t + 2 * fn_t + fp_d + fn_d, undefined=_NAN)
    result["per_type"] = per_type
    return result


# segment/evaluate.py's name for it.
_nanmean = nanmean

__all__ = [
    "METRIC_KEYS",
    "aggregate",
    "binarize",
    "detection_f1",
    "instance_stats",
    "pair_coordinates",
    "pannuke_scores",
    "panoptic_quality",
    "remap_label",
]
