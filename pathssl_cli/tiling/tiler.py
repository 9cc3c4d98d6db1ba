"""`pathssl tile`: slides → tissue mask → tile grid per field of view → JPEG tiles in shards.

One slide is one unit of work (and of resume): a worker process tiles it completely into its own
shards and then writes its part file. Rerunning skips slides with a part file and redoes the rest.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import tiffslide

from pathssl_cli.console import info, progress
from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.fileio import atomic_write
from pathssl_cli.runs import open_run
from pathssl_cli.sharding import resolve_shard
from pathssl_cli.slides.readers import slide_readers
from pathssl_cli.specs.tile import TileSpec, resolve_slides
from pathssl_cli.tiling import index, store
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


def _slide_row(path: Path, slide: Any, base_mpp: float) -> dict[str, Any]:
    """The store's per-slide columns; `reader_name`/`reader_version` are set by the slide opener when it
    chose a reader other than the default."""
    return {
        "slide": str(path),
        "base_mpp": base_mpp,
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
        base_mpp = csv_mpp if csv_mpp is not None else slide_mpp(slide, settings.mpp_override, path)[0]
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
        writer.commit(_slide_row(path, slide, base_mpp))
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


def _check_store_settings(settings: TileSettings) -> None:
    marker = settings.store_dir / "tiling.json"
    wanted = settings.fingerprint()
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            changed = ", ".join(f"{k}: {found.get(k)} -> {v}" for k, v in wanted.items() if found.get(k) != v)
            raise SpecError(
                f"{settings.store_dir} already holds tiles made with other settings ({changed}). "
                "Use a new output.dir, or delete the old store to re-tile.",
                "output.dir",
            )
    else:
        atomic_write(marker, json.dumps(wanted, indent=2) + "\n")


def _run_jobs(
    jobs: list[tuple[Path, float | None]], settings: TileSettings, workers: int
) -> list[SlideResult]:
    results: list[SlideResult] = []
    bar = progress(total=len(jobs), desc="slides", unit="slide")
    started = time.perf_counter()

    def done(result: SlideResult) -> None:
        results.append(result)
        tiles = sum(sum(r.tiles.values()) for r in results if r.status == "done")
        bar.set_postfix(
            tiles=tiles,
            tiles_per_s=f"{tiles / max(time.perf_counter() - started, 1e-9):.0f}",
            failed=sum(r.status == "failed" for r in results),
        )
        bar.update(1)

    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for path, mpp in jobs:
                done(tile_slide(path, mpp, settings))
        else:
            # spawn: a fresh interpreter per worker, safe whatever threads the parent runs.
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
                futures = [pool.submit(tile_slide, path, mpp, settings) for path, mpp in jobs]
                for future in cf.as_completed(futures):
                    done(future.result())
    order = {str(path): i for i, (path, _) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.path])


def _errors_csv(results: list[SlideResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide", "error", "fix"])
    for r in results:
        if r.status == "failed":
            writer.writerow([r.path, r.error, r.fix])
    return buffer.getvalue()


def run_tile(
    spec: TileSpec, *, num_shards: int | None = None, shard_index: int | None = None, consolidate: bool = False
) -> dict[str, Any]:
    """Tile the spec's slides (this process's part of them, see `pathssl_cli.sharding`) into the store.

    `consolidate`: afterwards write manifest.parquet and its CSV export from all parts; only for a process
    that covers the whole slide list (run it once after the array tasks: it skips every complete slide).
    Returns the summary.
    """
    part = resolve_shard(num_shards, shard_index)
    if consolidate and part.count > 1:
        raise SpecError(
            f"--consolidate reads every part of the store, so it runs once, after all {part.count} parts "
            f"(this process is part {part.index + 1} of {part.count}, from {part.source}): run "
            "`pathssl tile SPEC --consolidate` without a split, e.g. in a job that depends on the array"
        )
    slides = resolve_slides(spec)
    jobs = part.take(slides)  # round-robin over the sorted list: disjoint slices that cover it all
    parts, index_ = part.count, part.index
    store_dir = Path(spec.output.dir)
    settings = TileSettings(
        store_dir=store_dir,
        mpps=spec.tiles.mpp_values(),
        size=spec.tiles.size,
        min_tissue=spec.tiles.min_tissue,
        max_white=spec.tiles.max_white,
        max_black=spec.tiles.max_black,
        jpeg_quality=spec.output.jpeg_quality,
        tiles_per_shard=spec.output.tiles_per_shard,
        qc=spec.output.qc_thumbnails,
        mpp_override=spec.input.mpp_override,
        reader=spec.input.reader,
    )
    store_dir.mkdir(parents=True, exist_ok=True)
    _check_store_settings(settings)
    suffix = part.suffix
    with open_run(spec, store_dir, world_size=parts, is_main=index_ == 0) as run:
        started = time.perf_counter()
        info(
            f"tiling {len(jobs)} slide(s) at {settings.mpps} µm/px into {store_dir}"
            + (f" (part {index_ + 1} of {parts}, from {part.source})" if parts > 1 else "")
        )
        results = _run_jobs(jobs, settings, spec.run.workers)
        run.record["slide_readers"] = slide_readers(spec.input.reader, [r.reader for r in results])
        seconds = time.perf_counter() - started
        # Only a process that covers the whole list looks at the other parts: N array tasks each reading
        # every part would make the total work grow with N x slides.
        total_tiles = (index.consolidate(store_dir) if consolidate else index.tiles_in_store(store_dir)) \
            if parts == 1 else None
        new_tiles = sum(sum(r.tiles.values()) for r in results if r.status == "done")
        by_fov: dict[str, int] = {}
        for r in results:
            for fov, count in r.tiles.items():
                by_fov[fov] = by_fov.get(fov, 0) + count
        failed = [r for r in results if r.status == "failed"]
        summary = {
            "slides": len(jobs),
            "done": sum(r.status == "done" for r in results),
            "skipped": sum(r.status == "skipped" for r in results),
            "busy": sum(r.status == "busy" for r in results),
            "failed": len(failed),
            "tiles_written": new_tiles,
            "tiles_copied_through": sum(r.copied for r in results),
            "tiles_in_store": total_tiles,
            "tiles_by_mpp": by_fov,
            "seconds": round(seconds, 3),
            "tiles_per_s": round(new_tiles / seconds, 1) if seconds > 0 else None,
            "part": {"index": index_, "count": parts},
            "per_slide": [asdict(r) for r in results],
        }
        atomic_write(store_dir / f"errors{suffix}.csv", _errors_csv(results))
        atomic_write(store_dir / f"summary{suffix}.json", json.dumps(summary, indent=2) + "\n")
        busy = f", {summary['busy']} being tiled by another process" if summary["busy"] else ""
        held = f"; store holds {total_tiles}" if total_tiles is not None else ""
        info(
            f"{summary['done']} slide(s) tiled, {summary['skipped']} already complete{busy}, {len(failed)} "
            f"failed; {new_tiles} tiles in {seconds:.1f} s ({summary['tiles_per_s']} tiles/s){held}"
            + (f"; consolidated into {store_dir / index.CONSOLIDATED} and {index.CSV_EXPORT}" if consolidate
               else "")
        )
        if failed and not spec.run.allow_failures:
            first = failed[0]
            raise WorkFailed(
                f"{len(failed)} of {len(jobs)} slide(s) failed, e.g. {first.path}: {first.error}. "
                f"All are listed in {store_dir / f'errors{suffix}.csv'} (set run.allow_failures = "
                "true to exit 0 anyway)"
            )
    return summary
