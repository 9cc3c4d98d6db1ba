"""Opening slides, their resolution, the pyramid level for a field of view, and tile-aligned reads.

Reads go through the slide's own compressed tiles: each internal tile a read needs is decoded
once, kept while later reads in the same row band may need it, and dropped after. That is what
makes tiling fast (no `read_region` per output tile) and keeps memory bounded (never a whole level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Slides are opened, and their MPP resolved, in one place for every command (pathssl_cli.slides); re-exported for
# the tiler.
from pathssl_cli.slides.readers import SlideError, open_slide, slide_mpp

__all__ = ["LevelChoice", "LevelReader", "SlideError", "choose_level", "open_slide", "slide_mpp", "standalone_jpeg"]

# A level whose µm/px is within 2% of the target is used as is: scanners report e.g. 0.2527 for a
# nominal 0.25 µm/px, and resampling by 1% costs time and blurs while changing nothing visible.
MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class LevelChoice:
    """How to get tiles at `target_mpp`: read `read_size` px at `level`, then resize to the tile size."""

    level: int
    level_mpp: float
    downsample: float  # of `level` relative to level 0
    target_mpp: float
    read_size: int  # side of the region read at `level` for one output tile
    resample: bool


def choose_level(
    base_mpp: float,
    downsamples: tuple[float, ...],
    target_mpp: float,
    tile_size: int,
    tolerance: float = MPP_TOLERANCE,
) -> LevelChoice:
    """Pick the coarsest level that is at least as fine as the target (within `tolerance`).

    Reading a finer level and shrinking with area interpolation is exact averaging; reading a
    coarser one would mean inventing detail, so a target finer than level 0 is an error.
    """
    candidates = [
        (i, base_mpp * ds)
        for i, ds in enumerate(downsamples)
        if base_mpp * ds <= target_mpp * (1 + tolerance)
    ]
    if not candidates:
        raise SlideError(
            f"target {target_mpp} µm/px is finer than the slide's finest level ({base_mpp:.4g} µm/px)"
            " and would need upsampling",
            "drop that field of view or check the slide's MPP",
        )
    level, level_mpp = max(candidates, key=lambda c: c[1])
    ratio = target_mpp / level_mpp
    if abs(ratio - 1) <= tolerance:
        return LevelChoice(level, level_mpp, downsamples[level], target_mpp, tile_size, False)
    return LevelChoice(level, level_mpp, downsamples[level], target_mpp, round(tile_size * ratio), True)


def _level_page(slide: Any, level: int) -> Any | None:
    """The tifffile page holding `level` when it is a plain tiled RGB(A) page, else None."""
    if not hasattr(slide, "ts_tifffile"):  # OpenSlide and DICOM slides read through their own library
        return None
    try:
        series = slide.ts_tifffile.series[slide.properties.get("tiffslide.series-index", 0)]
        page = series.levels[level].keyframe
    except (IndexError, AttributeError, KeyError):
        return None
    width, height = slide.level_dimensions[level]
    if not page.is_tiled or page.imagewidth != width or page.imagelength != height:
        return None
    if (
        page.samplesperpixel not in (3, 4)
        or page.planarconfig != 1
        or page.dtype != np.uint8
        or page.imagedepth > 1
    ):
        return None
    return page


class LevelReader:
    """Region reads at one pyramid level through a cache of decoded internal tiles.

    Reads must come in non-decreasing row order (call `forget_above(y)` to drop tiles no longer
    needed); then every internal tile is decoded at most once. Uses tifffile's pages directly when
    the level is a tiled page (any codec tifffile knows: JPEG, JPEG2000, LZW, ...), the zarr
    view of tiffslide for its other layouts (stripped pages, ...), and the reader's own `read_level`
    for OpenSlide and DICOM slides, with the same caching.
    """

    def __init__(self, slide: Any, level: int) -> None:
        self.level = level
        self.width, self.height = slide.level_dimensions[level]
        self.page = _level_page(slide, level)
        if self.page is not None:
            self.tile_h, self.tile_w = self.page.tilelength, self.page.tilewidth
            self._fh = self.page.parent.filehandle
            self._array = None
        elif hasattr(slide, "zarr_group"):
            # Other layouts: 512 px virtual tiles read through tiffslide's zarr view.
            self._array = slide.zarr_group[str(level)]
            self.tile_h = self.tile_w = 512
        else:
            self._array = None
            self._read_level = slide.read_level
            self.tile_h = self.tile_w = int(getattr(slide, "tile_size", 512))
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.decoded = 0

    def raw_tile(self, row: int, col: int) -> bytes:
        """Compressed bytes of one internal tile (tiled pages only)."""
        index = row * self.tiles_across + col
        self._fh.seek(self.page.dataoffsets[index])
        return self._fh.read(self.page.databytecounts[index])

    def _decode(self, row: int, col: int) -> np.ndarray:
        self.decoded += 1
        if self.page is not None:
            index = row * self.tiles_across + col
            if self.page.databytecounts[index] == 0:
                raise SlideError(
                    f"level {self.level}: internal tile ({row}, {col}) has no data",
                    "the file is probably truncated: copy or download it again",
                )
            data = self.raw_tile(row, col)
            if len(data) < self.page.databytecounts[index]:
                raise SlideError(
                    f"level {self.level}: internal tile ({row}, {col}) is cut short (truncated file)",
                    "copy or download the slide again",
                )
            try:
                tile = self.page.decode(data, index, jpegtables=self.page.jpegtables)[0]
            except Exception as exc:
                raise SlideError(
                    f"level {self.level}: cannot decode internal tile ({row}, {col}): {exc}",
                    "the file is corrupt or uses a codec imagecodecs lacks",
                ) from None
            return np.asarray(tile).reshape(self.tile_h, self.tile_w, -1)[..., :3]
        y0, x0 = row * self.tile_h, col * self.tile_w
        try:
            if self._array is None:
                h, w = min(self.tile_h, self.height - y0), min(self.tile_w, self.width - x0)
                return self._read_level(self.level, x0, y0, w, h)
            block = np.asarray(self._array[y0 : y0 + self.tile_h, x0 : x0 + self.tile_w])
        except Exception as exc:
            raise SlideError(f"level {self.level}: cannot read region at ({x0}, {y0}): {exc}") from None
        return block.reshape(block.shape[0], block.shape[1], -1)[..., :3]

    def tile(self, row: int, col: int) -> np.ndarray:
        key = (row, col)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._decode(row, col)
        return found

    def forget_above(self, y: int) -> None:
        """Drop cached tiles that lie wholly above level row `y`."""
        first_row = y // self.tile_h
        for key in [k for k in self._cache if k[0] < first_row]:
            del self._cache[key]

    def bound_cache(self, max_bytes: int) -> None:
        """For reads in no particular order (segment predict's windows): drop every cached tile once they
        hold more than `max_bytes`, so memory stays bounded while neighbouring reads still share tiles."""
        if sum(tile.nbytes for tile in self._cache.values()) > max_bytes:
            self._cache.clear()

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 region at this level; pixels outside the level are white."""
        inside = x >= 0 and y >= 0 and x + width <= self.width and y + height <= self.height
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        x_end, y_end = min(x + width, self.width), min(y + height, self.height)
        for row in range(max(y, 0) // self.tile_h, (y_end - 1) // self.tile_h + 1 if y_end > 0 else 0):
            ty = row * self.tile_h
            for col in range(max(x, 0) // self.tile_w, (x_end - 1) // self.tile_w + 1 if x_end > 0 else 0):
                tx = col * self.tile_w
                tile = self.tile(row, col)
                sy0, sy1 = max(y, ty), min(y_end, ty + tile.shape[0])
                sx0, sx1 = max(x, tx), min(x_end, tx + tile.shape[1])
                if sy1 > sy0 and sx1 > sx0:
                    out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        return out


def standalone_jpeg(reader: LevelReader, row: int, col: int) -> bytes | None:
    """The internal tile as a self-contained JPEG file that any decoder shows in the right colours, or None.

    Possible when the page stores JPEG in YCbCr (the JFIF default); abbreviated streams get their
    shared tables spliced in. Aperio's RGB-coded JPEG would show false colours, so it is refused.
    """
    page = reader.page
    if page is None or page.compression != 7 or page.photometric != 6 or page.samplesperpixel != 3:
        return None
    data = reader.raw_tile(row, col)
    tables = page.jpegtables
    if tables:  # tables = SOI ... EOI; tile = SOI ... EOI → SOI tables tile-body
        data = bytes(tables[:-2]) + data[2:]
    return data
