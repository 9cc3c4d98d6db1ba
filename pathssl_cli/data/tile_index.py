"""Where every tile of a stream's sources lies, as a few flat numpy arrays (no Python object per tile).

A tile store's arrays are built once from its Parquet index (`pathssl_cli.tiling.index`) and cached beside it in
`.index/<state>/` (`state` digests the parts' names and file states, so adding a slide makes a new cache and a
stale one is never read). They are opened memory-mapped: a rank and its DataLoader workers share the same page
cache pages, so their memory does not grow with copies. About 17 bytes per tile:

    shard   int32   shard id (index into `shard_paths`)
    offset  int64   JPEG data offset in the shard; for an image-folder file its index into `files`
    nbytes  int32   JPEG size; -1 for an image-folder file (read whole)
    level   uint8   index into `mpps`; 255 for image-folder files (no field of view)

The cache (`cached_arrays`, also used by the slide coordinate index of `pathssl_cli.data.slide_index`):
- one builder per node: the first process takes the cache folder's lock and builds; the others wait, then map;
- a state is published by renaming a finished temporary folder, so a half-written one is never read;
- states other jobs may still map are never deleted: on NFS a node mapping a file removed by another node dies
  with SIGBUS. Each open (and each epoch of a stream) touches the state's `last_used` file; a state is removed
  only when it is neither among the `KEEP_STATES` most recently used nor used for `STATE_TTL_S` (a day);
- a stream pickled to a spawned worker carries its states (`TileArrays.pins`) and the worker reopens exactly
  those (`reopen`), never the store's newest state: an array job may be adding parts meanwhile.

Torch-free, so it also serves tools that only inspect a store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.errors import WorkFailed
from pathssl_cli.fileio import exclusive_lock, temporary_folder
from pathssl_cli.tiling.index import StoreError, index_source, is_store, read_locations

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FOLDER_SHARD = 256  # files per pseudo-shard of an image folder: only affects the order's locality
NO_LEVEL = 255
_ARRAYS = {"shard": np.int32, "offset": np.int64, "nbytes": np.int32, "level": np.uint8}
_OPENED: dict[tuple[str, str], TileArrays] = {}  # per process: each store's index is opened once
#: Index states kept whatever their age besides the one just published: jobs started a few rebuilds ago.
KEEP_STATES = 3
#: An older state is removed only when nobody opened it, or started an epoch on it, for this long (seconds).
STATE_TTL_S = 86_400.0
#: The file in a state folder whose mtime says when a job last opened the state or started an epoch on it.
LAST_USED = "last_used"


@dataclass
class TileArrays:
    """Flat per-tile arrays plus the small per-shard tables (see the module docstring)."""

    shard: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    level: np.ndarray
    mpps: list[float]
    shard_paths: list[str]  # absolute; for image folders a pseudo name
    shard_store: list[str] = field(default_factory=list)  # the store a shard belongs to ("" for folders)
    files: list[str] = field(default_factory=list)  # image-folder files, indexed by `offset`
    pins: list[dict[str, Any]] = field(default_factory=list)  # per source: how `reopen` finds exactly this set

    def __len__(self) -> int:
        return len(self.shard)

    def mpp(self, i: int) -> float | None:
        code = int(self.level[i])
        return None if code == NO_LEVEL else self.mpps[code]


def cache_root(store: Path) -> Path:
    """`<store>/.index` when writable, else a per-user cache (a read-only shared store still gets one)."""
    local = store / ".index"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pathssl" / "index"
    return base / hashlib.sha1(str(store.resolve()).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder (flock, or an owner-named lock file where the file system has no
    flock); none if the folder is unwritable."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ".build.lock").touch()
    except OSError:
        yield
        return
    with exclusive_lock(root / ".build.lock"):
        yield


def _build(store: Path) -> tuple[dict[str, np.ndarray], dict]:
    names, columns = read_locations(store)
    mpps = sorted({round(float(v), 4) for v in np.unique(columns["mpp"])})
    if len(mpps) >= NO_LEVEL:
        raise StoreError(f"{store}: {len(mpps)} distinct fields of view; at most {NO_LEVEL - 1} are supported")
    level = np.searchsorted(np.asarray(mpps), np.round(columns["mpp"], 4)).astype(np.uint8)
    shard_bytes = np.zeros(len(names), np.int64)
    shard_bytes[columns["shard"]] = columns["shard_bytes"]
    arrays = {"shard": columns["shard"], "offset": columns["offset"].astype(np.int64),
              "nbytes": columns["nbytes"].astype(np.int32), "level": level}
    meta = {"tiles": len(level), "mpps": mpps, "shards": names, "shard_bytes": shard_bytes.tolist()}
    return arrays, meta


def _write_cache(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Into a temporary folder renamed into place: concurrent ranks may race, the first rename wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(folder.parent)
    try:
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, array)
                os.fsync(fh.fileno())
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / LAST_USED).touch()
        try:
            os.rename(tmp, folder)
        except OSError:  # another process published the same state first
            return
        prune_states(folder.parent, keep=folder.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mark_used(folder: Path) -> None:
    """Record that a job maps this state now (see the module docstring); silent where the cache is read-only."""
    with contextlib.suppress(OSError):
        os.utime(folder / LAST_USED)


def _last_used(folder: Path) -> float:
    for path in (folder / LAST_USED, folder):  # states written before the mark existed: the folder's time
        with contextlib.suppress(OSError):
            return path.stat().st_mtime
    return 0.0


def prune_states(root: Path, keep: str, now: float | None = None) -> list[str]:
    """Remove states of `root` that no job can still map: not `keep`, not among the KEEP_STATES most recently
    used, and unused for STATE_TTL_S. Returns the names removed."""
    try:
        states = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != keep]
    except OSError:
        return []
    now = time.time() if now is None else now
    by_use = sorted(states, key=_last_used, reverse=True)
    removed = []
    for old in by_use[KEEP_STATES:]:
        if now - _last_used(old) > STATE_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
    return removed


def load_state(folder: Path, names: Iterable[str]) -> tuple[dict[str, np.ndarray], dict]:
    meta = json.loads((folder / "meta.json").read_text())
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}, meta


def cached_arrays(root: Path, state: str, names: Iterable[str],
                  build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> tuple[dict[str, np.ndarray], dict,
                                                                                    Path | None, bool]:
    """(arrays, meta, state folder or None, built here) of `state` under `root`: memory-mapped from the cache,
    built by `build()` once per node (the others wait on the lock, then map). Without a writable cache anywhere
    the built arrays stay this process's own (folder None)."""
    folder = root / state
    with _build_lock(root):  # the ranks of a node wait for one build instead of each paying for their own
        if not (folder / "meta.json").exists():
            arrays, meta = build()
            release_freed_memory()  # the Arrow tables are gone; their pages should not stay with this process
            try:
                _write_cache(folder, arrays, meta)
            except OSError:  # no writable cache anywhere: this process keeps its own copy
                return arrays, meta, None, True
            built = True
        else:
            built = False
        mark_used(folder)
        arrays, meta = load_state(folder, names)  # under the lock: a prune never races this open
    return arrays, meta, folder, built


