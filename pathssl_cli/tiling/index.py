"""The tile store's index: one Parquet schema that `pathssl tile` writes and every reader reads.

    store/parts/<slide_id>.parquet    one row per tile of one slide; its presence marks the slide complete
    store/slides/<slide_id>.parquet   one row per slide: path, MPP and its source, size, the reader that opened it
    store/manifest.parquet            every part in one file: written only on request (`pathssl tile --consolidate`)
    store/manifest.csv                the same as CSV, an export for spreadsheets; never read back

The parts are the source of truth: a run adds its own parts and reads nobody else's, so N array tasks tiling
into one store do work linear in their own tiles. Any tool of the field reads them:

    pd.read_parquet("store/parts").query("mpp == 0.5").groupby("slide").size()     # tiles per slide at 0.5 µm/px

(pyarrow, and so pandas, polars and duckdb, skip the `.name.tmp` files of writes in flight.) Each tile row says
where its JPEG bytes lie (`shard`, `offset`, `nbytes`), so a reader never scans a tar; `shard_bytes` is the
shard's size when the part was written, so a truncated or rewritten shard is caught before training starts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pathssl_cli.errors import SpecError
from pathssl_cli.fileio import atomic_path

TILE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # <slide_id>_<mpp in nm>nm_<x>_<y>: the tar member stem
    pa.field("slide", pa.string()),  # the slide's path as given to `pathssl tile`
    pa.field("slide_id", pa.string()),
    pa.field("mpp", pa.float64()),  # field of view, µm/px
    pa.field("level", pa.int16()),  # pyramid level read
    pa.field("x", pa.int64()),  # tile origin, level-0 pixels
    pa.field("y", pa.int64()),
    pa.field("size", pa.int32()),  # tile side, px
    pa.field("tissue", pa.float32()),  # tissue fraction under the tile (0-1)
    pa.field("shard", pa.string(), nullable=False),  # tar path relative to the store
    pa.field("offset", pa.int64(), nullable=False),  # first byte of the JPEG member's data in the shard
    pa.field("nbytes", pa.int64(), nullable=False),  # JPEG size in bytes
    pa.field("shard_bytes", pa.int64(), nullable=False),  # the shard's file size when the part was written
])
SLIDE_SCHEMA = pa.schema([
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("slide", pa.string()),
    pa.field("base_mpp", pa.float64()),  # µm/px of level 0 as used for tiling
    pa.field("width", pa.int64()),  # level-0 pixels
    pa.field("height", pa.int64()),
    pa.field("levels", pa.int16()),
    pa.field("reader", pa.string()),  # the library that opened the slide, and its version
    pa.field("reader_version", pa.string()),
    pa.field("tiles", pa.int64()),
    pa.field("tiled_at", pa.string()),  # UTC, ISO 8601
    pa.field("mpp_source", pa.string()),  # metadata | override | csv; empty in stores written before it existed
])
TILE_COLUMNS = tuple(TILE_SCHEMA.names)
CONSOLIDATED = "manifest.parquet"
CSV_EXPORT = "manifest.csv"
_PARTS_KEY = b"pathssl.parts_state"  # consolidated file's metadata: the parts it was made from


class StoreError(SpecError):
    """A tile store that cannot be read as it is (exit 2: nothing started); says which store and the fix."""


def _pa_ds() -> Any:
    """`pyarrow.dataset`, imported on first read: it pulls in pandas (about half a CPU-second), which a tiling
    worker, that only writes parts, never needs; `pathssl tile --workers N` pays that start-up once per worker."""
    import pyarrow.dataset

    return pyarrow.dataset


def part_path(store: Path, slide_id: str) -> Path:
    return store / "parts" / f"{slide_id}.parquet"


def write_part(store: Path, slide_id: str, rows: list[dict[str, Any]], slide_row: dict[str, Any]) -> None:
    """Write the slide's row, then its tiles' part: the part, written last and atomically, marks it complete."""
    slide = pa.Table.from_pylist([{**slide_row, "slide_id": slide_id, "tiles": len(rows)}], schema=SLIDE_SCHEMA)
    with atomic_path(store / "slides" / f"{slide_id}.parquet") as tmp:
        pq.write_table(slide, tmp)
    table = pa.Table.from_pylist(rows, schema=TILE_SCHEMA)
    with atomic_path(part_path(store, slide_id)) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def part_files(store: Path) -> list[os.DirEntry]:
    """The published parts (temporary files of writes in flight start with a dot and are left out)."""
    try:
        with os.scandir(store / "parts") as entries:
            return sorted((e for e in entries if e.name.endswith(".parquet") and not e.name.startswith(".")),
                          key=lambda e: e.name)
    except FileNotFoundError:
        return []


def file_state(stat: os.stat_result) -> str:
    """What identifies one version of a file: size, mtime, inode and ctime.

    Size and mtime alone miss a same-size rewrite within the file system's timestamp granularity (1 s on some
    Lustre mounts); a rewrite published by rename gets a new inode, and any change a new ctime.
    """
    return f"{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0{stat.st_ctime_ns}"


def parts_state(parts: list[os.DirEntry]) -> str:
    """A digest of the parts' names and file states: changes whenever a part is added or replaced."""
    digest = hashlib.sha1()
    for entry in parts:
        digest.update(f"{entry.name}\0{file_state(entry.stat())}\n".encode())
    return digest.hexdigest()[:16]


