"""The tile store: WebDataset tar shards plus a Parquet index, written so that a kill never leaves a lie.

Layout of a store folder (the index files are described in `pathssl_cli.tiling.index`):

    shards/<slide_id>-<n>.tar     members <key>.jpg + <key>.json (json = the tile's row, without offsets)
    parts/<slide_id>.parquet      the slide's tile rows, with each JPEG's byte offset; its presence marks the
                                  slide complete
    slides/<slide_id>.parquet     the slide's row (path, MPP, size, reader)
    locks/<slide_id>.lock         flock of the process tiling that slide (empty files)

Keys are `<slide_id>_<mpp in nm>nm_<x>_<y>`: unique, dot-free (WebDataset splits member names at
the first dot). A slide's shards are written under temporary names and renamed only when the whole
slide is done; its part file is written last. A rerun deletes shards of slides that have no part
file (interrupted), so tiles are never duplicated; a per-slide lock keeps two concurrent runs (array
tasks with overlapping slide lists) from tiling the same slide at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pathssl_cli.fileio import exclusive_lock
from pathssl_cli.tiling import index

_BLOCK = 512
_PADDING = bytes(_BLOCK)


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar member header (regular file, mode 644, mtime 0).

    Written by hand because tarfile's generic header code costs more than encoding the JPEG itself;
    `iter_shard` reads shards back with the standard library, which the tests use as the reference.
    """
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(_BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime 0: same tiles, same bytes
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def slide_id(path: str | Path) -> str:
    """Readable, unique, dot-free id: the file stem plus a hash of the absolute path.

    The hash keeps `a/slide.svs` and `b/slide.svs` apart; the stem keeps ids readable.
    """
    path = Path(path).resolve()
    stem = (
        re.sub(r"[^A-Za-z0-9-]+", "-", path.name.split(".")[0]).strip("-")[:40] or "slide"
    )  # tar names <= 100
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def tile_key(slide: str, mpp: float, x: int, y: int) -> str:
    return f"{slide}_{round(mpp * 1000)}nm_{x}_{y}"


def iter_shard(path: str | Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield (key, jpeg bytes, manifest row) for every tile of one tar shard, in stored order."""
    pending: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r|") as tar:  # streaming: never seeks, works on pipes
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            item = pending.setdefault(key, {})
            item[ext] = data
            if "jpg" in item and "json" in item:
                del pending[key]
                yield key, item["jpg"], json.loads(item["json"])


def slide_complete(store_dir: Path, slide: str) -> bool:
    return index.part_path(store_dir, slide).exists()


def part_tile_counts(store_dir: Path, slide: str) -> dict[str, int]:
    """Tiles per field of view (µm/px as text) of a complete slide, read from its part's mpp column only."""
    counts = pq.read_table(index.part_path(store_dir, slide), columns=["mpp"]).column("mpp").value_counts()
    return {str(item["values"].as_py()): item["counts"].as_py() for item in counts}


@contextlib.contextmanager
def slide_lock(store_dir: Path, slide: str) -> Iterator[bool]:
    """Yields True when this process holds `slide` exclusively, False when another process is tiling it.

    An advisory `flock` (or, where the file system has none, an owner-named lock file reclaimed when its
    owner is gone; `pathssl_cli.fileio.exclusive_lock`): two array tasks given the same slide never write its
    shards at the same time, and a lock never outlives its process.
    """
    with exclusive_lock(store_dir / "locks" / f"{slide}.lock", blocking=False) as held:
        yield held


def discard_incomplete(store_dir: Path, slide: str) -> None:
    """Remove shards (final or temporary) left by an interrupted attempt at `slide` (call under its lock)."""
    for leftover in (store_dir / "shards").glob(f"{slide}-*.tar"):
        leftover.unlink(missing_ok=True)
    for leftover in (store_dir / "shards").glob(f".{slide}-*"):
        leftover.unlink(missing_ok=True)


class SlideShardWriter:
    """Writes one slide's tiles into bounded tar shards; `commit()` publishes them and the part file.

    Until `commit()`, shards live under `.<name>.partial` names that no reader looks at. Each JPEG's data
    offset is recorded as it is written, so the index locates every tile without reading a tar header.
    """

    def __init__(self, store_dir: Path, slide: str, tiles_per_shard: int) -> None:
        self.store_dir = store_dir
        self.slide = slide
        self.tiles_per_shard = tiles_per_shard
        self.rows: list[dict[str, Any]] = []
        self._finished: list[tuple[Path, Path]] = []  # (partial, final)
        self._sizes: dict[str, int] = {}  # shard (store-relative) -> bytes, once closed
        self._shard_open = False
        self._in_shard = 0
        self._position = 0
        (store_dir / "shards").mkdir(parents=True, exist_ok=True)
        (store_dir / "parts").mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        index_ = len(self._finished)
        final = self.store_dir / "shards" / f"{self.slide}-{index_:05d}.tar"
        partial = final.with_name(f".{final.name}.partial")
        self._file = open(partial, "wb")
        self._shard_open = True
        self._finished.append((partial, final))
        self._in_shard = 0
        self._position = 0

    def _add(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the shard."""
        self._file.write(_ustar_header(name, len(data)))
        self._file.write(data)
        padding = -len(data) % _BLOCK
        self._file.write(_PADDING[:padding])
        offset = self._position + _BLOCK
        self._position = offset + len(data) + padding
        return offset

    def add(self, jpeg: bytes, row: dict[str, Any]) -> None:
        if not self._shard_open or self._in_shard >= self.tiles_per_shard:
            self.close_shard()
            self._open_next()
        shard = f"shards/{self._finished[-1][1].name}"
        row = {**row, "shard": shard}
        offset = self._add(f"{row['key']}.jpg", jpeg)
        self._add(f"{row['key']}.json", json.dumps(row).encode())
        self.rows.append({**row, "slide_id": self.slide, "offset": offset, "nbytes": len(jpeg)})
        self._in_shard += 1

    def close_shard(self) -> None:
        if self._shard_open:
            self._file.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
            self._file.flush()
            os.fsync(self._file.fileno())  # the bytes are on disk before the rename publishes them
            self._file.close()
            self._shard_open = False
            self._sizes[f"shards/{self._finished[-1][1].name}"] = self._position + 2 * _BLOCK

    def commit(self, slide_row: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Publish the shards, then the slide's row and its part (last: it marks the slide complete).

        `slide_row`: the per-slide columns of `index.SLIDE_SCHEMA` (path, MPP, size, reader); missing ones
        are left empty. Returns the tile rows.
        """
        self.close_shard()
        for partial, final in self._finished:
            partial.replace(final)
        for row in self.rows:
            row["shard_bytes"] = self._sizes[row["shard"]]
        index.write_part(self.store_dir, self.slide, self.rows, slide_row or {})
        return self.rows

    def abort(self) -> None:
        self.close_shard()
        for partial, _ in self._finished:
            partial.unlink(missing_ok=True)