def release_freed_memory() -> None:
    """Hand memory freed by large temporaries back to the OS (Arrow's pool, then glibc's heap).

    glibc raises its mmap threshold after a large free, so arrays of a few MB freed later stay in the heap
    and would count against every worker; `malloc_trim` returns them. A no-op where either is unavailable.
    """
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_shards(store: Path, meta: dict) -> None:
    """Every shard the index names exists with the size it had when its part was written."""
    rebuild = (f"delete that slide's part (parts/<slide_id>.parquet, the shard's name less its -NNNNN.tar) and "
               f"run `pathssl tile {store / 'spec.toml'}` again: it re-tiles only slides without a part")
    for name, expected in zip(meta["shards"], meta["shard_bytes"], strict=True):
        try:
            size = os.stat(store / name).st_size
        except FileNotFoundError:
            raise StoreError(f"{store}: the index lists {name}, which is missing. To rebuild it, {rebuild}") from None
        if size < expected:
            raise StoreError(f"{store}: {name} is truncated ({size} of {expected} bytes). To rebuild it, {rebuild}")
        if size != expected:
            raise StoreError(f"{store}: the index is stale: {name} has {size} bytes, its part recorded {expected} "
                             f"(the shard was rewritten after its part). To rebuild it, {rebuild}")


def open_store(store: str | Path, *, check: bool = True) -> TileArrays:
    """A store's tile arrays (memory-mapped, from the cache; built on first use), checked against its shards."""
    store = Path(store).absolute()
    _, state = index_source(store)
    key = (str(store), state)
    if key in _OPENED:
        return _OPENED[key]

    def build() -> tuple[dict[str, np.ndarray], dict]:
        arrays, meta = _build(store)
        if check:
            _check_shards(store, meta)
        return arrays, meta

    root = cache_root(store)
    arrays, meta, folder, built = cached_arrays(root, state, _ARRAYS, build)
    if check and not built:
        _check_shards(store, meta)
    if any(len(a) != meta["tiles"] for a in arrays.values()):
        raise StoreError(f"{store}: the index cache {folder} is damaged; delete {root} and start again")
    pin: dict[str, Any] = {"store": str(store), "state": state}
    if folder is not None:
        pin["cache"] = str(folder)
    else:  # nothing to reopen from: the arrays themselves travel to spawned workers
        pin.update(arrays=arrays, meta=meta)
    opened = _store_arrays(store, arrays, meta, pin)
    for old in [k for k in _OPENED if k[0] == key[0]]:  # an earlier state of this store: streams keep their own
        del _OPENED[old]
    _OPENED[key] = opened
    return opened