def _legacy_hint(store: Path) -> str | None:
    if any((store / "parts").glob("*.csv")) or ((store / CSV_EXPORT).exists() and not (store / CONSOLIDATED).exists()):
        return (f"{store}: this tile store was written by an older pathssl (CSV manifest without byte offsets). "
                "Re-tile it into a new folder with `pathssl tile SPEC --set output.dir=NEW_DIR`")
    return None


def index_source(store: str | Path) -> tuple[list[Path], str]:
    """(files that hold the store's tile rows, their state digest): the parts, else the consolidated file."""
    store = Path(store)
    parts = part_files(store)
    if parts:
        return [Path(e.path) for e in parts], parts_state(parts)
    consolidated = store / CONSOLIDATED
    if consolidated.exists():
        return [consolidated], "c" + hashlib.sha1(file_state(consolidated.stat()).encode()).hexdigest()[:15]
    hint = _legacy_hint(store)
    raise StoreError(hint or f"{store}: not a tile store (no parts/*.parquet or {CONSOLIDATED}). Create one "
                     "with `pathssl tile SPEC`.")


def is_store(path: Path) -> bool:
    """Whether `path` is a tile store: an index (parts/ or manifest.parquet), or an older store's manifest.csv
    beside its shards/. A manifest.csv alone is not: image folders often ship one (the Kather 2016 sample's
    lists its labels), and they are read as image folders."""
    return ((path / "parts").is_dir() or (path / CONSOLIDATED).exists()
            or ((path / CSV_EXPORT).exists() and (path / "shards").is_dir()))


