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

A run opens the slides it names as a few flat arrays, cached and memory-mapped exactly as the tile index is
(`pathssl_cli.data.tile_index.cached_arrays`: one builder per node, states kept while used, spawned workers
reopen the pinned state) in `<coords>/.index/<state>/`. Per tissue cell 8 bytes: `cell` (uint32, row × cols +
col) and `cum` (uint32, the cumulative 0-255 fractions within its slide, to draw cells in proportion to tissue).
Per slide a few numbers; paths and readers live in meta.json (one string per slide, never per cell).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import math
import multiprocessing
import os
import random
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq

from pathssl_cli.console import progress
from pathssl_cli.data.tile_index import cache_root, cached_arrays, mark_used
from pathssl_cli.fileio import atomic_path, exclusive_lock
from pathssl_cli.tiling import tissue
from pathssl_cli.tiling.index import StoreError, file_state

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
_KEY = ("slide", "slide_bytes", "slide_mtime_ns", "reader_requested", "csv_mpp", "mpp_override", "detection")
_SLIDE_ARRAYS = {"base_mpp": np.float64, "width": np.int64, "height": np.int64, "cell_px": np.float64,
                 "cols": np.int32, "threshold": np.float32, "cell_start": np.int64, "level_start": np.int64,
                 "downsamples": np.float64}
_CELL_ARRAYS = {"cell": np.uint32, "cum": np.uint32}
BUILD_CHUNK = 2000  # rows read at once while building: bounded memory (a TCGA slide's grid is ~100 kB)


@dataclass(frozen=True)
class CoordSettings:
    """What a row is computed with besides the slide: `pathssl tile`'s input.reader and input.mpp_override."""

    reader: str = "auto"
    mpp_override: float | None = None


def coords_path(folder: Path, slide: Path) -> Path:
    from pathssl_cli.tiling.store import slide_id

    return folder / "coords" / f"{slide_id(slide)}.parquet"


def _expected_key(slide: Path, csv_mpp: float | None, settings: CoordSettings) -> dict[str, Any]:
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

    row: dict[str, Any] = {**_expected_key(slide, csv_mpp, settings), "slide_id": slide_id(slide),
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
    found = _read_row(path, list(_KEY))
    return found is not None and found == _expected_key(slide, csv_mpp, settings)


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


# ----------------------------------------------------------------------------------------- the flat arrays
@dataclass
class SlideArrays:
    """The usable slides of a run and their tissue cells (see the module docstring), plus the unusable ones."""

    arrays: dict[str, np.ndarray]  # _SLIDE_ARRAYS (per slide; *_start have one more entry) and _CELL_ARRAYS
    paths: list[str]
    readers: list[str]  # the library that read each slide for the index: patches are read with the same one
    bad: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason) of slides left out
    pins: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def cells(self, s: int) -> tuple[int, int]:
        return int(self.arrays["cell_start"][s]), int(self.arrays["cell_start"][s + 1])

    def tissue_cells(self, s: int) -> float:
        """The slide's tissue area in cells (sum of the cells' fractions)."""
        start, end = self.cells(s)
        return float(self.arrays["cum"][end - 1]) / 255 if end > start else 0.0

    def downsamples(self, s: int) -> tuple[float, ...]:
        start, end = int(self.arrays["level_start"][s]), int(self.arrays["level_start"][s + 1])
        return tuple(float(d) for d in self.arrays["downsamples"][start:end])


def index_state(slides: list[tuple[Path, float | None]], folder: Path, settings: CoordSettings) -> str:
    """A digest of the slides, their rows' files and the settings: any change makes another state."""
    digest = hashlib.sha1(f"{DETECTION}\0{settings.reader}\0{settings.mpp_override}\n".encode())
    for slide, csv_mpp in slides:
        key = _expected_key(slide, csv_mpp, settings)
        try:
            row_state = file_state(coords_path(folder, slide).stat())
        except OSError:
            row_state = "missing"
        digest.update(f"{slide}\0{csv_mpp}\0{key['slide_bytes']}\0{key['slide_mtime_ns']}\0{row_state}\n".encode())
    return "s" + digest.hexdigest()[:15]


class _Stale(Exception):
    """Rows that do not match their slide or the settings (found while building): compute them, build again."""

    def __init__(self, slides: list[tuple[Path, float | None]]) -> None:
        super().__init__(f"{len(slides)} stale rows")
        self.slides = slides


class _Spill:
    """A growing array in a temporary file: a build never holds every tissue cell in memory at once."""

    def __init__(self, folder: Path, dtype: type) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = tempfile.TemporaryFile(dir=folder)  # beside the cache: the same file system
        except OSError:
            self.file = tempfile.TemporaryFile()
        self.dtype, self.n = np.dtype(dtype), 0

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, self.dtype).tobytes())
        self.n += len(values)

    def array(self) -> np.ndarray:
        self.file.flush()
        return np.memmap(self.file, self.dtype, mode="r", shape=(self.n,)) if self.n else np.empty(0, self.dtype)


