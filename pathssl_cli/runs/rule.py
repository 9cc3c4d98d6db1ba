"""The run-directory rule: whether a run directory holds the run a spec asks for, finished and current.

A run is the same run when its stored spec.toml matches the spec on the fields that define the result (the
digest; `DIGEST_EXCLUDED`), and current when the inputs it recorded in run.json (`fingerprints`: files by
content, data folders by listing, the command's protocol version) are what they are now.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pathssl_cli.errors import SpecError
from pathssl_cli.fileio import fsync_dir, json_default
from pathssl_cli.runs.fingerprints import compare, input_fingerprints

if TYPE_CHECKING:
    from pathssl_cli.specs.core import SpecModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Spec fields that do not define what a run computes, by command: where it is written, how fast it runs,
#: how often it reports. Every other field is in the run's digest, so changing it makes a different run.
#: Per-command additions and why:
#: - pretrain: run.steps / run.epochs / run.epoch_images are left to pretrain's exact-resume check, which
#:   compares the whole plan (total steps, steps per pass, world size) and says which part changed.
#: - segment train: the data folders may move (their contents are fingerprinted by listing), and the epoch
#:   counts may grow (extending a finished run is a resume); [predict] and model.checkpoint only matter to
#:   `segment eval|predict`, which write their own folders.
#: - segment eval: the data folders (fingerprinted by listing, the evaluated split only) and the epoch counts
#:   (the trained model is fingerprinted by its sha256); the [predict] fields that only whole-slide prediction
#:   reads. The tta, trim, batch size and post-processing are compared: they change the PQ.
DIGEST_EXCLUDED_COMMON: tuple[str, ...] = (
    "run.output_dir", "run.resume", "run.device", "run.workers", "run.batch_size", "run.feature_cache",
    "run.log_every", "run.checkpoint_every", "run.compile", "data.workers", "train.workers",
)
_SEGMENT_DATA = ("data.train", "data.val", "data.test", "train.phase1_epochs", "train.phase2_epochs")
_SLIDE_ONLY_PREDICT = tuple(f"predict.{name}" for name in (
    "inputs", "region", "reader", "mpp", "mpp_override", "tissue_only", "chunk_size", "chunk_margin", "map_format",
    "overlay", "overlay_max_px"))
DIGEST_EXCLUDED: dict[str, tuple[str, ...]] = {
    "pretrain": ("run.steps", "run.epochs", "run.epoch_images"),
    "segment train": (*_SEGMENT_DATA, "predict", "model.checkpoint"),
    "segment eval": (*_SEGMENT_DATA, *_SLIDE_ONLY_PREDICT),
    "segment predict": _SEGMENT_DATA,
}

#: Forcing, for the CLI's `pathssl --force COMMAND ...` and `pathssl study --force`: a run directory holding a
#: different or stale run is moved aside instead of refused. A context variable, so that a library caller's
#: setting stays within the calls it wraps.
FORCE_REPLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("pathssl_force_replace", default=False)

#: "result": a run is current only if every input it depends on is recorded and unchanged (evaluations, a
#: study's runs). "resume": training that continues from its checkpoints (pretrain, segment train, finetune)
#: refuses inputs recorded with other fingerprints, but a run recorded before fingerprints existed resumes.
Rule = Literal["result", "resume"]


def command_of(spec: Any, command: str | None = None) -> str:
    """The command a run directory belongs to: given, else the spec's kind ('segment' alone: segment train)."""
    if command:
        return command
    kind = str(getattr(spec, "kind", None) if not isinstance(spec, dict) else spec.get("kind"))
    return "segment train" if kind == "segment" else kind


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


