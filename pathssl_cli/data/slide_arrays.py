"""The coordinate index of a run's slides as a few flat arrays, built once per node and memory-mapped.

The rows (`pathssl_cli.data.slide_index`) are read BUILD_CHUNK at a time (columns, threads; from `coords.parquet`
where it is current, written by `pathssl tile --coords-only --consolidate`), their tissue cells spilled to a
scratch file, and the arrays cached exactly as the tile index is (`pathssl_cli.data.tile_index.cached_arrays`: one
builder per node, states kept while used, spawned workers reopen the pinned state) in `<coords>/.index/<state>/`.
Per tissue cell 8 bytes: `cell` (uint32, row × cols + col) and `cum` (uint32, the cumulative 0-255 fractions
within its slide, to draw cells in proportion to tissue). Per slide a few numbers; paths and readers live in
meta.json (one string per slide, never per cell).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq

from pathssl_cli.data.slide_index import (
    COORDS_SCHEMA,
    DETECTION,
    ROW_KEY,
    CoordSettings,
    coords_path,
    ensure_coords,
    expected_key,
)
from pathssl_cli.data.tile_index import cache_root, cached_arrays, load_state, mark_used
from pathssl_cli.fileio import atomic_path
from pathssl_cli.tiling.index import StoreError, file_state

_SLIDE_ARRAYS = {"base_mpp": np.float64, "width": np.int64, "height": np.int64, "cell_px": np.float64,
                 "cols": np.int32, "threshold": np.float32, "cell_start": np.int64, "level_start": np.int64,
                 "downsamples": np.float64}
_CELL_ARRAYS = {"cell": np.uint32, "cum": np.uint32}
BUILD_CHUNK = 2000  # rows read at once while building: bounded memory (a TCGA slide's grid is ~100 kB)
CONSOLIDATED_COORDS = "coords.parquet"  # every row in one file: `pathssl tile --coords-only --consolidate`


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
        key = expected_key(slide, csv_mpp, settings)
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


class _Consolidated:
    """`coords.parquet` (`consolidate_coords`): every row in one file, each with the state of the per-slide file
    it was copied from; a row is used only while that file is unchanged (the per-slide files stay the truth)."""

    def __init__(self, folder: Path) -> None:
        self.file = pq.ParquetFile(folder / CONSOLIDATED_COORDS)
        index = self.file.read(columns=["slide", "row_state"])
        self.row_of = {slide: i for i, slide in enumerate(index.column("slide").to_pylist())}
        self.state = index.column("row_state").to_pylist()
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def rows(self, wanted: dict[str, str]) -> pa.Table:
        """The rows of the slides in `wanted` (slide -> its per-slide file's state now) that are still current."""
        found = sorted(i for slide, state in wanted.items()
                       if (i := self.row_of.get(slide)) is not None and self.state[i] == state)
        if not found:
            return COORDS_SCHEMA.empty_table()
        group_of = (np.searchsorted(self.group_start, found, side="right") - 1).tolist()
        groups = sorted(set(group_of))
        offset, total = {}, 0
        for g in groups:  # where each row group starts in the table of the groups read
            offset[g] = total
            total += int(self.group_start[g + 1] - self.group_start[g])
        table = self.file.read_row_groups(groups, columns=COORDS_SCHEMA.names)
        return table.take([offset[g] + i - int(self.group_start[g]) for i, g in zip(found, group_of, strict=True)])


def _row_state(path: Path) -> str:
    try:
        return file_state(path.stat())
    except OSError:
        return "missing"


def _chunk_rows(chunk: list[tuple[Path, float | None]], folder: Path, consolidated: _Consolidated | None) -> pa.Table:
    """The rows of `chunk`: from coords.parquet where it is current, else from the per-slide files."""
    files = {str(slide): coords_path(folder, slide) for slide, _ in chunk}
    tables = []
    if consolidated is not None:
        tables.append(consolidated.rows({slide: _row_state(path) for slide, path in files.items()}))
        served = set(tables[0].column("slide").to_pylist())
        files = {slide: path for slide, path in files.items() if slide not in served}
    if files:
        try:
            tables.append(pa_ds.dataset(sorted({str(p) for p in files.values()}), schema=COORDS_SCHEMA,
                                        format="parquet").to_table())
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{folder / 'coords'}: a coordinate row vanished or is damaged while this run started "
                             f"({exc}); start the run again") from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def consolidate_coords(folder: Path, slides: list[tuple[Path, float | None]]) -> int:
    """Write `<folder>/coords.parquet`: the listed slides' rows in one file (row groups of BUILD_CHUNK), so that a
    first build over 30,000 slides opens one file instead of 30,000. Returns the rows written."""
    schema = COORDS_SCHEMA.append(pa.field("row_state", pa.string()))
    written = 0
    with atomic_path(folder / CONSOLIDATED_COORDS) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as out:
        ordered = sorted({str(s): (s, m) for s, m in slides}.values(), key=lambda sm: str(sm[0]))
        for first in range(0, len(ordered), BUILD_CHUNK):
            chunk = ordered[first : first + BUILD_CHUNK]
            table = _chunk_rows(chunk, folder, None)
            table = table.take(np.argsort(np.asarray(table.column("slide").to_pylist(), dtype=object)))
            states = [_row_state(coords_path(folder, Path(s))) for s in table.column("slide").to_pylist()]
            out.write_table(table.append_column("row_state", pa.array(states, pa.string())),
                            row_group_size=BUILD_CHUNK)
            written += table.num_rows
    return written


def _build(slides: list[tuple[Path, float | None]], folder: Path, settings: CoordSettings,
           scratch: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The flat arrays from the rows, read BUILD_CHUNK files at a time (threads, columns; no row objects)."""
    per_slide: dict[str, list[float]] = {name: [] for name in _SLIDE_ARRAYS}
    cells, cums = _Spill(scratch, np.uint32), _Spill(scratch, np.uint32)
    paths, readers, bad, stale = [], [], [], []
    n_levels = 0
    consolidated = _Consolidated(folder) if (folder / CONSOLIDATED_COORDS).exists() else None
    for first in range(0, len(slides), BUILD_CHUNK):
        chunk = slides[first : first + BUILD_CHUNK]
        table = _chunk_rows(chunk, folder, consolidated)
        columns = {name: table.column(name).to_pylist() for name in COORDS_SCHEMA.names if name != "tissue"}
        tissue = table.column("tissue")
        row_of = {path: i for i, path in enumerate(columns["slide"])}
        for slide, csv_mpp in chunk:
            i = row_of.get(str(slide))
            if i is None or {k: columns[k][i] for k in ROW_KEY} != expected_key(slide, csv_mpp, settings):
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
    cache = Path(pin["cache"])
    try:
        arrays, meta = load_state(cache, [*_SLIDE_ARRAYS, *_CELL_ARRAYS])
    except FileNotFoundError:
        raise StoreError(f"the coordinate index state this job opened ({cache}) was removed while it ran; resume "
                         "the run (run.resume = true)") from None
    mark_used(cache)
    return _slide_arrays(arrays, meta, pin)
