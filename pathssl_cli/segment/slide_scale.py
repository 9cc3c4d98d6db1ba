"""Whole-slide prediction at the model's magnification, on tissue only.

A slide region is read at `predict.mpp` (default: the training data's, 0.25 µm/px for CoNSeP and PanNuke) by
the rules `pathssl tile` uses (`tiling.slide.choose_level`): the coarsest pyramid level at least as fine as
the target, shrunk with area interpolation, or read as is within the tile tolerance. Unlike tiling, a target
finer than level 0 (a 20x slide for a 40x model) is allowed: level 0 is enlarged bilinearly, which is how
HoVer-Net is applied to 20x slides, and the run says so. A slide without MPP gets tiling's error and fix.

The tissue mask is `pathssl tile`'s detector (`tiling.tissue.tissue_mask`); chunks whose core holds no tissue
are skipped (their instance-map pixels stay 0), so glass costs nothing. Outputs keep level-0 coordinates: the
instance map is on the prediction grid, and JSON/GeoJSON geometry is mapped back with `to_level0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
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
    x0: int  # region origin in level-0 px
    y0: int


class MppSlideReader:
    """A level-0 region of an open slide, read on a grid of `mpp` µm/px; `read(top, left, h, w)` in grid px
    with reflect padding at the region border, like the other segment readers."""

    def __init__(self, slide: Any, path: Path, region: tuple[int, int, int, int] | None, mpp: float,
                 mpp_override: float | None) -> None:
        from pathssl_cli.tiling.slide import SlideError, choose_level, slide_mpp

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
            info(f"{path.name}: level 0 is {base_mpp:.4g} µm/px, coarser than predict.mpp {mpp}: enlarging "
                 f"{base_mpp / mpp:.2f}x (bilinear)")
        scale = grid_mpp / base_mpp
        self.geometry = SlideScale(base_mpp, source, grid_mpp, level, downsample, scale, x, y)
        self.region_level0 = (x, y, w, h)
        self.width, self.height = max(1, round(w / scale)), max(1, round(h / scale))

    @property
    def to_level0(self) -> tuple[float, float, float]:
        g = self.geometry
        return g.scale, float(g.x0), float(g.y0)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        g = self.geometry
        t, l_ = max(top, 0), max(left, 0)
        b, r = min(top + height, self.height), min(left + width, self.width)
        if b <= t or r <= l_:
            return np.zeros((height, width, 3), np.uint8)
        per_level_px = g.scale / g.downsample  # level px per grid px
        size = (max(1, round((r - l_) * per_level_px)), max(1, round((b - t) * per_level_px)))
        crop = np.asarray(self.slide.read_region((round(g.x0 + l_ * g.scale), round(g.y0 + t * g.scale)),
                                                 g.level, size, as_array=True))[..., :3]
        if crop.shape[:2] != (b - t, r - l_):
            shrink = crop.shape[0] > b - t
            crop = cv2.resize(crop, (r - l_, b - t), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if (t, l_, b, r) == (top, left, top + height, left + width):
            return crop
        return pad_to(crop, top - t, left - l_, height, width, reflect=True)


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
