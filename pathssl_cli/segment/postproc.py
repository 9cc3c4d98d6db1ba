"""HoVer-Net post-processing: marker-controlled watershed on NP + HV outputs, vectorised.

The pixel pipeline is the official `__proc_np_hv` (vqdang/hover_net, models/hovernet/post_proc.py), step by step:
1. foreground = NP probability >= `np_thresh` (0.5); 4-connected blobs under `min_size` (10) px removed;
2. each HV channel min-max normalised to [0, 1] over the whole tile (one global min/max per channel, as
   `cv2.normalize(NORM_MINMAX)` does in the official code), then Sobel along its axis with `sobel_ksize` (21);
3. each Sobel map min-max normalised and inverted; ``overall = max(sobel_h, sobel_v)``, zeroed off foreground;
4. energy = -GaussianBlur3x3((1 - overall) * foreground);
5. markers = foreground minus (overall >= `marker_thresh` (0.4)), holes filled, opened with a 5x5 ellipse,
   labelled, markers under `min_size` px removed;
6. watershed of the energy from the markers inside the foreground.

What is faster than the official code (identical instance maps on all 64 CoNSeP tiles we compared, at two
noise levels; the benchmark and tests check agreement):
- components are labelled with `cv2.connectedComponentsWithStats` (same numbering as `scipy.ndimage.label`),
  whose areas make small-object removal a table lookup; hole filling is one `cv2.floodFill` from the border;
- the Sobel responses are computed in float32 instead of float64; a pixel can only change if its value lies
  within float32 rounding of the 0.4 marker threshold;
- a foreground blob containing exactly one marker is flooded entirely by that marker (a masked watershed
  fills every pixel 4-connected to a seed), so watershed only runs on blobs with two or more markers, and
  marker pixels with no free neighbour are kept out of its priority queue (they flood nothing; only the
  order among seeds of equal priority, which scikit-image leaves to its heap, could in principle change);
- instance properties come from `scipy.ndimage.find_objects` and `np.bincount` (bbox, centroid, type votes)
  instead of one full-image mask per instance; only contours loop, on each instance's bbox crop.
Differences, on purpose: ids are renumbered 1..N (the official ids are the surviving marker labels, with gaps);
every instance is described (the official dict silently drops instances whose contour has < 3 points, while
keeping them in the map); `type_prob` is votes / pixels without the official +1e-6 in the denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

_MARKER_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


@dataclass
class Instance:
    """One predicted nucleus. Coordinates are pixels of the processed tile.

    bbox: (rmin, cmin, rmax, cmax), max exclusive (slice-ready), as HoVer-Net's `get_bounding_box`.
    centroid: (x, y) centre of mass. contour: (K, 2) int32 x, y outer boundary (cv2 CHAIN_APPROX_SIMPLE).
    type: majority-vote class (background 0 loses to the runner-up when present); None without NC output.
    type_prob: fraction of the instance's pixels voting for `type`; None without NC output.
    """

    id: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    contour: np.ndarray
    type: int | None = None
    type_prob: float | None = None


def _label_without_small(binary: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """4-connected components numbered 1..K in raster order, components under `min_size` px dropped.

    `cv2.connectedComponentsWithStats` numbers components like `scipy.ndimage.label` and returns their areas,
    so small-object removal is one table lookup (skimage `remove_small_objects`: size < min_size goes).
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False
    if keep[1:].all():
        return labels, n - 1
    lookup = np.zeros(n, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels], int(keep.sum())


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` (4-connected background) by one flood fill from the border."""
    height, width = binary.shape
    canvas = np.zeros((height + 2, width + 2), dtype=np.uint8)
    canvas[1:-1, 1:-1] = binary
    flood_mask = np.zeros((height + 4, width + 4), dtype=np.uint8)
    cv2.floodFill(canvas, flood_mask, (0, 0), 2, flags=4)
    return canvas[1:-1, 1:-1] != 2


def _minmax(x: np.ndarray) -> np.ndarray:
    return cv2.normalize(x, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def instance_map(
    np_prob: np.ndarray, hv: np.ndarray, *,
    np_thresh: float = 0.5, marker_thresh: float = 0.4, sobel_ksize: int = 21, min_size: int = 10,
) -> np.ndarray:
    """Instance map (H, W) int32, ids 1..N, from NP probability (H, W) and HV maps (2, H, W)."""
    np_prob = np.asarray(np_prob, dtype=np.float32)
    hv = np.asarray(hv, dtype=np.float32)
    if np_prob.ndim != 2 or hv.shape != (2, *np_prob.shape):
        raise ValueError(f"expected np_prob (H, W) and hv (2, H, W), got {np_prob.shape} and {hv.shape}")

    blobs, n_blobs = _label_without_small(np_prob >= np_thresh, min_size)
    if n_blobs == 0:
        return np.zeros(np_prob.shape, dtype=np.int32)
    fg = (blobs > 0).astype(np.int32)

    sobel_h = cv2.Sobel(_minmax(hv[0]), cv2.CV_32F, 1, 0, ksize=sobel_ksize)
    sobel_v = cv2.Sobel(_minmax(hv[1]), cv2.CV_32F, 0, 1, ksize=sobel_ksize)
    overall = np.maximum(1 - _minmax(sobel_h), 1 - _minmax(sobel_v))
    overall = overall - (1 - fg)
    overall[overall < 0] = 0
    energy = -cv2.GaussianBlur((1.0 - overall) * fg, (3, 3), 0)

    marker = fg.astype(bool) & ~(overall >= marker_thresh)
    marker = _fill_holes(marker).astype(np.uint8)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, _MARKER_KERNEL)
    markers, n_markers = _label_without_small(marker, min_size)
    return _flood(energy, markers, n_markers, blobs, n_blobs)


def _flood(energy: np.ndarray, markers: np.ndarray, n_markers: int, blobs: np.ndarray, n_blobs: int) -> np.ndarray:
    """Masked watershed, run only where a foreground blob holds two or more markers."""
    markers = np.where(blobs > 0, markers, 0)  # seeds outside the mask never flood anything
    seeded = markers > 0
    # Which markers sit in which blob: a dense (blob, marker) occupancy table, small for tiles.
    occupied = np.bincount(
        blobs[seeded].astype(np.int64) * (n_markers + 1) + markers[seeded], minlength=(n_blobs + 1) * (n_markers + 1),
    ).reshape(n_blobs + 1, n_markers + 1) > 0
    markers_per_blob = occupied.sum(axis=1)
    blob_to_marker = np.where(markers_per_blob == 1, np.argmax(occupied, axis=1), 0).astype(np.int32)
    out = blob_to_marker[blobs]

    is_multi = markers_per_blob >= 2
    if is_multi.any():
        multi_mask = is_multi[blobs]
        rows = np.flatnonzero(multi_mask.any(axis=1))
        cols = np.flatnonzero(multi_mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        crop_mask = multi_mask[box]
        crop_markers = np.where(crop_mask, markers[box], 0)
        # Marker pixels with no free 4-neighbour are popped by the watershed without flooding anything: leaving
        # them out of its mask shrinks its priority queue, the biggest cost of the whole post-processing.
        free = (~crop_mask) | (crop_markers > 0)
        interior = (crop_markers > 0) & (
            cv2.erode(free.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=1) > 0)
        flood_mask = crop_mask & ~interior
        flooded = watershed(energy[box], markers=np.where(flood_mask, crop_markers, 0), mask=flood_mask)
        flooded[interior] = crop_markers[interior]
        out[box][crop_mask] = flooded[crop_mask]
    # Markers whose blob was flooded by another id cannot exist; renumber surviving ids 1..N in marker order.
    present = np.zeros(n_markers + 1, dtype=bool)
    present[out.ravel()] = True
    present[0] = False
    if present[1:].all():
        return out
    lookup = np.zeros(n_markers + 1, dtype=np.int32)
    lookup[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lookup[out]


def describe_instances(inst_map: np.ndarray, type_prob: np.ndarray | None = None) -> dict[int, Instance]:
    """Bbox, centroid, contour and (with NC softmax (C, H, W)) majority type of every instance of `inst_map`."""
    inst_map = np.asarray(inst_map)
    n = int(inst_map.max(initial=0))
    if n == 0:
        return {}
    height, width = inst_map.shape
    flat = inst_map.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Sums of column / row indices per id, without materialising index grids for every pixel.
        row_sums = np.bincount(flat,
                               weights=np.repeat(np.arange(height, dtype=np.float64), width), minlength=n + 1)
        col_sums = np.bincount(flat, weights=np.tile(np.arange(width, dtype=np.float64), height), minlength=n + 1)
        cx, cy = col_sums / area, row_sums / area

    types = probs = None
    if type_prob is not None:
        type_prob = np.asarray(type_prob)
        if type_prob.shape[1:] != inst_map.shape:
            raise ValueError(f"type_prob {type_prob.shape} does not match the maps {inst_map.shape}")
        types, probs = _vote_types(inst_map, np.argmax(type_prob, axis=0), type_prob.shape[0], area)

    instances: dict[int, Instance] = {}
    for idx, box in enumerate(ndimage.find_objects(inst_map), start=1):
        if box is None:
            continue
        crop = np.zeros((box[0].stop - box[0].start + 2, box[1].stop - box[1].start + 2), dtype=np.uint8)
        crop[1:-1, 1:-1] = inst_map[box] == idx  # a zero border keeps contours off the crop's edge
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=len).reshape(-1, 2).astype(np.int32)
        contour += np.array([box[1].start - 1, box[0].start - 1], dtype=np.int32)
        instances[idx] = Instance(
            id=idx,
            bbox=(box[0].start, box[1].start, box[0].stop, box[1].stop),
            centroid=(float(cx[idx]), float(cy[idx])),
            contour=contour,
            type=None if types is None else int(types[idx]),
            type_prob=None if probs is None else float(probs[idx]),
        )
    return instances


def _vote_types(
    inst_map: np.ndarray, pixel_type: np.ndarray, n_types: int, area: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Majority type per instance; background (0) loses to the most voted other type when there is one.

    Ties go to the smaller type id, as the official stable sort of `np.unique`'s ascending output does.
    """
    n = len(area) - 1
    votes = np.bincount(
        inst_map.ravel().astype(np.int64) * n_types + pixel_type.ravel(), minlength=(n + 1) * n_types,
    ).reshape(n + 1, n_types)
    best = np.argmax(votes, axis=1)
    if n_types > 1:
        best_non_bg = 1 + np.argmax(votes[:, 1:], axis=1)
        has_non_bg = votes[:, 1:].max(axis=1) > 0
        best = np.where((best == 0) & has_non_bg, best_non_bg, best)
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = votes[np.arange(n + 1), best] / area
    return best, prob


def hovernet_postprocess(
    np_prob: np.ndarray, hv: np.ndarray, type_prob: np.ndarray | None = None, *,
    np_thresh: float = 0.5, marker_thresh: float = 0.4, sobel_ksize: int = 21, min_size: int = 10,
) -> tuple[np.ndarray, dict[int, Instance]]:
    """HoVer-Net post-processing of one tile's outputs.

    Args:
        np_prob: (H, W) foreground probability (softmax channel 1 of the NP branch).
        hv: (2, H, W) predicted horizontal (x) and vertical (y) maps.
        type_prob: optional (C, H, W) NC softmax including background class 0.
        np_thresh, marker_thresh, sobel_ksize, min_size: HoVer-Net's values (0.5, 0.4, 21, 10).

    Returns:
        (instance map (H, W) int32 with ids 1..N, {id: Instance}).
    """
    inst = instance_map(
        np_prob, hv, np_thresh=np_thresh, marker_thresh=marker_thresh, sobel_ksize=sobel_ksize, min_size=min_size,
    )
    return inst, describe_instances(inst, type_prob)
