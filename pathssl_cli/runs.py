"""Run directories, checkpoints and the metrics log, and the rule that decides whether a run directory holds
the run a spec asks for. Writes go through `pathssl_cli.fileio` (atomic, umask-honouring).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathssl_cli import __version__
from pathssl_cli.errors import PathsslError, SpecError
from pathssl_cli.fileio import atomic_path, atomic_write, fsync_dir, json_default, write_json

if TYPE_CHECKING:
    from pathssl_cli.specs.core import SpecModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


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
            fh.write(json.dumps(record, default=json_default) + "\n")
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
            "spec_digest": digest_of(tomllib.loads(resolved)),
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


# ------------------------------------------------------------------------------------ the run-directory rule
#: Spec fields that do not define what a run computes, by spec kind: where it is written, how fast it runs,
#: how often it reports. Every other field is in the run's digest, so changing it makes a different run.
#: Per-kind additions and why:
#: - pretrain: run.steps / run.epochs / run.epoch_images are left to pretrain's exact-resume check, which
#:   compares the whole plan (total steps, steps per pass, world size) and says which part changed.
#: - segment: the data folders may move, and the epoch counts may grow (extending a finished run is a resume);
#:   [predict] and model.checkpoint only matter to `segment eval|predict`, which write their own folders.
DIGEST_EXCLUDED_COMMON: tuple[str, ...] = (
    "run.output_dir", "run.resume", "run.device", "run.workers", "run.batch_size", "run.feature_cache",
    "run.log_every", "run.checkpoint_every", "run.compile", "data.workers", "train.workers",
)
DIGEST_EXCLUDED: dict[str, tuple[str, ...]] = {
    "pretrain": ("run.steps", "run.epochs", "run.epoch_images"),
    "segment": ("data.train", "data.val", "data.test", "train.phase1_epochs", "train.phase2_epochs",
                "predict", "model.checkpoint"),
}

#: Forcing, for the CLI's `pathssl --force COMMAND ...` and `pathssl study --force`: a run directory holding a
#: different run is moved aside instead of refused. A context variable, so that a library caller's setting
#: stays within the calls it wraps.
FORCE_REPLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("pathssl_force_replace", default=False)


def _drop_keys(data: dict[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data, default=json_default))  # a deep copy with JSON's types
    for key in dotted:
        *parents, last = key.split(".")
        table = out
        for part in parents:
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict):
            table.pop(last, None)
    return out


def digest_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved spec (as spec.toml holds it) that defines what the run computes."""
    kind = str(data.get("kind"))
    return _drop_keys(data, (*DIGEST_EXCLUDED_COMMON, *DIGEST_EXCLUDED.get(kind, ())))


def digest_of(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(digest_fields(data), sort_keys=True).encode()).hexdigest()


def spec_data(spec: SpecModel) -> dict[str, Any]:
    """The spec as `spec.toml` stores it (TOML has no null: unset optional fields are absent)."""
    from pathssl_cli.specs import spec_to_toml

    return tomllib.loads(spec_to_toml(spec))


def spec_digest(spec: SpecModel) -> str:
    """sha256 of the fields that define the run (see DIGEST_EXCLUDED); recorded in run.json as spec_digest."""
    return digest_of(spec_data(spec))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{dotted}.")
        elif a != b:
            found.append(f"{dotted}: {a!r} → {b!r}")
    return found


def _drop_new_defaults(old: dict[str, Any], new: dict[str, Any], model: Any) -> None:
    """Forget fields of `new` that the stored spec lacks but that hold their default: a field added to pathssl
    after the run was written does not make it another run, while a value the user set still does."""
    from pydantic import BaseModel

    from pathssl_cli.specs import without_none

    for key in [k for k in new if k not in old or isinstance(new[k], dict)]:
        field = type(model).model_fields.get(key) if isinstance(model, BaseModel) else None
        if key in old and isinstance(old[key], dict):
            _drop_new_defaults(old[key], new[key], getattr(model, key, None))
        elif key not in old and field is not None and not field.is_required():
            default = field.get_default(call_default_factory=True)
            as_json = json.loads(json.dumps(default.model_dump(mode="json") if isinstance(default, BaseModel)
                                            else default, default=json_default))
            if without_none(as_json) == new[key]:
                del new[key]


@dataclass(frozen=True)
class RunState:
    """What a run directory holds, compared with a spec.

    status: 'new' (no run there), 'done' (finished, same digest), 'failed' (same digest, its run.json error),
    'interrupted' (same digest, run.json still says running: killed, or running now elsewhere) or 'different'
    (a run of another spec, or one whose spec.toml cannot be read; `changes` lists what differs).
    """

    path: Path
    status: str
    error: str | None = None
    changes: tuple[str, ...] = ()


def run_state(spec: SpecModel, output_dir: str | Path) -> RunState:
    """Compare the run in `output_dir` (its run.json and spec.toml) with `spec`; reads only, never writes."""
    path = Path(output_dir)
    record_path, spec_path = path / "run.json", path / "spec.toml"
    if not record_path.is_file():
        return RunState(path, "new")
    try:
        record = json.loads(record_path.read_text())
        stored = tomllib.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        return RunState(path, "different", changes=(f"its run.json or spec.toml cannot be read ({exc})",))
    old, new = digest_fields(stored), digest_fields(spec_data(spec))
    _drop_new_defaults(old, new, spec)
    if old != new:
        return RunState(path, "different", changes=tuple(_differences(old, new)) or ("the spec digest",))
    status = record.get("status")
    if status == "done":
        return RunState(path, "done")
    if status == "failed":
        return RunState(path, "failed", error=record.get("error"))
    return RunState(path, "interrupted")


def claim_run_dir(spec: SpecModel, output_dir: str | Path, *, force: bool | None = None,
                  is_main: bool = True) -> RunState:
    """The one rule every command that writes a run directory applies before touching it.

    - no run there: start one;
    - a run of the same spec (same digest): the command resumes it (or, if done, redoes or skips it);
    - a run of a different spec: refused (SpecError, exit 2, nothing written), because resuming it would mix
      two runs and report the old result as the new one; with `force` (default: FORCE_REPLACE) the old run is
      moved aside to `<dir>.replaced-<UTC time>` and a new one starts.
    Returns the state found (after a forced move: 'new'). Under torchrun every rank calls it; only the main
    rank moves, and the ranks meet at a barrier so that none reads the old run after the move.
    """
    state = run_state(spec, output_dir)
    if state.status != "different":
        _barrier()
        return state
    if force if force is not None else FORCE_REPLACE.get():
        if not is_main:
            _barrier()
            return RunState(state.path, "new")
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = state.path.with_name(f"{state.path.name}.replaced-{stamp}")
        os.replace(state.path, aside)
        fsync_dir(state.path.parent)
        from pathssl_cli.console import warn

        warn(f"{state.path} held a different run; moved it to {aside} and starting over")
        _barrier()
        return RunState(state.path, "new")
    shown = "; ".join(state.changes[:8]) + (f"; and {len(state.changes) - 8} more" if len(state.changes) > 8
                                            else "")
    raise SpecError(
        f"{state.path} holds a different {getattr(spec, 'kind', '')} run ({shown}). Resuming it would mix two "
        "runs and report the old result. Choose another run.output_dir, or force a new run there with "
        "`pathssl --force ...` (the old run is moved aside to <dir>.replaced-<time>).")


def _barrier() -> None:
    # Without importing torch: commands that never start a process group (tile, subsample) must not pay for it.
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
