"""The coordinate index of whole slides: where their tissue is, for pre-training straight from the slides.

One Parquet file per slide, `<coords>/coords/<slide_id>.parquet` (one row), written by `pathssl tile --coords-only`
ahead of time (e.g. as a SLURM array) or on first use by `pathssl pretrain`:

    slide, slide_id           the slide's path (resolved) and the tile store's id for it
    slide_bytes, slide_mtime_ns   the slide file when it was read: a changed slide is read again
    reader_requested, csv_mpp, mpp_override, detection    what the row was computed with (a mismatch recomputes)
    error, fix                why the slide cannot be used (unreadable, no MPP, no tissue); the rest is then empty
    base_mpp, mpp_source      level-0 µm/px and where it came from (csv | metadata | override: `pathssl tile`'s rules)
    width, height, level_downsamples, reader, reader_version
    cell_px, grid_rows, grid_cols, tissue     the tissue grid: cells of GRID_UM µm (`cell_px` level-0 pixels);
                              `tissue` is rows × cols uint8 bytes, row-major: 255 × the fraction of the cell covered
                              by the tissue mask of `pathssl tile` (`pathssl_cli.tiling.tissue`, same detector)
    saturation_threshold      the HSV saturation above which that detector called a pixel tissue on this slide

    np.frombuffer(row["tissue"], np.uint8).reshape(row["grid_rows"], row["grid_cols"])    # the grid, any tool

A run opens its slides as flat memory-mapped arrays: `pathssl_cli.data.slide_arrays`.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pathssl_cli.console import progress
from pathssl_cli.fileio import atomic_path, exclusive_lock
from pathssl_cli.tiling import tissue

#: Side of a tissue grid cell (µm): 64 µm is a 224 px patch at 0.29 µm/px, so a cell's fraction says where tissue
#: is at every field of view used for pre-training, while 30,000 slides' tissue cells stay about a gigabyte.
GRID_UM = 64.0
#: Bump when the row's meaning changes: rows written by another version are recomputed.
COORDS_VERSION = 1
DETECTION = (f"v{COORDS_VERSION};grid {GRID_UM};mask {tissue.MASK_MPP}/{tissue.MASK_MAX_SIDE};saturation "
             f"{tissue.MIN_SATURATION}-{tissue.MAX_THRESHOLD};morphology {tissue.CLOSE_UM}/{tissue.OPEN_UM}/"
             f"{tissue.MIN_AREA_UM2}")
COORDS_SCHEMA = pa.schema([
    pa.field("slide", pa.string()), pa.field("slide_id", pa.string()),
    pa.field("slide_bytes", pa.int64()), pa.field("slide_mtime_ns", pa.int64()),
    pa.field("reader_requested", pa.string()), pa.field("csv_mpp", pa.float64()),
    pa.field("mpp_override", pa.float64()), pa.field("detection", pa.string()),
    pa.field("error", pa.string()), pa.field("fix", pa.string()),
    pa.field("base_mpp", pa.float64()), pa.field("mpp_source", pa.string()),
    pa.field("width", pa.int64()), pa.field("height", pa.int64()),
    pa.field("level_downsamples", pa.list_(pa.float64())),
    pa.field("reader", pa.string()), pa.field("reader_version", pa.string()),
    pa.field("cell_px", pa.float64()), pa.field("grid_rows", pa.int32()), pa.field("grid_cols", pa.int32()),
    pa.field("tissue", pa.binary()), pa.field("saturation_threshold", pa.float32()),
    pa.field("computed_at", pa.string()),
])
ROW_KEY = ("slide", "slide_bytes", "slide_mtime_ns", "reader_requested", "csv_mpp", "mpp_override", "detection")


@dataclass(frozen=True)
class CoordSettings:
    """What a row is computed with besides the slide: `pathssl tile`'s input.reader and input.mpp_override."""

    reader: str = "auto"
    mpp_override: float | None = None


def coords_path(folder: Path, slide: Path) -> Path:
    from pathssl_cli.tiling.store import slide_id

    return folder / "coords" / f"{slide_id(slide)}.parquet"


def expected_key(slide: Path, csv_mpp: float | None, settings: CoordSettings) -> dict[str, Any]:
    try:
        stat = slide.stat()
        size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
    except OSError:
        size = mtime = -1
    return {"slide": str(slide), "slide_bytes": size, "slide_mtime_ns": mtime,
            "reader_requested": settings.reader, "csv_mpp": csv_mpp, "mpp_override": settings.mpp_override,
            "detection": DETECTION}


