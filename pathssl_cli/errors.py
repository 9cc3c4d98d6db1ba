"""User-facing errors and their exit codes.

Exit code 2 means the spec or the arguments are invalid and nothing was started; exit code 1 means the work ran
but something failed. The CLI prints these without a traceback: their messages are written for a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input.

    `where` locates it (``"specs/a.toml: tiles.mpp"``, ``"specs/a.toml: line 3, column 7"`` or a slide path);
    `message` says what was given, what was expected and, where known, how to fix it.
    """

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class PathsslError(Exception):
    """Base class of errors whose message is meant for the user; `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class SpecError(PathsslError):
    """The spec, the arguments or the declared inputs are invalid; raised before any work starts (exit 2)."""

    exit_code = 2

    def __init__(self, problems: Sequence[Problem] | str, where: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(where, problems)]
        self.problems = list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class WorkFailed(PathsslError):
    """The work started but failed (some slides unreadable, loss became NaN, ...): exit 1."""

    exit_code = 1
