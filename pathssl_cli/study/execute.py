"""Running a study: the runs in order, failures that do not stop the grid, SLURM arrays.

A run is skipped when done with an unchanged spec and unchanged inputs (`study.status`), retried when it failed,
resumed by its own command when it was interrupted, rerun when stale (an input changed: the old run is moved
aside), and refused when its spec changed unless forced. A kill -9 loses at most the run in progress: every run
keeps its own `run.json`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pathssl_cli.console import info
from pathssl_cli.errors import PathsslError, Problem, SpecError, WorkFailed
from pathssl_cli.fileio import atomic_write, write_json
from pathssl_cli.runs import FORCE_REPLACE, move_aside, open_run
from pathssl_cli.study.plan import Plan, PlannedRun, build_plan
from pathssl_cli.study.status import STATUS_WORDS, Status, run_status


# ----------------------------------------------------------------------------------------------- dry run
def print_plan(plan: Plan) -> dict[str, int]:
    counts = dict.fromkeys(STATUS_WORDS, 0)
    for run in plan.runs:
        status = run_status(run)
        counts[status.word] += 1
        needs = f"  (needs {', '.join(str(i) for i in run.needs)})" if run.needs else ""
        print(f"[{run.index}] {status.word:11} {run.name}{needs}")
        for line in run.command_lines():
            print(f"      {line}")
        if status.error and status.word == "failed":
            print(f"      error: {status.error}")
        if status.changes:
            print(f"      {status.word}: {'; '.join(status.changes[:5])}")
    print(f"{len(plan.runs)} runs: " + ", ".join(f"{n} {w}" for w, n in counts.items() if n))
    return counts


# ------------------------------------------------------------------------------------------------- running
def _execute(run: PlannedRun) -> None:
    spec = run.load(check_inputs=True)
    if run.kind == "subsample":
        from pathssl_cli.data.subsample import run_subsample

        run_subsample(spec)
    elif run.kind == "linear":
        from pathssl_cli.evaluate.linear import run_linear

        run_linear(spec)
    elif run.kind == "finetune":
        from pathssl_cli.evaluate.finetune import run_finetune

        run_finetune(spec)
    elif run.kind == "knn":
        from pathssl_cli.evaluate.knn import run_knn

        run_knn(spec)
    else:
        from pathssl_cli.segment.evaluate import run_segment_eval
        from pathssl_cli.segment.train import run_segment_train

        run_segment_train(spec)
        run_segment_eval(spec)


def _error_of(run: PlannedRun, exc: BaseException) -> str:
    """The run.json error. A run refused before its command wrote anything (its inputs, checked when it is
    due: a subset file that does not fit the data) gets a run.json saying so, so that the plan shows it failed."""
    status = run_status(run)
    if status.word == "pending":
        with contextlib.suppress(PathsslError, OSError):
            with open_run(run.load(check_inputs=False), run.output_dir):
                raise exc
        status = run_status(run)
    if status.word == "failed" and status.error:
        return status.error
    return str(exc) if isinstance(exc, PathsslError) else f"{type(exc).__name__}: {exc}"


def run_plan(plan: Plan, indices: list[int], *, force: bool) -> list[tuple[PlannedRun, str]]:
    """Run `indices` in order (done ones skipped); returns the failures (run, error)."""
    failures: list[tuple[PlannedRun, str]] = []
    failed: set[int] = set()
    outcome: dict[str, dict[str, Any]] = {}
    token = FORCE_REPLACE.set(force)
    try:
        for position, index in enumerate(indices):
            run = plan.runs[index]
            left = len(indices) - position - 1
            status = run_status(run)
            if status.word == "done":
                info(f"[{index}] {run.name}: done, skipped ({left} left)")
                outcome[run.name] = {"status": "done"}
                continue
            blocked = [i for i in run.needs if i in failed]
            if blocked:
                error = f"not started: it needs {plan.runs[blocked[0]].name}, which failed"
                failures.append((run, error))
                failed.add(index)
                outcome[run.name] = {"status": "failed", "error": error}
                info(f"[{index}] {run.name}: failed ({error}) ({left} left)")
                continue
            verb = {"failed": "retrying", "interrupted": "resuming", "changed": "replacing"}.get(status.word,
                                                                                                   "running")
            if status.word == "stale":
                verb = _set_aside(run, status)
            info(f"[{index}] {run.name}: {verb} ...")
            started = time.monotonic()
            try:
                _execute(run)
            except (PathsslError, Exception) as exc:  # a failure must not stop the grid; KeyboardInterrupt does
                error = _error_of(run, exc)
                failures.append((run, error))
                failed.add(index)
                outcome[run.name] = {"status": "failed", "error": error}
                info(f"[{index}] {run.name}: failed after {time.monotonic() - started:.0f} s: "
                     f"{error.splitlines()[0] if error else ''} ({left} left)")
                continue
            outcome[run.name] = {"status": "done"}
            info(f"[{index}] {run.name}: done in {time.monotonic() - started:.0f} s ({left} left)")
    finally:
        FORCE_REPLACE.reset(token)
        _write_plan_record(plan, outcome)
    return failures


def _set_aside(run: PlannedRun, status: Status) -> str:
    """Move a stale run's directories aside (the study made them, so it replaces them as --force would)."""
    moved = [f"{path} → {move_aside(path).name}" for path in status.stale if path.exists()]
    return (f"rerunning, its inputs changed ({'; '.join(status.changes[:3])}); moved aside: {', '.join(moved)}")


