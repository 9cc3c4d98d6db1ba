"""Tiling one slide: tissue mask → tile grid per field of view → JPEG tiles in the slide's own shards, then its
part file. One slide is one unit of work (and of resume); `tile_slide` never raises for a bad slide, it
records why in its `SlideResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import tiffslide

from pathssl_cli.fileio import atomic_write
from pathssl_cli.tiling import store
from pathssl_cli.tiling.slide import (
    LevelReader,
    SlideError,
    choose_level,
    open_slide,
    slide_mpp,
    standalone_jpeg,
)
from pathssl_cli.tiling.tissue import TissueMask, tissue_mask

WHITE_LEVEL = 220  # a pixel with all of R, G, B at or above this is glass/fat
BLACK_LEVEL = 35  # a pixel with all of R, G, B at or below this is ink/fold/padding
QC_COLOURS = [(0, 160, 0), (0, 90, 220), (220, 120, 0), (200, 0, 200)]  # RGB per field of view


@dataclass
class TileSettings:
    """What a worker needs; a plain picklable copy of the spec's tiling fields."""

    store_dir: Path
    mpps: list[float]
    size: int
    min_tissue: float
    max_white: float
    max_black: float
    jpeg_quality: int
    tiles_per_shard: int
    qc: bool
    mpp_override: float | None
    reader: str = "auto"  # slide library: auto | tiffslide | openslide | dicom

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the tiles; a store must not mix two of them."""
        return {
            "mpp": self.mpps,
            "size": self.size,
            "min_tissue": self.min_tissue,
            "max_white": self.max_white,
            "max_black": self.max_black,
            "jpeg_quality": self.jpeg_quality,
            # Readers decode differently and may even pick other levels of one file (OpenSlide sees one level
            # of the OME pyramid where tiffslide sees three); the override now replaces every slide's MPP.
            "reader": self.reader,
            "mpp_override": self.mpp_override,
        }


@dataclass
class SlideResult:
    path: str
    slide_id: str
    status: str  # done | skipped (complete before) | busy (another process had it) | failed
    tiles: dict[str, int] = field(default_factory=dict)  # per field of view (µm/px as text)
    error: str = ""
    fix: str = ""
    seconds: float = 0.0
    copied: int = 0  # tiles whose compressed bytes were passed through unchanged
    notes: list[str] = field(default_factory=list)  # fields of view this slide cannot give, and why
    reader: str = ""  # "<library> <version>" that decoded this slide
    mpp: float | None = None  # level-0 µm/px used
    mpp_source: str = ""  # metadata | override (input.mpp_override) | csv (the slide CSV's mpp column)


def _encode(rgb: np.ndarray, quality: int) -> bytes:
    # libjpeg-turbo through imagecodecs takes RGB as is (OpenCV would need a BGR copy first).
    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=quality))


def _background_fractions(rgb: np.ndarray) -> tuple[float, float]:
    """Fractions of near-white and near-black pixels, on one pixel in 64 (~800 samples: ±2%, plenty
    against thresholds like 0.8).

    Element-wise minimum/maximum of the channels: numpy's reduction over a length-3 axis is ~10x slower.
    """
    r, g, b = rgb[::8, ::8, 0], rgb[::8, ::8, 1], rgb[::8, ::8, 2]
    white = float(np.count_nonzero(np.minimum(np.minimum(r, g), b) >= WHITE_LEVEL)) / r.size
    black = float(np.count_nonzero(np.maximum(np.maximum(r, g), b) <= BLACK_LEVEL)) / r.size
    return white, black


def _tile_field_of_view(
    slide: Any,
    path: Path,
    sid: str,
    base_mpp: float,
    target: float,
    mask: TissueMask,
    settings: TileSettings,
    writer: store.SlideShardWriter,
) -> tuple[int, int, list[tuple]]:
    """Tile one field of view; returns (tiles written, tiles copied through, level-0 boxes for QC)."""
    choice = choose_level(base_mpp, tuple(slide.level_downsamples), target, settings.size)
    reader = LevelReader(slide, choice.level)
    step = choice.read_size
    n_cols, n_rows = reader.width // step, reader.height // step
    ds = choice.downsample
    extent0 = step * ds  # one tile's side in level-0 pixels
    # Copy compressed tiles through when an output tile is exactly one internal tile.
    can_copy = not choice.resample and reader.page is not None and step == reader.tile_w == reader.tile_h
    written = copied = 0
    boxes = []
    xs0 = np.round(np.arange(n_cols) * step * ds).astype(np.int64)  # tile origins in level-0 pixels
    ys0 = np.round(np.arange(n_rows) * step * ds).astype(np.int64)
    fractions = mask.grid_fractions(xs0, ys0, extent0)
    keep = (fractions >= settings.min_tissue) & (fractions > 0)
    for row in np.flatnonzero(keep.any(axis=1)).tolist():
        y, y0 = row * step, int(ys0[row])
        reader.forget_above(y)
        for col in np.flatnonzero(keep[row]).tolist():
            x, x0 = col * step, int(xs0[col])
            fraction = float(fractions[row, col])
            jpeg = standalone_jpeg(reader, row, col) if can_copy else None
            if jpeg is not None:
                # A 1/8-scale DCT decode is enough to judge white/black and costs a fraction of a full decode.
                small = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
                white, black = _background_fractions(small)
            else:
                rgb = reader.read(x, y, step, step)
                if choice.resample:
                    rgb = cv2.resize(rgb, (settings.size, settings.size), interpolation=cv2.INTER_AREA)
                white, black = _background_fractions(rgb)
            if white > settings.max_white or black > settings.max_black:
                continue
            if jpeg is None:
                jpeg = _encode(rgb, settings.jpeg_quality)
            else:
                copied += 1
            key = store.tile_key(sid, target, x0, y0)
            writer.add(
                jpeg,
                {
                    "slide": str(path),
                    "mpp": target,
                    "level": choice.level,
                    "x": x0,
                    "y": y0,
                    "size": settings.size,
                    "tissue": round(fraction, 4),
                    "key": key,
                },
            )
            boxes.append((x0, y0, extent0))
            written += 1
    return written, copied, boxes


def _write_qc(path: Path, mask: TissueMask, boxes_per_fov: list[list[tuple]]) -> None:
    """Thumbnail with non-tissue dimmed, the mask outline, and each field of view's tiles outlined."""
    # Non-tissue dimmed towards white, in uint8 (a float copy of the thumbnail would double peak memory).
    image = mask.thumbnail.copy()
    outside = ~mask.mask
    if outside.any():  # a slide that is tissue edge to edge (a crop, a TMA core) has nothing to dim
        image[outside] = cv2.addWeighted(image[outside], 0.55, np.full_like(image[outside], 255), 0.45, 0)
    contours, _ = cv2.findContours(mask.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (255, 0, 0), 1)
    for fov, boxes in enumerate(boxes_per_fov):
        colour = QC_COLOURS[fov % len(QC_COLOURS)]
        for x0, y0, extent in boxes:
            p0 = (int(x0 / mask.scale), int(y0 / mask.scale))
            p1 = (int((x0 + extent) / mask.scale) - 1, int((y0 + extent) / mask.scale) - 1)
            cv2.rectangle(image, p0, p1, colour, 1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if ok:
        atomic_write(path, png.tobytes())


def _feasible_fields_of_view(
    slide: Any, base_mpp: float, settings: TileSettings, result: SlideResult
) -> list[float]:
    """The targets this slide can give; others are noted (a 20x scan has no 40x tiles). None: SlideError."""
    feasible, reasons = [], []
    for target in settings.mpps:
        try:
            choice = choose_level(base_mpp, tuple(slide.level_downsamples), target, settings.size)
        except SlideError as exc:
            reasons.append(exc.reason)
            continue
        width, height = slide.level_dimensions[choice.level]
        if width < choice.read_size or height < choice.read_size:
            reasons.append(
                f"slide smaller than one {settings.size} px tile at {target} µm/px "
                f"({width}x{height} px at level {choice.level})"
            )
            continue
        feasible.append(target)
    result.notes += reasons
    if not feasible:
        raise SlideError(
            "; ".join(reasons), "drop this slide, or choose other tiles.mpp / a smaller tiles.size"
        )
    return feasible


def tile_slide(path: Path, csv_mpp: float | None, settings: TileSettings) -> SlideResult:
    """Tile one slide completely, or record why not. Never raises for a bad slide."""
    sid = store.slide_id(path)
    result = SlideResult(str(path), sid, "done")
    if store.slide_complete(settings.store_dir, sid):
        return _already_done(settings, sid, result)
    with store.slide_lock(settings.store_dir, sid) as mine:
        if not mine:  # another array task holds it right now: its run owns the slide, ours must not touch it
            result.status = "busy"
            result.notes.append("another process was tiling this slide; it is counted by that run")
            return result
        if store.slide_complete(settings.store_dir, sid):  # finished while we waited to look
            return _already_done(settings, sid, result)
        return _tile_locked(path, csv_mpp, settings, sid, result)


def _already_done(settings: TileSettings, sid: str, result: SlideResult) -> SlideResult:
    result.status = "skipped"
    result.tiles = store.part_tile_counts(settings.store_dir, sid)
    return result


def _slide_row(path: Path, slide: Any, base_mpp: float, mpp_source: str) -> dict[str, Any]:
    """The store's per-slide columns; `reader_name`/`reader_version` are set by the slide opener when it
    chose a reader other than the default."""
    return {
        "slide": str(path),
        "base_mpp": base_mpp,
        "mpp_source": mpp_source,
        "width": int(slide.dimensions[0]),
        "height": int(slide.dimensions[1]),
        "levels": int(slide.level_count),
        "reader": str(getattr(slide, "reader_name", "tiffslide")),
        "reader_version": str(getattr(slide, "reader_version", tiffslide.__version__)),
        "tiled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _tile_locked(path: Path, csv_mpp: float | None, settings: TileSettings, sid: str,
                 result: SlideResult) -> SlideResult:
    started = time.perf_counter()
    store.discard_incomplete(settings.store_dir, sid)
    writer = store.SlideShardWriter(settings.store_dir, sid, settings.tiles_per_shard)
    slide = None
    try:
        slide = open_slide(path, settings.reader)
        result.reader = f"{slide.reader_name} {slide.reader_version}"
        # The one MPP rule: an explicit value wins over metadata, the slide CSV's own over the spec's.
        base_mpp, source = slide_mpp(slide, csv_mpp if csv_mpp is not None else settings.mpp_override, path)
        result.mpp, result.mpp_source = base_mpp, "csv" if csv_mpp is not None else source
        targets = _feasible_fields_of_view(slide, base_mpp, settings, result)
        mask = tissue_mask(slide, base_mpp)
        if not mask.mask.any():
            raise SlideError(
                "no tissue found",
                "check that the slide holds stained tissue: the detector (HSV "
                "saturation, Otsu) found no stained region",
            )
        boxes_per_fov = []
        for target in targets:
            written, copied, boxes = _tile_field_of_view(
                slide, path, sid, base_mpp, target, mask, settings, writer
            )
            result.tiles[str(target)] = written
            result.copied += copied
            boxes_per_fov.append(boxes)
        if settings.qc:
            _write_qc(settings.store_dir / "qc" / f"{sid}.png", mask, boxes_per_fov)
        writer.commit(_slide_row(path, slide, base_mpp, result.mpp_source))
    except SlideError as exc:
        writer.abort()
        result.status, result.error, result.fix = "failed", exc.reason, exc.fix
    except Exception as exc:  # a worker must report, not die: one odd slide never stops the others
        writer.abort()
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if slide is not None:  # a worker tiles thousands of slides: file handles must not wait for the GC
            slide.close()
    result.seconds = time.perf_counter() - started
    return result
