"""File helpers at the bottom of the house: atomic writes that honour the user's umask, and a lock that also
works on file systems without `flock`. Imports nothing of pathssl's, so every module may import it.

Atomic writes: everything is written under a temporary name in the same directory, flushed and fsynced, then
renamed (rename is atomic on POSIX file systems), so a partial output never looks complete.

Permissions: `tempfile.mkstemp` creates files 0600 and `mkdtemp` folders 0700 whatever the umask, which would
leave a shared store (or a run directory) unreadable by colleagues. Files written here get `0o666 & ~umask`
and folders `0o777 & ~umask`, as `open()` and `mkdir()` would give them.

Locks: an advisory `flock` where the file system has it (released by the kernel when the holder dies). Lustre
mounted without `flock`, and some FUSE and NFS mounts, answer ENOSYS / EOPNOTSUPP / ENOLCK; there the lock is
an `O_EXCL` lock file that names its owner (host, pid) and is refreshed while held, and a lock whose owner is
gone (a dead pid on this host, or no refresh for `STALE_AFTER_S` from another host) is reclaimed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: errnos with which a file system says it has no flock (Lustre without -o flock: ENOSYS; FUSE/NFS variants).
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL})
#: A lock file not refreshed for this long, written by another host, is taken to be left by a dead job.
STALE_AFTER_S = 300.0
#: How often a held lock file is refreshed (its mtime), far below STALE_AFTER_S.
HEARTBEAT_S = 30.0
_warned_no_flock: set[str] = set()
_umask_cache: list[int] = []


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting it back."""
    if _umask_cache:
        return _umask_cache[0]
    mask: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    _umask_cache.append(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def temporary_folder(parent: Path, prefix: str = ".tmp-") -> Path:
    """A new folder in `parent` (created if needed) with the mode `mkdir` would give it under the umask."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, folder_mode())
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`, else removed.

    The file has the mode `open()` would give it (0o666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; not every file system allows opening a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def json_default(value: Any) -> Any:
    """JSON for paths and numpy / torch scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=json_default) + "\n")


# ---------------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, blocking: bool = True, poll_s: float = 0.05) -> Iterator[bool]:
    """Hold `path` exclusively across processes and hosts; yields True when held, False when `blocking` is
    False and another process holds it. `flock` where the file system supports it, else an owner-named lock
    file `<path>.owner` (see the module docstring); which one is used is said once per folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            if exc.errno not in NO_FLOCK_ERRNOS:
                raise
            _say_no_flock(path.parent, exc)
        else:
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return
    with owner_file_lock(path.with_name(path.name + ".owner"), blocking=blocking, poll_s=poll_s) as held:
        yield held


def _say_no_flock(folder: Path, exc: OSError) -> None:
    key = str(folder)
    if key in _warned_no_flock:
        return
    _warned_no_flock.add(key)
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {folder}: the file system has no flock ({os.strerror(exc.errno or 0)}); using lock "
              "files that name their owner (host, pid) instead, reclaimed when the owner is gone",
              file=sys.stderr, flush=True)


def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "time": time.time()}


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def owner_is_gone(path: Path, record: dict[str, Any] | None, now: float | None = None) -> bool:
    """A lock file left by a process that no longer runs: a dead pid on this host, or (any host) a lock file
    not refreshed for STALE_AFTER_S. An unreadable record (a writer caught mid-write) counts as alive until it
    is stale by age."""
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if record is not None and record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                pass
    return age > STALE_AFTER_S


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` only if it does not exist (atomic on local and NFSv3+ file systems)."""
    tmp = path.with_name(f".{path.name}.{record['token']}")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)  # link(2) is the create-if-absent that NFS honours; O_EXCL was not, before NFSv3
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _reclaim(path: Path, stale: dict[str, Any] | None) -> None:
    """Move a stale lock file aside; if a live owner replaced it meanwhile, put that one back."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_owner(aside) != stale:  # the file changed hands between our read and our rename
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def owner_file_lock(path: Path, *, blocking: bool = True, poll_s: float = 0.05) -> Iterator[bool]:
    """The lock without flock: `path` exists while held and names its owner; refreshed every HEARTBEAT_S."""
    record = _owner_record()
    wait = poll_s
    while not _try_create(path, record):
        found = _read_owner(path)
        if owner_is_gone(path, found):
            _reclaim(path, found)
            continue
        if not blocking:
            yield False
            return
        time.sleep(wait)  # polling is the only wait a lock file offers; back off to spare the metadata server
        wait = min(wait * 2, 2.0)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    beat = threading.Thread(target=heartbeat, name="pathssl-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        if _read_owner(path) == record:
            path.unlink(missing_ok=True)
