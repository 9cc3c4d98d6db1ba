"""PanNuke mPQ and bPQ as TissueImageAnalytics/PanNuke-metrics (`run.py`) computes them, but for SQ's epsilon.

The one difference: the official `get_fast_pq` divides SQ by ``tp + 1e-6``, ours by ``tp`` (see `pq.py`). Each
image's class PQ and bPQ is larger by the factor ``(tp + 1e-6) / tp`` of that image and class (relative ``1e-6 /
tp``); the means over classes, images and tissues therefore differ from the official ones by less than 1e-6.
The aggregation below (which images, classes and tissues enter each mean) is the official one.

For each image:
- bPQ of the image: PQ of the binarised maps (all five nucleus channels merged into one instance map);
- PQ of class c: PQ of channel c alone (ids remapped to 1..N);
- an image whose *truth* has no nucleus of a class gets NaN for that class and is skipped by the means. So a
  false positive of a class that is absent from the truth is never penalised: this is the official behaviour;
- mPQ of the image: mean of its non-NaN class PQs.
Per tissue: the mean of its images' mPQ (and bPQ). The reported mPQ/bPQ are the mean over tissues present in
the data (the official list of 19 tissues gives NaN for absent ones, which `nanmean` skips: the same thing).
Per-class PQ (``per_class``) is the mean over all images of that class's PQ, as the official printout.

Masks are (N, H, W, 6): channels 0-4 Neoplastic, Inflammatory, Connective, Dead, Epithelial (non-neoplastic);
channel 5 is background and ignored. Arrays may be memory-mapped: images are read one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pathssl_cli.segment.pq import nanmean, panoptic_quality, remap_label

PANNUKE_CLASSES: tuple[str, ...] = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")


def binarize(masks: np.ndarray) -> np.ndarray:
    """Merge per-class instance channels (H, W, C) into one instance map (H, W) int32, as PanNuke's
    `binarize`.

    Channels are taken in order, each instance getting the next id; where channels overlap the later channel
    wins (the official loop overwrites). Ids may be non-contiguous after an overwrite; metrics remap them.
    """
    out = np.zeros(masks.shape[:2], dtype=np.int32)
    offset = 0
    for channel in range(masks.shape[2]):
        ids = remap_label(np.asarray(masks[:, :, channel]))
        inside = ids > 0
        out[inside] = ids[inside] + offset
        offset += int(ids.max(initial=0))
    return out


def pannuke_scores(
    true_masks: np.ndarray,
    pred_masks: np.ndarray,
    tissue_types: Sequence[str],
    match_iou: float = 0.5,
) -> dict[str, Any]:
    """mPQ, bPQ, per tissue, per class and per image for PanNuke-layout masks (N, H, W, >=5).

    Returns ``{"mpq", "bpq", "per_tissue": {tissue: {"mpq", "bpq", "n_images"}}, "per_class": {name: pq},
    "per_image": [{"tissue", "mpq", "bpq", "<class>": pq, ...}]}``; NaN marks values with nothing to score.
    """
    n_images = true_masks.shape[0]
    if pred_masks.shape[:3] != true_masks.shape[:3]:
        raise ValueError(f"true masks {true_masks.shape} and predicted masks {pred_masks.shape} differ")
    if len(tissue_types) != n_images:
        raise ValueError(f"{len(tissue_types)} tissue types for {n_images} images")
    n_classes = len(PANNUKE_CLASSES)

    per_image: list[dict[str, Any]] = []
    for i in range(n_images):
        true_i = np.asarray(true_masks[i])
        pred_i = np.asarray(pred_masks[i])
        true_bin = binarize(true_i[:, :, :n_classes])
        pred_bin = binarize(pred_i[:, :, :n_classes])
        bpq = panoptic_quality(true_bin, pred_bin, match_iou)["pq"] if true_bin.any() else float("nan")
        row: dict[str, Any] = {"tissue": str(tissue_types[i])}
        class_pq = []
        for c, name in enumerate(PANNUKE_CLASSES):
            true_c = true_i[:, :, c].astype(np.int32)
            pq = (
                panoptic_quality(true_c, pred_i[:, :, c].astype(np.int32), match_iou)["pq"]
                if true_c.any()
                else float("nan")
            )
            row[name] = pq
            class_pq.append(pq)
        row["mpq"] = nanmean(class_pq)
        row["bpq"] = bpq
        per_image.append(row)

    per_tissue: dict[str, dict[str, Any]] = {}
    for tissue in sorted({row["tissue"] for row in per_image}):
        rows = [row for row in per_image if row["tissue"] == tissue]
        per_tissue[tissue] = {
            "mpq": nanmean([r["mpq"] for r in rows]),
            "bpq": nanmean([r["bpq"] for r in rows]),
            "n_images": len(rows),
        }
    return {
        "mpq": nanmean([t["mpq"] for t in per_tissue.values()]),
        "bpq": nanmean([t["bpq"] for t in per_tissue.values()]),
        "per_tissue": per_tissue,
        "per_class": {name: nanmean([r[name] for r in per_image]) for name in PANNUKE_CLASSES},
        "per_image": per_image,
    }