def _store_arrays(store: Path, arrays: dict[str, np.ndarray], meta: dict, pin: dict[str, Any]) -> TileArrays:
    return TileArrays(arrays["shard"], arrays["offset"], arrays["nbytes"], arrays["level"], meta["mpps"],
                      [str(store / n) for n in meta["shards"]], [str(store)] * len(meta["shards"]), pins=[pin])


def _reopen_store(pin: dict[str, Any]) -> TileArrays:
    """Exactly the state a pin names (in a spawned worker), never the store's newest one."""
    key = (pin["store"], pin["state"])
    if key in _OPENED:
        return _OPENED[key]
    if "arrays" in pin:
        arrays, meta = pin["arrays"], pin["meta"]
    else:
        folder = Path(pin["cache"])
        try:
            arrays, meta = load_state(folder, _ARRAYS)
        except FileNotFoundError:
            raise StoreError(f"{pin['store']}: the index state this job opened ({folder}) was removed while it "
                             "ran; states are kept while used (see pathssl_cli.data.tile_index), so something "
                             "else deleted it. Resume the run (run.resume = true): it opens the current state"
                             ) from None
        mark_used(folder)
    opened = _store_arrays(Path(pin["store"]), arrays, meta, pin)
    _OPENED[key] = opened
    return opened