def compute_coords(slide: Path, csv_mpp: float | None, settings: CoordSettings) -> dict[str, Any]:
    """One slide's row (see the module docstring); a slide that cannot be used gets `error` and `fix`. Never
    raises for a bad slide."""
    from pathssl_cli.tiling.slide import SlideError, open_slide, slide_mpp
    from pathssl_cli.tiling.store import slide_id

    row: dict[str, Any] = {**expected_key(slide, csv_mpp, settings), "slide_id": slide_id(slide),
                           "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    handle = None
    try:
        handle = open_slide(slide, settings.reader)
        base_mpp, source = (csv_mpp, "csv") if csv_mpp is not None else slide_mpp(handle, settings.mpp_override,
                                                                                   slide)
        mask = tissue.tissue_mask(handle, base_mpp)
        if not mask.mask.any():
            raise SlideError("no tissue found", "check that the slide holds stained tissue: the detector (HSV "
                             "saturation, Otsu) of `pathssl tile` found no stained region")
        width, height = (int(v) for v in handle.dimensions)
        cell_px = GRID_UM / base_mpp
        cols, rows = max(1, math.ceil(width / cell_px)), max(1, math.ceil(height / cell_px))
        fractions = mask.grid_fractions(np.arange(cols) * cell_px, np.arange(rows) * cell_px, cell_px)
        row.update(base_mpp=float(base_mpp), mpp_source=source, width=width, height=height,
                   level_downsamples=[float(d) for d in handle.level_downsamples],
                   reader=str(handle.reader_name), reader_version=str(handle.reader_version), cell_px=cell_px,
                   grid_rows=rows, grid_cols=cols, tissue=np.rint(fractions * 255).astype(np.uint8).tobytes(),
                   saturation_threshold=tissue.saturation_threshold(mask.thumbnail))
    except SlideError as exc:
        row.update(error=exc.reason, fix=exc.fix)
    except Exception as exc:  # a slide that opens but cannot be read through is skipped like an unreadable one
        row.update(error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}", fix="check the file")
    finally:
        if handle is not None:
            handle.close()
    return row


def write_coords(folder: Path, slide: Path, csv_mpp: float | None, settings: CoordSettings) -> dict[str, Any]:
    """Compute one slide's row and publish it atomically; returns the row."""
    row = compute_coords(slide, csv_mpp, settings)
    with atomic_path(coords_path(folder, slide)) as tmp:
        pq.write_table(pa.Table.from_pylist([row], schema=COORDS_SCHEMA), tmp, compression="zstd")
    return row


def _read_row(path: Path, columns: list[str] | None = None) -> dict[str, Any] | None:
    try:
        return pq.ParquetFile(path).read(columns=columns).to_pylist()[0]
    except (FileNotFoundError, pa.ArrowInvalid, OSError, IndexError):
        return None


def _is_current(path: Path, slide: Path, csv_mpp: float | None, settings: CoordSettings) -> bool:
    found = _read_row(path, list(ROW_KEY))
    return found is not None and found == expected_key(slide, csv_mpp, settings)


def _locked_write(folder: Path, slide: Path, csv_mpp: float | None, settings: CoordSettings,
                  blocking: bool) -> bool:
    """Compute and write the row under the slide's lock unless another process does; False when it is busy."""
    path = coords_path(folder, slide)
    # not the tile store's locks/<slide_id>.lock: tiling the same slide meanwhile must not see it busy
    with exclusive_lock(folder / "coords" / ".locks" / f"{path.stem}.lock", blocking=blocking) as mine:
        if not mine:
            return False
        if not _is_current(path, slide, csv_mpp, settings):  # another process may have finished it meanwhile
            write_coords(folder, slide, csv_mpp, settings)
        return True


def ensure_coords(slides: list[tuple[Path, float | None]], folder: Path, settings: CoordSettings,
                  workers: int = 1, *, recompute_errors: bool = False) -> dict[str, int]:
    """Write the rows that are missing or stale (changed slide or settings). Several processes and nodes may
    run this on one folder at once: each slide is computed by one of them (per-slide locks), the others wait for
    it. `recompute_errors`: also redo rows that recorded an unusable slide. Returns counts."""
    todo = []
    for slide, csv_mpp in slides:
        path = coords_path(folder, slide)
        current = _is_current(path, slide, csv_mpp, settings)
        if not current or (recompute_errors and (_read_row(path, ["error"]) or {}).get("error")):
            todo.append((slide, csv_mpp))
    if not todo:
        return {"slides": len(slides), "computed": 0}
    (folder / "coords").mkdir(parents=True, exist_ok=True)
    random.Random(os.getpid()).shuffle(todo)  # concurrent builders start on different slides
    if recompute_errors:
        for slide, _ in todo:
            coords_path(folder, slide).unlink(missing_ok=True)
    busy = []
    with progress(total=len(todo), desc="coordinate index", unit="slide") as bar:
        if workers > 1 and len(todo) > 1:
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(_locked_write, folder, s, m, settings, False): (s, m) for s, m in todo}
                for future in cf.as_completed(futures):
                    if not future.result():
                        busy.append(futures[future])
                    bar.update(1)
        else:
            for slide, csv_mpp in todo:
                if not _locked_write(folder, slide, csv_mpp, settings, blocking=False):
                    busy.append((slide, csv_mpp))
                bar.update(1)
    for slide, csv_mpp in busy:  # another process holds them: wait for its row (or compute it if it died)
        _locked_write(folder, slide, csv_mpp, settings, blocking=True)
    return {"slides": len(slides), "computed": len(todo) - len(busy)}
