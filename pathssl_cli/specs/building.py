"""Building a validated spec: pydantic validation, path resolution and input checks, every problem reported
at once (`SpecError`, exit 2) before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.specs.core import SpecModel
from pathssl_cli.specs.paths import raw_input_problems, resolve_paths
from pathssl_cli.specs.problems import validation_problems


def build_spec(model: type[SpecModel], data: dict[str, Any], origins: dict[str, Path], *,
               source: Path | None, check_inputs: bool = True) -> SpecModel:
    """Validate, resolve paths and check inputs, reporting every problem found in one `SpecError`."""
    default_file = str(source) if source is not None else "spec"
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(model, exc, origins, default_file)
        if check_inputs:
            problems += [p for p in raw_input_problems(model, data, origins, default_file) if p not in problems]
        raise SpecError(problems) from None
    problems = resolve_paths(spec, origins, default_file, check_exists=check_inputs)
    spec._source_file = source  # before the checks, so that their problems can name the file
    if check_inputs:
        problems += _input_checks(spec, problems)
    if problems:
        raise SpecError(problems)
    return spec


def _input_checks(spec: SpecModel, path_problems: list[Problem]) -> list[Problem]:
    """`spec.check_inputs()`, also when some input files are missing, minus what those already report.

    With a missing input a check may fail in ways it does not foresee; then the missing files, already
    reported, are the cause, and the check's own findings are left for the next run.
    """
    if not path_problems:
        return spec.check_inputs()
    try:
        found = spec.check_inputs()
    except Exception:  # see the docstring: the missing inputs are reported instead
        return []
    reported = {p.where.rpartition(": ")[2] for p in path_problems}
    return [p for p in found if p.where.rpartition(": ")[2] not in reported and p not in path_problems]
