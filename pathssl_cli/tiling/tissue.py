"""Tissue detection on a low-resolution image of the slide, and per-tile tissue fractions.

HSV saturation → blur → Otsu → morphological clean-up → hole filling → minimum-area filter, as in
CLAM and most WSI pipelines: stained tissue is saturated, glass and background are grey or white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pathssl_cli.tiling.slide import LevelReader

# The mask is computed at about this resolution: a 224 px tile at 0.5 µm/px spans 28 mask pixels,
# enough for a tissue fraction, while a 100k px slide's mask stays ~6k px across.
MASK_MPP = 4.0
# ... unless the slide is so large that the mask would exceed this many pixels across: then the mask
# gets coarser, so that its memory (~20 bytes per mask pixel while detecting) stays bounded.
MASK_MAX_SIDE = 4096
# Otsu splits glass from stain, but where most tissue is strongly stained it lumps pale tissue
# (mucus, fat septa) with glass, so the threshold is capped; on an empty slide Otsu splits noise,
# so it is floored (glass scans at a saturation of about 0-5 out of 255).
MIN_SATURATION = 8
MAX_THRESHOLD = 20
CLOSE_UM = 48.0  # bridges fat cells (~60 µm) whose thin septa vanish at mask resolution
OPEN_UM = 16.0
MIN_AREA_UM2 = 20_000.0  # drop specks smaller than ~140 µm square (dust, debris)


@dataclass
class TissueMask:
    """Boolean mask of a whole slide, where one mask pixel covers `scale` level-0 pixels per side."""

    mask: np.ndarray
    scale: float
    thumbnail: np.ndarray  # RGB uint8, same grid as `mask`

    def __post_init__(self) -> None:
        # Summed-area table: the tissue fraction of any rectangle in O(1).
        self._integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_32S)

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Tissue fraction of a level-0 rectangle, with mask pixels counted by their centre."""
        h, w = self.mask.shape
        if x + width <= 0 or y + height <= 0 or x >= w * self.scale or y >= h * self.scale:
            return 0.0
        x0 = min(max(round(x / self.scale), 0), w)
        y0 = min(max(round(y / self.scale), 0), h)
        x1 = min(max(round((x + width) / self.scale), x0 + 1), w)
        y1 = min(max(round((y + height) / self.scale), y0 + 1), h)
        if x1 <= x0 or y1 <= y0:
            return 0.0
        s = self._integral
        total = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return float(total / ((y1 - y0) * (x1 - x0)))

    def grid_fractions(self, xs: np.ndarray, ys: np.ndarray, extent: float) -> np.ndarray:
        """`fraction` of each square (x, y, extent, extent) for x in `xs`, y in `ys`; (len(ys), len(xs))."""
        h, w = self.mask.shape

        def bounds(starts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            starts = np.asarray(starts, np.float64)
            lo = np.clip(np.round(starts / self.scale), 0, size).astype(np.int64)
            hi = np.clip(np.maximum(np.round((starts + extent) / self.scale), lo + 1), None, size).astype(
                np.int64
            )
            valid = (starts + extent > 0) & (starts < size * self.scale) & (hi > lo)
            return lo, hi, valid

        x0, x1, x_ok = bounds(xs, w)
        y0, y1, y_ok = bounds(ys, h)
        s = self._integral
        total = s[y1][:, x1] - s[y0][:, x1] - s[y1][:, x0] + s[y0][:, x0]
        area = np.maximum((y1 - y0)[:, None] * (x1 - x0)[None, :], 1)
        return np.where(y_ok[:, None] & x_ok[None, :], total / area, 0.0)


def _blurred_saturation(rgb: np.ndarray) -> np.ndarray:
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    return cv2.medianBlur(saturation, 5)  # removes sensor noise and thin pen strokes


def _threshold(saturation: np.ndarray) -> float:
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(np.clip(otsu, MIN_SATURATION, MAX_THRESHOLD))


def saturation_threshold(rgb: np.ndarray) -> float:
    """The HSV saturation (0-255) above which `detect_tissue` calls a pixel of this thumbnail tissue."""
    return _threshold(_blurred_saturation(rgb))


def detect_tissue(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Boolean tissue mask of an RGB image at `mpp` µm/px (a thumbnail)."""
    saturation = _blurred_saturation(rgb)
    mask = saturation > _threshold(saturation)
    # Closing joins tissue split by pale regions (fat, mucus, tears); opening removes specks.
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(CLOSE_UM / mpp))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(OPEN_UM / mpp))
    mask = _fill_holes(mask > 0)
    _count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] * mpp * mpp >= MIN_AREA_UM2
    keep[0] = False  # label 0 is the background
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not reachable from the image border is a hole (fat, lumen, tear) inside tissue."""
    padded = np.pad(mask, 1).astype(np.uint8)
    outside = padded.copy()
    cv2.floodFill(outside, None, (0, 0), 2)
    return (outside != 2)[1:-1, 1:-1]


def _disk(radius: float) -> np.ndarray:
    r = max(round(radius), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def slide_thumbnail(slide: Any, base_mpp: float, target_mpp: float = MASK_MPP) -> tuple[np.ndarray, float]:
    """RGB image of the whole slide at about `target_mpp`, read band by band (bounded memory).

    Returns the image and its scale (level-0 pixels per thumbnail pixel).
    """
    downsamples = slide.level_downsamples
    wanted = target_mpp / base_mpp
    level = max((i for i, ds in enumerate(downsamples) if ds <= wanted), default=0)
    reader = LevelReader(slide, level)
    factor = max(wanted / downsamples[level], 1.0)  # further shrink of that level
    out_w = max(round(reader.width / factor), 1)
    out_h = max(round(reader.height / factor), 1)
    thumb = np.empty((out_h, out_w, 3), np.uint8)
    band_rows = max(math.ceil(reader.tile_h / factor), 1)  # whole output rows per band of internal tiles
    for oy in range(0, out_h, band_rows):
        oy1 = min(oy + band_rows, out_h)
        y0, y1 = round(oy * reader.height / out_h), round(oy1 * reader.height / out_h)
        band = reader.read(0, y0, reader.width, max(y1 - y0, 1))
        thumb[oy:oy1] = cv2.resize(band, (out_w, oy1 - oy), interpolation=cv2.INTER_AREA)
        reader.forget_above(y1)
    scale = slide.dimensions[0] / out_w
    return thumb, scale


def tissue_mask(slide: Any, base_mpp: float) -> TissueMask:
    long_side_um = max(slide.dimensions) * base_mpp
    thumb, scale = slide_thumbnail(slide, base_mpp, max(MASK_MPP, long_side_um / MASK_MAX_SIDE))
    return TissueMask(detect_tissue(thumb, base_mpp * scale), scale, thumb)
