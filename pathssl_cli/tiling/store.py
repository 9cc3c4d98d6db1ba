"""The tile store: WebDataset tar shards plus a manifest, written so that a kill never leaves a lie.

Layout of a store folder:

    shards/<slide_id>-<n>.tar     members <key>.jpg + <key>.json (json = the manifest row)
    parts/<slide_id>.csv          manifest rows of one slide; its presence marks the slide complete
    manifest.csv                  all parts concatenated (rebuilt at the end of every run)

Keys are `<slide_id>_<mpp in nm>nm_<x>_<y>`: unique, dot-free (WebDataset splits member names at
the first dot). A slide's shards are written under temporary names and renamed only when the whole
slide is done; its part file is written last. A rerun deletes shards of slides that have no part
file (interrupted), so tiles are never duplicated. `read_manifest` reads the parts when present,
so stores filled by several runs (`--shard-index`) combine without any merge step.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pathssl_cli.runs import atomic_path, atomic_write

MANIFEST_COLUMNS = ("slide", "mpp", "level", "x", "y", "size", "tissue", "shard", "key")
_INT_COLUMNS = ("level", "x", "y", "size")
_FLOAT_COLUMNS = ("mpp", "tissue")


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


def _typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for name in _INT_COLUMNS:
        out[name] = int(row[name])
    for name in _FLOAT_COLUMNS:
        out[name] = float(row[name])
    return out


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as fh:
        return [_typed(row) for row in csv.DictReader(fh)]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_manifest(store_dir: str | Path) -> list[dict[str, Any]]:
    """All tiles of a store, one dict per tile with typed values (ints, floats), sorted by shard then key.

    Reads the per-slide parts when the store has them (always current, even while other runs add
    slides), else `manifest.csv` (a store copied without its parts).
    """
    store = Path(store_dir)
    parts = sorted((store / "parts").glob("*.csv"))
    if parts:
        rows = [row for part in parts for row in _read_csv(part)]
    elif (store / "manifest.csv").exists():
        rows = _read_csv(store / "manifest.csv")
    else:
        raise FileNotFoundError(
            f"{store}: not a tile store (no parts/*.csv or manifest.csv). "
            "Create one with `pathssl tile SPEC`."
        )
    rows.sort(key=lambda r: (r["shard"], r["key"]))
    return rows


def write_manifest(store_dir: str | Path) -> int:
    """Rebuild manifest.csv from the parts (atomically); returns the number of tiles."""
    store = Path(store_dir)
    rows = [row for part in sorted((store / "parts").glob("*.csv")) for row in _read_csv(part)]
    rows.sort(key=lambda r: (r["shard"], r["key"]))
    atomic_write(store / "manifest.csv", _csv_text(rows))
    return len(rows)


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


def read_manifest_part(store_dir: Path, slide: str) -> list[dict[str, Any]]:
    return _read_csv(store_dir / "parts" / f"{slide}.csv")


def slide_complete(store_dir: Path, slide: str) -> bool:
    return (store_dir / "parts" / f"{slide}.csv").exists()


def discard_incomplete(store_dir: Path, slide: str) -> None:
    """Remove shards (final or temporary) left by an interrupted attempt at `slide`."""
    for leftover in (store_dir / "shards").glob(f"{slide}-*.tar"):
        leftover.unlink(missing_ok=True)
    for leftover in (store_dir / "shards").glob(f".{slide}-*"):
        leftover.unlink(missing_ok=True)


class SlideShardWriter:
    """Writes one slide's tiles into bounded tar shards; `commit()` publishes them and the part file.

    Until `commit()`, shards live under `.<name>.partial` names that no reader looks at.
    """

    def __init__(self, store_dir: Path, slide: str, tiles_per_shard: int) -> None:
        self.store_dir = store_dir
        self.slide = slide
        self.tiles_per_shard = tiles_per_shard
        self.rows: list[dict[str, Any]] = []
        self._finished: list[tuple[Path, Path]] = []  # (partial, final)
        self._shard_open = False
        self._in_shard = 0
        (store_dir / "shards").mkdir(parents=True, exist_ok=True)
        (store_dir / "parts").mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        index = len(self._finished)
        final = self.store_dir / "shards" / f"{self.slide}-{index:05d}.tar"
        partial = final.with_name(f".{final.name}.partial")
        self._file = open(partial, "wb")
        self._shard_open = True
        self._finished.append((partial, final))
        self._in_shard = 0

    def _add(self, name: str, data: bytes) -> None:
        self._file.write(_ustar_header(name, len(data)))
        self._file.write(data)
        self._file.write(_PADDING[: -len(data) % _BLOCK])

    def add(self, jpeg: bytes, row: dict[str, Any]) -> None:
        if not self._shard_open or self._in_shard >= self.tiles_per_shard:
            self.close_shard()
            self._open_next()
        shard = f"shards/{self._finished[-1][1].name}"
        row = {**row, "shard": shard}
        self._add(f"{row['key']}.jpg", jpeg)
        self._add(f"{row['key']}.json", json.dumps(row).encode())
        self.rows.append(row)
        self._in_shard += 1

    def close_shard(self) -> None:
        if self._shard_open:
            self._file.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
            self._file.flush()
            os.fsync(self._file.fileno())  # the bytes are on disk before the rename publishes them
            self._file.close()
            self._shard_open = False

    def commit(self) -> list[dict[str, Any]]:
        """Publish the shards, then the part file that marks the slide complete; returns its rows."""
        self.close_shard()
        for partial, final in self._finished:
            partial.replace(final)
        with atomic_path(self.store_dir / "parts" / f"{self.slide}.csv") as tmp:
            tmp.write_text(_csv_text(self.rows))
        return self.rows

    def abort(self) -> None:
        self.close_shard()
        for partial, _ in self._finished:
            partial.unlink(missing_ok=True)
