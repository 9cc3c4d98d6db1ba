"""The bottom-of-the-house file helpers: written files honour the umask, and the lock works without flock.

Issue 20 §4: `mkstemp` (0600) and `mkdtemp` (0700) left parts, index caches and run files unreadable by
colleagues under umask 022; Lustre without flock (ENOSYS) aborted `pathssl tile` and the stream.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pathssl_cli import fileio


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    fileio._umask_cache.clear()
    yield
    os.umask(old)
    fileio._umask_cache.clear()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_are_readable_by_others_under_umask_022(tmp_path, umask_022):
    fileio.atomic_write(tmp_path / "a.json", "{}")
    fileio.write_json(tmp_path / "b.json", {"x": 1})
    with fileio.atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"x")
    for name in ("a.json", "b.json", "c.bin"):
        assert _mode(tmp_path / name) == 0o644, name


def test_umask_027_is_honoured_too(tmp_path):
    old = os.umask(0o027)
    fileio._umask_cache.clear()
    try:
        fileio.atomic_write(tmp_path / "a", "x")
        folder = fileio.temporary_folder(tmp_path)
        assert _mode(tmp_path / "a") == 0o640
        assert _mode(folder) == 0o750
    finally:
        os.umask(old)
        fileio._umask_cache.clear()


def test_temporary_folder_gets_mkdir_mode(tmp_path, umask_022):
    assert _mode(fileio.temporary_folder(tmp_path / "cache")) == 0o755


def test_index_cache_and_store_files_are_shared_readable(tmp_path, umask_022):
    """The index cache (.index/<state>/*.npy, meta.json) that other users memory-map."""
    import numpy as np

    from pathssl_cli.data.tile_index import _write_cache

    folder = tmp_path / ".index" / "state1"
    _write_cache(folder, {"shard": np.zeros(3, np.int32)}, {"tiles": 3})
    assert _mode(folder) == 0o755
    for file in folder.iterdir():
        assert _mode(file) == 0o644, file.name


# ---------------------------------------------------------------------------------------------------- locks
@pytest.fixture
def no_flock(monkeypatch):
    """A file system that answers flock with ENOSYS, as Lustre mounted without -o flock does."""

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", refuse)
    fileio._warned_no_flock.clear()


def test_without_flock_the_lock_falls_back_and_excludes(tmp_path, no_flock, capsys):
    lock = tmp_path / "locks" / "slide.lock"
    with fileio.exclusive_lock(lock, blocking=False) as first:
        assert first
        assert (tmp_path / "locks" / "slide.lock.owner").exists()
        record = json.loads((tmp_path / "locks" / "slide.lock.owner").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with fileio.exclusive_lock(lock, blocking=False) as second:
            assert not second
    assert not (tmp_path / "locks" / "slide.lock.owner").exists()
    with fileio.exclusive_lock(lock, blocking=False) as again:
        assert again
    assert capsys.readouterr().err.count("has no flock") == 1  # said once per folder


def test_other_errors_of_flock_are_not_swallowed(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O"), fileio.exclusive_lock(tmp_path / "x.lock"):
        pass


def test_a_lock_left_by_a_dead_process_is_reclaimed(tmp_path, no_flock):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    owner = tmp_path / "slide.lock.owner"
    owner.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old"}))
    with fileio.exclusive_lock(tmp_path / "slide.lock", blocking=False) as held:
        assert held
        assert json.loads(owner.read_text())["pid"] == os.getpid()


def test_a_live_lock_of_another_host_is_respected_until_stale(tmp_path, no_flock, monkeypatch):
    owner = tmp_path / "slide.lock.owner"
    owner.write_text(json.dumps({"host": "another-node", "pid": 1, "token": "t"}))
    with fileio.exclusive_lock(tmp_path / "slide.lock", blocking=False) as held:
        assert not held
    old = owner.stat().st_mtime - fileio.STALE_AFTER_S - 10
    os.utime(owner, (old, old))
    with fileio.exclusive_lock(tmp_path / "slide.lock", blocking=False) as held:
        assert held


def test_blocking_fallback_lock_serialises_processes(tmp_path):
    """Two processes without flock increment a counter file 20 times each under the lock: no update is lost."""
    script = textwrap.dedent(f"""
        import errno, fcntl, os
        from pathlib import Path
        def refuse(fd, op):
            raise OSError(errno.ENOSYS, "no flock")
        fcntl.flock = refuse
        from pathssl_cli.fileio import exclusive_lock
        counter = Path({str(tmp_path / "counter")!r})
        for _ in range(20):
            with exclusive_lock(Path({str(tmp_path / "c.lock")!r}), poll_s=0.001) as held:
                assert held
                value = int(counter.read_text())
                counter.write_text(str(value + 1))
    """)
    (tmp_path / "counter").write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert (tmp_path / "counter").read_text() == "40"


def test_threads_in_one_process_exclude_each_other_with_flock(tmp_path):
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with fileio.exclusive_lock(tmp_path / "a.lock"):
            inside.set()
            release.wait()
            order.append("holder")

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait()
    with fileio.exclusive_lock(tmp_path / "a.lock", blocking=False) as held:
        assert not held
    release.set()
    thread.join()
    assert order == ["holder"]