def read_tiles(store: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every tile of a store as an Arrow table in stream order: by shard path, then byte offset (stored order).

    `read_tiles(store).to_pandas()` for pandas; `columns` reads only those (shard and offset are always read).
    """
    files, _ = index_source(store)
    wanted = list(dict.fromkeys([*(columns or TILE_COLUMNS), "shard", "offset"]))
    try:
        table = _pa_ds().dataset([str(f) for f in files], schema=TILE_SCHEMA, format="parquet").to_table(columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{store}: cannot read the tile index: {_damaged_part(files) or exc}. Delete that part "
                         "and run `pathssl tile SPEC` again: it re-tiles only slides without a part") from None
    return table.take(stored_order(table))


def _damaged_part(files: list[Path]) -> str | None:
    """The first part whose footer or schema cannot be read, named for the error message."""
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            return f"{path} is damaged ({exc})"
        missing = [name for name in ("shard", "offset", "nbytes") if name not in schema.names]
        if missing:
            return f"{path} lacks the columns {missing}"
    return None


def read_locations(store: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(shard paths sorted, per-tile numpy columns in stream order): `shard` (int32 index into the paths),
    `offset`, `nbytes`, `mpp`, `shard_bytes`. For readers at scale: the shard column is read dictionary-encoded,
    so no per-row string is ever materialised (~40 bytes per tile while building, not hundreds)."""
    files, _ = index_source(store)
    schema = TILE_SCHEMA.set(TILE_SCHEMA.get_field_index("shard"),
                             pa.field("shard", pa.dictionary(pa.int32(), pa.string()), nullable=False))
    fmt = _pa_ds().ParquetFileFormat(read_options=_pa_ds().ParquetReadOptions(dictionary_columns=["shard"]))
    try:
        table = _pa_ds().dataset([str(f) for f in files], schema=schema, format=fmt).to_table(
            columns=["shard", "offset", "nbytes", "mpp", "shard_bytes"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{store}: cannot read the tile index: {_damaged_part(files) or exc}. Delete that part "
                         "and run `pathssl tile SPEC` again: it re-tiles only slides without a part") from None
    shards = table.column("shard").unify_dictionaries().combine_chunks()
    table = table.drop_columns(["shard"])
    names = np.asarray(shards.dictionary.to_pylist(), dtype=object)
    rank = np.empty(len(names), np.int32)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names), dtype=np.int32)
    codes = rank[shards.indices.to_numpy()]
    del shards
    offset = table.column("offset").to_numpy()
    order = np.lexsort((offset, codes))
    columns = {"shard": codes[order], "offset": offset[order]}
    del codes, offset
    for name in ("nbytes", "mpp", "shard_bytes"):
        columns[name] = table.column(name).to_numpy()[order]
    return sorted(names.tolist()), columns


def stored_order(table: pa.Table) -> np.ndarray:
    """Row order by shard path then offset; sorts integer codes, never the strings of every row."""
    shards = table.column("shard").combine_chunks().dictionary_encode()
    names = shards.dictionary.to_numpy(zero_copy_only=False)
    rank = np.empty(len(names), np.int64)
    rank[np.argsort(names, kind="stable")] = np.arange(len(names))
    codes = rank[shards.indices.to_numpy()]
    return np.lexsort((table.column("offset").to_numpy(), codes))


def read_slides(store: str | Path) -> pa.Table:
    """One row per complete slide (path, base MPP, size, reader and version, tiles)."""
    files = sorted((Path(store) / "slides").glob("[!.]*.parquet"))
    if not files:
        return SLIDE_SCHEMA.empty_table()
    return _pa_ds().dataset([str(f) for f in files], schema=SLIDE_SCHEMA, format="parquet").to_table()


def tiles_in_store(store: Path) -> int:
    """Number of tiles, from the parts' footers only (no row is read)."""
    return sum(pq.read_metadata(e.path).num_rows for e in part_files(store))


def consolidate(store: str | Path) -> int:
    """Write manifest.parquet (every part, in stream order) and its CSV export, atomically; returns the tiles."""
    store = Path(store)
    parts = part_files(store)
    if not parts:
        raise StoreError(f"{store}: no parts/*.parquet to consolidate; run `pathssl tile SPEC` first")
    table = read_tiles(store)
    table = table.replace_schema_metadata({_PARTS_KEY: parts_state(parts).encode()})
    with atomic_path(store / CONSOLIDATED) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    with atomic_path(store / CSV_EXPORT) as tmp:
        pa_csv.write_csv(table.drop_columns(["offset", "nbytes", "shard_bytes"]), tmp)
    return table.num_rows


def consolidated_is_current(store: Path) -> bool:
    """Whether manifest.parquet was made from exactly the parts present now."""
    path = store / CONSOLIDATED
    if not path.exists():
        return False
    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(_PARTS_KEY, b"").decode() == parts_state(part_files(store))
