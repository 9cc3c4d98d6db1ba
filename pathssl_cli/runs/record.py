"""The run directory and its run.json: what ran (spec, versions, git state, inputs' fingerprints), where, when,
and how it ended."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathssl_cli import __version__
from pathssl_cli.errors import PathsslError
from pathssl_cli.fileio import atomic_write, write_json
from pathssl_cli.runs.fingerprints import input_fingerprints
from pathssl_cli.runs.metrics_log import MetricsLog
from pathssl_cli.runs.rule import command_of, digest_of

if TYPE_CHECKING:
    from pathssl_cli.specs.core import SpecModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


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


def _fingerprints(spec: SpecModel, path: Path, command: str, resumed: bool) -> dict[str, Any] | None:
    """The inputs' fingerprints now; for a resumed training, those its run recorded when it began (None when it
    began before fingerprints existed): a resumed run is no better verified than the run it continues."""
    if not resumed:
        return input_fingerprints(spec, command)
    try:
        previous = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = previous.get("fingerprints") if isinstance(previous, dict) else None
    return recorded if isinstance(recorded, dict) else None


@contextlib.contextmanager
def open_run(spec: SpecModel, output_dir: str | Path, *, command: str | None = None, seed: int | None = None,
             world_size: int = 1, is_main: bool = True, resumed: bool = False) -> Iterator[RunDir]:
    """Create the run directory with `spec.toml` and `run.json`, and record how the run ended.

    `run.json` holds the command, versions, the spec's sha256 and digest, the inputs' fingerprints (see
    `runs.fingerprints`; `resumed` keeps those of the run being continued), the git commit (and dirtiness) of
    the spec's repository, the seed, the world size, the host, start/end times and the status: running, done
    or failed with the error.
    """
    from pathssl_cli.specs import spec_to_toml

    path = Path(output_dir)
    command = command_of(spec, command)
    run = RunDir(path, is_main=is_main)
    record: dict[str, Any] = {}
    if is_main:
        fingerprints = _fingerprints(spec, path, command, resumed)
        path.mkdir(parents=True, exist_ok=True)
        resolved = spec_to_toml(spec)
        atomic_write(path / "spec.toml", resolved)
        source = spec.source_file
        record = {
            "kind": getattr(spec, "kind", None),
            "command": command,
            "status": "running",
            "versions": _versions(),
            "spec_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
            "spec_digest": digest_of(tomllib.loads(resolved), command),
            "fingerprints": fingerprints,
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
