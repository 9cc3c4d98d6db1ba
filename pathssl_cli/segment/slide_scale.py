"""Whole-slide prediction at the model's magnification, on tissue only.

A slide region is read at `predict.mpp` (default: the training data's, 0.25 µm/px for CoNSeP and PanNuke) by
the rules `pathssl tile` uses (`tiling.slide.choose_level`): the coarsest pyramid level at least as fine as
the target, shrunk with area interpolation, or read as is within the tile tolerance. Unlike tiling, a target
finer than level 0 (a 20x slide for a 40x model) is allowed up to `MAX_ENLARGE` (2.5x): level 0 is enlarged
bilinearly, which is how HoVer-Net is applied to 20x slides, and the run says so. The slide's MPP follows the one
rule (`slides.readers.slide_mpp`: predict.mpp_override wins over metadata); a slide without MPP gets its error.

The tissue mask is `pathssl tile`'s detector (`tiling.tissue.tissue_mask`); chunks whose core holds no tissue
are skipped (their instance-map pixels stay 0), so glass costs nothing. Outputs keep level-0 coordinates: the
instance map is on the prediction grid, and JSON/GeoJSON geometry is mapped back with `to_level0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.console import info
from pathssl_cli.errors import SpecError
from pathssl_cli.segment.patches import pad_to


@dataclass(frozen=True)
class SlideScale:
    base_mpp: float  # µm/px of level 0
    mpp_source: str  # "metadata" or "override"
    mpp: float  # µm/px of the prediction grid
    level: int  # pyramid level read
    downsample: float  # of that level relative to level 0
    scale: float  # level-0 px per prediction px
    x0: float  # level-0 position of the grid's origin: a level pixel's corner, level px x downsample
    y0: float


# Enlarging level 0 further than this is refused: HoVer-Net is applied to 20x slides by a 2x enlargement, while a
# larger factor invents detail and, from a wrong MPP (1000 µm/px), plans a grid of petabytes.
MAX_ENLARGE = 2.5
# Tiles decoded for one window stay cached for the next (neighbouring windows overlap) up to this many bytes.
CACHE_BYTES = 64 * 2**20


class MppSlideReader:
    """A level-0 region of an open slide, read on a grid of `mpp` µm/px; `read(top, left, h, w)` in grid px
    with reflect padding at the region border, like the other segment readers.

    The grid lives on the chosen level's own pixels (read through `tiling.slide.LevelReader`, as `pathssl tile`
    reads, never through a level-0 `read_region`): its origin is the level pixel nearest the region's corner
    (`slides.readers.level_pixel`) and grid pixel (i, j) covers the level box [origin + j p, origin + (j+1) p)
    horizontally (p = level px per grid px), so grid px g is at level-0 x0 + g * scale exactly. Read as is when p
    is 1; else each grid pixel is computed from its exact fractional box (area mean when shrinking, bilinear at
    its centre when enlarging), so neighbouring windows join without seams.
    """

    def __init__(self, slide: Any, path: Path, region: tuple[int, int, int, int] | None, mpp: float,
                 mpp_override: float | None) -> None:
        from pathssl_cli.slides.readers import level_pixel, slide_mpp
        from pathssl_cli.tiling.slide import LevelReader, SlideError, choose_level

        self.slide = slide
        try:
            base_mpp, source = slide_mpp(slide, mpp_override, path)
        except SlideError as exc:  # tiling's message, with this command's field
            raise SpecError(f"{exc.reason}; set predict.mpp_override to its µm/px (level 0)", where=str(path)) \
                from None
        full_w, full_h = slide.dimensions
        x, y, w, h = region if region is not None else (0, 0, full_w, full_h)
        downsamples = tuple(float(d) for d in slide.level_downsamples)
        try:
            choice = choose_level(base_mpp, downsamples, mpp, 256)
            level, downsample = choice.level, choice.downsample
            grid_mpp = mpp if choice.resample else choice.level_mpp  # within tolerance: read as is
        except SlideError:
            level, downsample, grid_mpp = 0, downsamples[0], mpp
            factor = base_mpp / mpp
            if factor > MAX_ENLARGE:
                raise SpecError(
                    f"level 0 is {base_mpp:.4g} µm/px (from {source}) and predict.mpp {mpp} would enlarge it "
                    f"{factor:.2f}x ({round(w * factor)} x {round(h * factor)} px), beyond the {MAX_ENLARGE}x a "
                    "model can sensibly be applied at (a 20x slide for a 40x model is 2x): if the slide's MPP is "
                    "wrong, set predict.mpp_override to its level-0 µm/px; else choose a coarser predict.mpp",
                    where=str(path)) from None
            info(f"{path.name}: level 0 is {base_mpp:.4g} µm/px, coarser than predict.mpp {mpp}: enlarging "
                 f"{factor:.2f}x (bilinear)")
        self.level = LevelReader(slide, level)
        per_level = grid_mpp / (base_mpp * downsample)  # level px per grid px; 1 = read as is
        self.per_level_px = 1.0 if abs(per_level - 1) < 1e-9 else per_level
        self.origin = (level_pixel(x, downsample), level_pixel(y, downsample))  # in level px
        scale = grid_mpp / base_mpp
        self.geometry = SlideScale(base_mpp, source, grid_mpp, level, downsample, scale,
                                   self.origin[0] * downsample, self.origin[1] * downsample)
        self.region_level0 = (x, y, w, h)
        self.width, self.height = max(1, round(w / scale)), max(1, round(h / scale))

    @property
    def to_level0(self) -> tuple[float, float, float]:
        g = self.geometry
        return g.scale, g.x0, g.y0

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        t, l_ = max(top, 0), max(left, 0)
        b, r = min(top + height, self.height), min(left + width, self.width)
        if b <= t or r <= l_:
            return np.zeros((height, width, 3), np.uint8)
        ox, oy = self.origin
        step = self.per_level_px
        if step == 1.0:
            crop = self.level.read(ox + l_, oy + t, r - l_, b - t)
        else:
            crop = _resample(self.level, ox + l_ * step, oy + t * step, step, b - t, r - l_)
        self.level.bound_cache(CACHE_BYTES)
        if (t, l_, b, r) == (top, left, top + height, left + width):
            return crop
        return pad_to(crop, top - t, left - l_, height, width, reflect=True)


def _resample(level: Any, ax: float, ay: float, step: float, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) uint8 grid pixels whose boxes on `level` start at (ax, ay) level px and are `step` level px
    wide: the area mean of each box when shrinking (step > 1, OpenCV's INTER_AREA on fractional boxes), the
    bilinear sample at each box centre when enlarging. Only the level pixels these need are read."""
    shrink = step > 1
    spans = []
    for start, count, size in ((ax, cols, level.width), (ay, rows, level.height)):
        end = start + count * step
        if shrink:
            lo, hi = math.floor(start), math.ceil(end)
        else:  # the two neighbours of every centre, inside the level (edge pixels repeat there)
            lo = min(max(math.floor(start + 0.5 * step - 0.5), 0), size - 1)
            hi = max(min(math.floor(end - 0.5 * step - 0.5) + 2, size), lo + 1)
        spans.append((lo, hi))
    (x_lo, x_hi), (y_lo, y_hi) = spans
    block = level.read(x_lo, y_lo, x_hi - x_lo, y_hi - y_lo).astype(np.float32)
    along = _area_rows if shrink else _bilinear_rows
    # Separable, each pass along the first axis of a 2-D view, where gathering rows is a contiguous copy.
    height, width = block.shape[:2]
    by_rows = along(block.reshape(height, width * 3), ay - y_lo, step, rows).reshape(rows, width, 3)
    columns_first = np.ascontiguousarray(by_rows.transpose(1, 0, 2)).reshape(width, rows * 3)
    out = along(columns_first, ax - x_lo, step, cols).reshape(cols, rows, 3).transpose(1, 0, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _area_rows(block: np.ndarray, start: float, step: float, count: int) -> np.ndarray:
    """Means of the rows of `block` over [start + j step, start + (j+1) step), row k covering [k, k+1) and
    weighted by its overlap with the box: a few taps per output row (step < 2 between pyramid levels)."""
    n = block.shape[0]
    lo = start + step * np.arange(count)
    hi = lo + step
    first = np.floor(lo).astype(np.int64)
    out = np.zeros((count, block.shape[1]), np.float32)
    for tap in range(math.ceil(step) + 1):
        k = first + tap
        overlap = np.minimum(k + 1, hi) - np.maximum(k, lo)
        if not (overlap > 0).any():
            break
        weight = (np.clip(overlap, 0, None) / step).astype(np.float32)[:, None]
        out += weight * block[np.minimum(k, n - 1)]
    return out


def _bilinear_rows(block: np.ndarray, start: float, step: float, count: int) -> np.ndarray:
    """Rows of `block` interpolated linearly at the centres start + (j + 0.5) step (row k's centre is at k + 0.5),
    clamped to the block's edge rows."""
    n = block.shape[0]
    centres = np.clip(start + (np.arange(count) + 0.5) * step - 0.5, 0, n - 1)
    k = np.minimum(np.floor(centres).astype(np.int64), max(n - 2, 0))
    frac = (centres - k).astype(np.float32)[:, None]
    lower, upper = block[k], block[np.minimum(k + 1, n - 1)]
    return lower + frac * (upper - lower)


class ChunkTissue:
    """Which prediction chunks hold tissue, from `pathssl tile`'s tissue mask (level-0 geometry)."""

    def __init__(self, reader: MppSlideReader) -> None:
        from pathssl_cli.tiling.tissue import tissue_mask

        self.mask = tissue_mask(reader.slide, reader.geometry.base_mpp)
        self.reader = reader

    def area_mm2(self) -> float:
        x, y, w, h = self.reader.region_level0
        mpp = self.reader.geometry.base_mpp
        return self.mask.fraction(x, y, w, h) * w * h * mpp * mpp / 1e6

    def has_tissue(self, top: int, left: int, bottom: int, right: int) -> bool:
        g = self.reader.geometry
        return self.mask.fraction(g.x0 + left * g.scale, g.y0 + top * g.scale, (right - left) * g.scale,
                                  (bottom - top) * g.scale) > 0


def slide_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per input and in total: tissue area (mm², slides), nuclei, nuclei per mm², seconds per mm²."""
    keys = ("tissue_mm2", "nuclei", "nuclei_per_mm2", "seconds", "seconds_per_mm2", "chunks", "chunks_skipped",
            "mpp", "base_mpp", "level")
    per_input = {Path(r["input"]).name: {k: r[k] for k in keys if k in r} for r in results}
    area = sum(r.get("tissue_mm2", 0.0) for r in results)
    nuclei = sum(r["nuclei"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    total: dict[str, Any] = {"nuclei": nuclei, "seconds": seconds}
    if area > 0:
        total.update(tissue_mm2=area, nuclei_per_mm2=nuclei / area, seconds_per_mm2=seconds / area)
    return {"inputs": per_input, "total": total}