def _open_folder(folder: Path, files: list[str] | None = None) -> TileArrays:
    if files is None:
        files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: neither a tile store (parts/*.parquet) nor a folder with images "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    n = len(files)
    shard = (np.arange(n) // FOLDER_SHARD).astype(np.int32)
    pseudo = [f"{folder}#folder-{i}" for i in range(int(shard[-1]) + 1)]
    # a folder's listing travels as is: a spawned worker must not see files added after the main process listed
    return TileArrays(shard, np.arange(n, dtype=np.int64), np.full(n, -1, np.int32), np.full(n, NO_LEVEL, np.uint8),
                      [], pseudo, [""] * len(pseudo), files, pins=[{"folder": str(folder), "files": files}])


def reopen(pins: list[dict[str, Any]]) -> TileArrays:
    """The tile set `open_sources` gave when it made these pins (`TileArrays.pins`), for a spawned worker."""
    return _join([_reopen_store(pin) if "store" in pin else _open_folder(Path(pin["folder"]), pin["files"])
                  for pin in pins])


def mark_pins_used(pins: list[dict[str, Any]]) -> None:
    """Touch the states a stream maps (at each epoch start), so that no prune removes them while it runs."""
    for pin in pins:
        if "cache" in pin:
            mark_used(Path(pin["cache"]))


def open_sources(sources: list[Path] | tuple[Path, ...]) -> TileArrays:
    """Every tile of every source in a fixed order: sources as given, then shard path and offset, or file path.

    One store alone is returned as its memory maps; several sources are joined into one set of arrays.
    """
    parts: list[TileArrays] = []
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"{source}: tile source not found (a tile store folder or an image folder)")
        parts.append(open_store(source) if is_store(source) else _open_folder(source))
    if not parts:
        raise FileNotFoundError("no tile sources given")
    return _join(parts)


def _join(parts: list[TileArrays]) -> TileArrays:
    if len(parts) == 1:
        return parts[0]
    mpps = sorted({m for p in parts for m in p.mpps})
    shards, offsets, levels, files = [], [], [], []
    shard_base = file_base = 0
    for p in parts:
        shards.append(p.shard + np.int32(shard_base))
        offsets.append(p.offset + file_base if p.files else p.offset)
        recode = np.array([mpps.index(m) for m in p.mpps] + [NO_LEVEL] * (256 - len(p.mpps)), np.uint8)
        levels.append(recode[p.level])
        shard_base += len(p.shard_paths)
        file_base += len(p.files)
        files += p.files
    return TileArrays(np.concatenate(shards), np.concatenate(offsets), np.concatenate([p.nbytes for p in parts]),
                      np.concatenate(levels), mpps, [s for p in parts for s in p.shard_paths],
                      [s for p in parts for s in p.shard_store], files, pins=[q for p in parts for q in p.pins])


class DamagedTile(WorkFailed):
    """A tile that cannot be read mid-run (exit 1). Keeps only its own message when a DataLoader worker's
    exception is re-raised in the main process (torch rebuilds it from a text that embeds the traceback)."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def damaged_message(index: TileArrays, i: int, reason: str) -> str:
    shard_path = index.shard_paths[int(index.shard[i])]
    store = index.shard_store[int(index.shard[i])]
    if not store:
        return (f"{index.files[int(index.offset[i])]}: cannot read this image ({reason}). Remove or replace it.")
    slide = Path(shard_path).name.rsplit("-", 1)[0]
    return (f"{shard_path}: damaged shard ({reason}, tile at byte {int(index.offset[i])}). Rebuild it: delete "
            f"{Path(store) / 'parts' / (slide + '.parquet')}, run `pathssl tile {Path(store) / 'spec.toml'}` "
            "(it re-tiles only that slide), then resume with run.resume = true: the last checkpoint is kept.")


class TileReader:
    """Encoded bytes of tile i: one `pread` at its offset, a few open files (LRU), no per-member tables."""

    def __init__(self, index: TileArrays, max_open: int = 8) -> None:
        self.index = index
        self.max_open = max(1, max_open)
        self.fds: dict[int, int] = {}  # shard id -> file descriptor, in least-recently-used order
        self.opens = 0  # shard files opened so far (each is a metadata-server round trip on Lustre)

    def read(self, i: int) -> bytes:
        index = self.index
        nbytes = int(index.nbytes[i])
        if nbytes < 0:
            return Path(index.files[int(index.offset[i])]).read_bytes()
        shard = int(index.shard[i])
        fd = self.fds.pop(shard, None)
        if fd is None:
            try:
                fd = os.open(index.shard_paths[shard], os.O_RDONLY)
            except OSError as exc:
                raise DamagedTile(damaged_message(index, i, f"cannot open: {exc.strerror}")) from None
            self.opens += 1
        self.fds[shard] = fd
        while len(self.fds) > self.max_open:
            os.close(self.fds.pop(next(iter(self.fds))))
        data = os.pread(fd, nbytes, int(index.offset[i]))
        if len(data) != nbytes:
            raise DamagedTile(damaged_message(index, i, f"truncated: {len(data)} of {nbytes} bytes at its offset"))
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