def _write_plan_record(plan: Plan, outcome: dict[str, dict[str, Any]]) -> None:
    """plan.json: what the study meant to run, and how each run ended in this invocation."""
    record = {
        "study": plan.spec.study.name,
        "spec_file": str(plan.spec.source_file) if plan.spec.source_file else None,
        "runs": [{"index": r.index, "name": r.name, "kind": r.kind, "output_dir": str(r.output_dir),
                  "commands": r.command_lines(), "needs": list(r.needs),
                  **outcome.get(r.name, {})} for r in plan.runs],
    }
    write_json(plan.root / "plan.json", record)


def with_needs(plan: Plan, index: int) -> list[int]:
    """Run `index` and, first, the runs it needs (subsets) that are not done: one array task stands alone."""
    order: list[int] = []
    for need in plan.runs[index].needs:
        order += [i for i in with_needs(plan, need) if i not in order]
    return [*order, index]


# ------------------------------------------------------------------------------------------------- SLURM
def slurm_script(plan: Plan, spec_file: Path, overrides: tuple[str, ...], force: bool) -> str:
    s = plan.spec.slurm
    log_dir = plan.root / "slurm"
    lines = ["#!/bin/bash", f"#SBATCH --job-name=pathssl-{plan.spec.study.name}",
             f"#SBATCH --array=0-{len(plan.runs) - 1}", f"#SBATCH --cpus-per-task={s.cpus}",
             f"#SBATCH --time={s.time}", f"#SBATCH --output={log_dir}/%x-%A_%a.log"]
    if s.gpus:
        lines.append(f"#SBATCH --gres=gpu:{s.gpus}")
    if s.mem:
        lines.append(f"#SBATCH --mem={s.mem}")
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    study = f"pathssl study {shlex.quote(str(spec_file.resolve()))}{sets}"
    lines += [
        f"# {len(plan.runs)} runs, one per array task; a task first makes the subsets its run needs.",
        "# When the array has ended, gather the tables:",
        f"#   sbatch --dependency=afterany:<array job id> --wrap '{study} --report-only'",
        "set -euo pipefail", *s.setup, f"cd {shlex.quote(str(Path.cwd()))}",
        f'{study}{" --force" if force else ""} --index "$SLURM_ARRAY_TASK_ID"', ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command
def run_study(spec: Any, *, dry_run: bool = False, index: int | None = None, emit_slurm: Path | None = None,
              report_only: bool = False, force: bool = False, overrides: tuple[str, ...] = ()) -> int:
    """`pathssl study`; returns the exit code (1 when a run failed)."""
    from pathssl_cli.study.tables import write_study_report

    plan = build_plan(spec)
    if plan.problems:  # load_spec already checked; a spec built in Python is checked here
        raise SpecError(plan.problems)
    if index is None and os.environ.get("SLURM_ARRAY_TASK_ID") and not (dry_run or report_only or emit_slurm):
        index = _env_index(os.environ["SLURM_ARRAY_TASK_ID"])
    if index is not None and not 0 <= index < len(plan.runs):
        raise SpecError(f"--index {index}: the study has runs 0 to {len(plan.runs) - 1}")
    if emit_slurm is not None:
        atomic_write(emit_slurm, slurm_script(plan, Path(spec.source_file or "study.toml"), overrides, force))
        (plan.root / "slurm").mkdir(parents=True, exist_ok=True)
        info(f"wrote {emit_slurm}: {len(plan.runs)} array tasks. Submit it with: sbatch {emit_slurm}")
        return 0
    if dry_run:
        print_plan(plan)
        return 0
    if report_only:
        if write_study_report(plan) is None:
            raise WorkFailed(f"no run of the study has finished yet under {plan.root}; nothing to report")
        return 0
    indices = with_needs(plan, index) if index is not None else list(range(len(plan.runs)))
    if not force:
        changed = [(plan.runs[i], st) for i in indices if (st := run_status(plan.runs[i])).word == "changed"]
        if changed:
            raise SpecError([Problem(str(r.output_dir), f"holds a run of a different spec ({'; '.join(st.changes[:5])}"
                                     "). Rerun with --force to move it aside and start over, or change "
                                     "study.output_root") for r, st in changed])
    plan.root.mkdir(parents=True, exist_ok=True)
    write_json(plan.root / "study.json", {"spec": spec.model_dump(mode="json")})
    failures = run_plan(plan, indices, force=force)
    if index is None:
        write_study_report(plan)
    if failures:
        print(f"{len(failures)} of {len(indices)} runs failed:", file=sys.stderr)
        for run, error in failures:
            print(f"  [{run.index}] {run.name}: {error}", file=sys.stderr)
        return 1
    return 0


def _env_index(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"SLURM_ARRAY_TASK_ID={value!r} is not a run index; give --index I") from None