def _build(slides: list[tuple[Path, float | None]], folder: Path, settings: CoordSettings,
           scratch: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The flat arrays from the rows, read BUILD_CHUNK files at a time (threads, columns; no row objects)."""
    per_slide: dict[str, list[float]] = {name: [] for name in _SLIDE_ARRAYS}
    cells, cums = _Spill(scratch, np.uint32), _Spill(scratch, np.uint32)
    paths, readers, bad, stale = [], [], [], []
    n_levels = 0
    for first in range(0, len(slides), BUILD_CHUNK):
        chunk = slides[first : first + BUILD_CHUNK]
        files = sorted({str(coords_path(folder, slide)) for slide, _ in chunk})
        try:
            table = pa_ds.dataset(files, schema=COORDS_SCHEMA, format="parquet").to_table()
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{folder / 'coords'}: a coordinate row vanished or is damaged while this run started "
                             f"({exc}); start the run again") from None
        columns = {name: table.column(name).to_pylist() for name in COORDS_SCHEMA.names if name != "tissue"}
        tissue = table.column("tissue")
        row_of = {path: i for i, path in enumerate(columns["slide"])}
        for slide, csv_mpp in chunk:
            i = row_of.get(str(slide))
            if i is None or {k: columns[k][i] for k in _KEY} != _expected_key(slide, csv_mpp, settings):
                stale.append((slide, csv_mpp))
                continue
            if columns["error"][i]:
                fix = columns["fix"][i]
                bad.append((str(slide), columns["error"][i] + (f" ({fix})" if fix else "")))
                continue
            grid = np.frombuffer(tissue[i].as_buffer(), np.uint8)
            where = np.flatnonzero(grid)
            per_slide["cell_start"].append(cells.n)
            per_slide["level_start"].append(n_levels)
            cells.append(where)
            cums.append(np.cumsum(grid[where], dtype=np.uint32))
            for name, column in (("base_mpp", "base_mpp"), ("width", "width"), ("height", "height"),
                                 ("cell_px", "cell_px"), ("cols", "grid_cols"), ("threshold", "saturation_threshold")):
                per_slide[name].append(columns[column][i])
            per_slide["downsamples"] += columns["level_downsamples"][i]
            n_levels += len(columns["level_downsamples"][i])
            paths.append(str(slide))
            readers.append(columns["reader"][i])
        del table, columns, tissue
    if stale:
        raise _Stale(stale)
    per_slide["cell_start"].append(cells.n)
    per_slide["level_start"].append(n_levels)
    arrays = {name: np.asarray(per_slide[name], dtype) for name, dtype in _SLIDE_ARRAYS.items()}
    arrays["cell"], arrays["cum"] = cells.array(), cums.array()
    return arrays, {"slides": paths, "readers": readers, "bad": bad, "cells": cells.n}


def open_slide_index(slides: list[tuple[Path, float | None]], folder: Path, settings: CoordSettings,
                     workers: int = 1) -> SlideArrays:
    """The run's slides as flat arrays: rows computed where missing or stale, then built once per node and
    memory-mapped (a later start with nothing changed only maps them: stats of the slides and rows, no read)."""
    folder = Path(folder).absolute()
    root = cache_root(folder)
    state = index_state(slides, folder, settings)
    if not (root / state / "meta.json").exists():
        missing = [(s, m) for s, m in slides if not coords_path(folder, s).exists()]
        if missing:
            ensure_coords(missing, folder, settings, workers)
            state = index_state(slides, folder, settings)
    for _ in range(3):  # a row found stale while building is computed again (a changed slide or settings)
        try:
            arrays, meta, cache, _ = cached_arrays(root, state, [*_SLIDE_ARRAYS, *_CELL_ARRAYS],
                                                   lambda: _build(slides, folder, settings, root))
            break
        except _Stale as stale:
            ensure_coords(stale.slides, folder, settings, workers)
            state = index_state(slides, folder, settings)
    else:
        raise StoreError(f"{folder / 'coords'}: coordinate rows keep changing while this run starts (another job "
                         "rewriting them with other settings?); start the run again")
    pin: dict[str, Any] = {"state": state, "cache": str(cache)} if cache is not None else {
        "state": state, "arrays": arrays, "meta": meta}
    return _slide_arrays(arrays, meta, pin)


def _slide_arrays(arrays: dict[str, np.ndarray], meta: dict, pin: dict[str, Any]) -> SlideArrays:
    return SlideArrays(arrays, meta["slides"], meta["readers"], [tuple(b) for b in meta["bad"]], [pin])


def reopen_slide_index(pin: dict[str, Any]) -> SlideArrays:
    """Exactly the state a pin names (in a spawned worker)."""
    if "arrays" in pin:
        return _slide_arrays(pin["arrays"], pin["meta"], pin)
    from pathssl_cli.data.tile_index import load_state

    cache = Path(pin["cache"])
    try:
        arrays, meta = load_state(cache, [*_SLIDE_ARRAYS, *_CELL_ARRAYS])
    except FileNotFoundError:
        raise StoreError(f"the coordinate index state this job opened ({cache}) was removed while it ran; resume "
                         "the run (run.resume = true)") from None
    mark_used(cache)
    return _slide_arrays(arrays, meta, pin)
