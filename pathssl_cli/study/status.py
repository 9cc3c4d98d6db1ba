"""The status of each run of a study, by the run-directory rule of `pathssl_cli.runs` (the "result" rule: a run
is done only while its spec and every input it recorded are unchanged).

Its words: done; failed; pending (nothing there yet); interrupted (run.json says running: killed, or running now
in another task); changed (its directory holds a run of another spec: refused unless --force); stale (the same
spec made from inputs that changed since, or recorded before pathssl fingerprinted inputs: the study reruns it,
moving the old run aside, since the study made it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pathssl_cli.errors import SpecError
from pathssl_cli.runs import run_state
from pathssl_cli.study.plan import PlannedRun

STATUS_WORDS = ("done", "failed", "pending", "interrupted", "changed", "stale")


@dataclass(frozen=True)
class Status:
    word: str
    error: str | None = None
    changes: tuple[str, ...] = ()
    stale: tuple[Path, ...] = ()  # the run directories to move aside before rerunning


def run_dirs(run: PlannedRun) -> list[tuple[Path, str]]:
    """(run directory, command) of each command the run is made of: a segmentation run trains, then writes its
    evaluation under eval/, and each is compared by its own command's rule."""
    if run.kind == "segment":
        return [(run.output_dir, "segment train"), (run.output_dir / "eval", "segment eval")]
    return [(run.output_dir, run.kind)]


def run_status(run: PlannedRun) -> Status:
    try:
        spec = run.load(check_inputs=False)
    except SpecError as exc:
        return Status("pending", error=str(exc))
    states = [run_state(spec, path, command) for path, command in run_dirs(run)]
    for state in states:
        if state.status == "different":
            return Status("changed", changes=state.changes)
    stale = [state for state in states if state.status == "stale"]
    if stale:
        return Status("stale", changes=tuple(c for s in stale for c in s.changes), stale=tuple(s.path for s in stale))
    for state in states:
        if state.status == "failed":
            return Status("failed", error=state.error)
    words = [s.status for s in states]
    if all(w == "done" for w in words):
        return Status("done")
    if "interrupted" in words:
        return Status("interrupted")
    return Status("pending")
