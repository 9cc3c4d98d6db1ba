"""Run directories, atomic writes, checkpoints and the metrics log.

A partial output must never look complete: everything is written under a temporary name in the same directory,
flushed and fsynced, then renamed (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathssl_cli import __version__
from pathssl_cli.errors import PathsslError

if TYPE_CHECKING:
    from pathssl_cli.specs.core import SpecModel


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every file system allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save a plain dict of tensors/state_dicts atomically; load it back with `load_checkpoint`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing code from the file (`weights_only=True`), onto the CPU."""
    import torch

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PathsslError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        raise PathsslError(f"{path}: cannot load as a checkpoint without running code from it ({exc}). "
                           "pathssl only loads plain tensors and dicts (torch.load weights_only=True).") from None
    if not isinstance(state, dict):
        raise PathsslError(f"{path}: expected a dict checkpoint, found {type(state).__name__}")
    return state


class MetricsLog:
    """Append-only JSONL metrics (one object per line), mirrored to TensorBoard when it is installed."""

    def __init__(self, path: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self._writer: Any = None
        self._tensorboard = tensorboard

    def _open_writer(self) -> None:
        # On first use only: importing TensorBoard imports torch (seconds, ~600 MB), which commands that never
        # log metrics (tile) must not pay.
        self._tensorboard = False
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
        if self._tensorboard:
            self._open_writer()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(key, value, step)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class RunDir:
    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = path
        self.is_main = is_main
        self.metrics = MetricsLog(path / "metrics.jsonl", tensorboard=is_main)
        # Facts learnt while running (e.g. which slide reader decoded the slides), merged into run.json at the end.
        self.record: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        if self.is_main:
            write_json(target, obj)
        return target


def _git_state(directory: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"pathssl": __version__, "python": platform.python_version()}
    for module in ("torch", "timm", "torchvision"):
        mod = sys.modules.get(module)
        if mod is not None:
            found[module] = getattr(mod, "__version__", None)
            continue
        # Installed metadata, not an import: importing torch costs seconds in torch-free commands (tile).
        try:
            found[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            found[module] = None
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def open_run(spec: SpecModel, output_dir: str | Path, *, seed: int | None = None, world_size: int = 1,
             is_main: bool = True) -> Iterator[RunDir]:
    """Create the run directory with `spec.toml` and `run.json`, and record how the run ended.

    `run.json` holds versions, the spec's sha256, the git commit (and dirtiness) of the spec's repository, the
    seed, the world size, the host, start/end times and the status: running, done or failed with the error.
    """
    from pathssl_cli.specs import spec_to_toml

    path = Path(output_dir)
    run = RunDir(path, is_main=is_main)
    record: dict[str, Any] = {}
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        resolved = spec_to_toml(spec)
        atomic_write(path / "spec.toml", resolved)
        source = spec.source_file
        record = {
            "kind": getattr(spec, "kind", None),
            "status": "running",
            "versions": _versions(),
            "spec_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
            "spec_file": str(source) if source else None,
            "spec_file_sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source and source.exists()
            else None,
            "git": _git_state(source.parent) if source else {"commit": None, "dirty": None},
            "seed": seed,
            "world_size": world_size,
            "host": socket.gethostname(),
            "argv": sys.argv,
            "started": _now(),
            "ended": None,
            "error": None,
        }
        write_json(path / "run.json", record)
    try:
        yield run
    except BaseException as exc:
        if is_main:
            record.update(run.record)
            record.update(status="failed", ended=_now(),
                          error=str(exc) if isinstance(exc, PathsslError) else
                          "".join(traceback.format_exception_only(type(exc), exc)).strip())
            write_json(path / "run.json", record)
        raise
    finally:
        run.metrics.close()
    if is_main:
        record.update(run.record)
        record.update(status="done", ended=_now())
        write_json(path / "run.json", record)