def digest_fields(data: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """The part of a resolved spec (as spec.toml holds it) that defines what `command`'s run computes."""
    command = command_of(data, command)
    return _drop_keys(data, (*DIGEST_EXCLUDED_COMMON, *DIGEST_EXCLUDED.get(command, ())))


def digest_of(data: dict[str, Any], command: str | None = None) -> str:
    return hashlib.sha256(json.dumps(digest_fields(data, command), sort_keys=True).encode()).hexdigest()


def spec_data(spec: SpecModel) -> dict[str, Any]:
    """The spec as `spec.toml` stores it (TOML has no null: unset optional fields are absent)."""
    from pathssl_cli.specs import spec_to_toml

    return tomllib.loads(spec_to_toml(spec))


def spec_digest(spec: SpecModel, command: str | None = None) -> str:
    """sha256 of the fields that define the run (see DIGEST_EXCLUDED); recorded in run.json as spec_digest."""
    return digest_of(spec_data(spec), command_of(spec, command))


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
    after the run was written does not make it another run, while a value the user set still does. (A default
    that changes what is computed is a protocol version bump: `protocols.py`.)"""
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

    status: 'new' (no run there), 'done' (finished, same digest, same inputs), 'failed' (same digest, its
    run.json error), 'interrupted' (same digest, run.json still says running: killed, or running now elsewhere),
    'different' (a run of another spec, or one whose spec.toml cannot be read) or 'stale' (the same spec, but
    an input or the command's protocol differs from what the run recorded, or the run recorded none). For
    'different' and 'stale', `changes` lists what differs.
    """

    path: Path
    status: str
    error: str | None = None
    changes: tuple[str, ...] = ()


def run_state(spec: SpecModel, output_dir: str | Path, command: str | None = None, *,
              rule: Rule = "result") -> RunState:
    """Compare the run in `output_dir` (its run.json and spec.toml) with `spec`; reads only, never writes."""
    command = command_of(spec, command)
    path = Path(output_dir)
    record_path, spec_path = path / "run.json", path / "spec.toml"
    if not record_path.is_file():
        return RunState(path, "new")
    try:
        record = json.loads(record_path.read_text())
        stored = tomllib.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        return RunState(path, "different", changes=(f"its run.json or spec.toml cannot be read ({exc})",))
    old, new = digest_fields(stored, command), digest_fields(spec_data(spec), command)
    _drop_new_defaults(old, new, spec)
    if old != new:
        return RunState(path, "different", changes=tuple(_differences(old, new)) or ("the spec digest",))
    found = compare(record.get("fingerprints"), input_fingerprints(spec, command), command)
    stale = found.changed + (found.unrecorded if rule == "result" else ())
    if stale:
        return RunState(path, "stale", changes=stale)
    status = record.get("status")
    if status == "done":
        return RunState(path, "done")
    if status == "failed":
        return RunState(path, "failed", error=record.get("error"))
    return RunState(path, "interrupted")


def move_aside(path: Path) -> Path:
    """Move a run directory to `<dir>.replaced-<UTC time>` (nothing is deleted); returns where it went."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while aside.exists():  # two moves within a second (a run and its eval folder)
        n += 1
        aside = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def claim_run_dir(spec: SpecModel, output_dir: str | Path, command: str | None = None, *, rule: Rule = "result",
                  force: bool | None = None, is_main: bool = True) -> RunState:
    """The one rule every command that writes a run directory applies before touching it.

    - no run there: start one;
    - a run of the same spec (same digest) made from the same inputs: the command resumes it (or, if done,
      redoes or skips it);
    - a run of a different spec, or a stale one (an input or the protocol changed, see `run_state`; by
      `rule`): refused (SpecError, exit 2, nothing written), because resuming it would mix two runs and report
      the old result as the new one; with `force` (default: FORCE_REPLACE) the old run is moved aside to
      `<dir>.replaced-<UTC time>` and a new one starts (forcing applies the "result" rule whatever `rule` says).
    Returns the state found (after a forced move: 'new'). Under torchrun every rank calls it; only the main
    rank moves, and the ranks meet at a barrier so that none reads the old run after the move.
    """
    command = command_of(spec, command)
    forced = force if force is not None else FORCE_REPLACE.get()
    # Forcing asks for a run that is current: by the result rule, so an unverified training starts over too.
    state = run_state(spec, output_dir, command, rule="result" if forced else rule)
    if state.status not in ("different", "stale"):
        _barrier()
        return state
    if forced:
        if not is_main:
            _barrier()
            return RunState(state.path, "new")
        aside = move_aside(state.path)
        from pathssl_cli.console import warn

        what = "a different run" if state.status == "different" else "a run made from other inputs"
        warn(f"{state.path} held {what}; moved it to {aside} and starting over")
        _barrier()
        return RunState(state.path, "new")
    shown = "; ".join(state.changes[:8]) + (f"; and {len(state.changes) - 8} more" if len(state.changes) > 8
                                            else "")
    if state.status == "different":
        raise SpecError(
            f"{state.path} holds a different {command} run ({shown}). Resuming it would mix two runs and report "
            "the old result. Choose another run.output_dir, or force a new run there with `pathssl --force ...` "
            "(the old run is moved aside to <dir>.replaced-<time>).")
    raise SpecError(
        f"{state.path} holds a {command} run of this spec made from other inputs ({shown}). Its result would be "
        "reported as if it came from the current ones. Force a new run there with `pathssl --force ...` (the old "
        "run is moved aside to <dir>.replaced-<time>), or choose another run.output_dir.")


def _barrier() -> None:
    # Without importing torch: commands that never start a process group (tile, subsample) must not pay for it.
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
