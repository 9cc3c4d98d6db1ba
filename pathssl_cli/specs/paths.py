"""Path fields of specs: relative paths resolve against the file that wrote them, inputs must exist, and the
raw (unvalidated) data is searched for missing inputs so they are reported with the validation errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from pathssl_cli.errors import Problem
from pathssl_cli.specs.core import PathMarker
from pathssl_cli.specs.problems import file_for, models_in, tag_of


def _marker_of(annotation: Any) -> PathMarker | None:
    origin = get_origin(annotation)
    if origin is Annotated:
        for extra in get_args(annotation)[1:]:
            if isinstance(extra, PathMarker):
                return extra
        return _marker_of(get_args(annotation)[0])
    for arg in get_args(annotation):
        marker = _marker_of(arg)
        if marker is not None:
            return marker
    return None


def iter_path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[BaseModel, str, str, PathMarker]]:
    """(owner, field name, dotted key, marker) for every path-typed field, nested sections included."""
    for name, field in type(model).model_fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(model, name)
        # pydantic moves a top-level Annotated[...] marker into field.metadata; nested ones stay in the annotation
        marker = next((m for m in field.metadata if isinstance(m, PathMarker)), None) or _marker_of(
            field.annotation)
        if marker is not None:
            yield model, name, dotted, marker
        children = value if isinstance(value, list | tuple) else list(value.values()) \
            if isinstance(value, dict) else [value]
        for i, child in enumerate(children):
            if isinstance(child, BaseModel):
                # an array of tables ([[evaluations]]) names its element: "evaluations[0].spec"
                yield from iter_path_fields(child, f"{dotted}[{i}]." if isinstance(value, list) else f"{dotted}.")


def _resolve_one(item: Any, base: Path, marker: PathMarker, where: str, problems: list[Problem]) -> Any:
    if not isinstance(item, Path | str) or item == "random":
        return item
    text = str(item)
    path = Path(text).expanduser()
    resolved = path if path.is_absolute() else Path(os.path.normpath(base / path))
    if marker.kind == "pattern":
        return str(resolved)
    if marker.kind == "input" and not resolved.exists():
        problems.append(Problem(where, f"file not found: {resolved} (given as {text!r}, relative to {base}). "
                                       "Fix the path or create the file."))
    return resolved


def resolve_paths(spec: BaseModel, origins: dict[str, Path], default_file: str,
                  check_exists: bool = True) -> list[Problem]:
    """Make relative paths absolute (against the file that set them) and check that inputs exist."""
    problems: list[Problem] = []
    for owner, name, dotted, marker in list(iter_path_fields(spec)):
        # an element of an array of tables comes from the file that wrote the array
        origin = origins.get(dotted) if "[" not in dotted else origins.get(dotted.partition("[")[0])
        # a value from a file is relative to that file; defaults and --set values to the working directory
        base = origin.parent if origin is not None else Path.cwd()
        where = f"{file_for(dotted, origins, default_file)}: {dotted}"
        found: list[Problem] = []
        value = getattr(owner, name)
        if isinstance(value, list):
            resolved: Any = [_resolve_one(v, base, marker, where, found) for v in value]
        elif isinstance(value, dict):
            resolved = {k: _resolve_one(v, base, marker, where, found) for k, v in value.items()}
        else:
            resolved = _resolve_one(value, base, marker, where, found)
        object.__setattr__(owner, name, resolved)
        if check_exists:
            problems += found
    return problems


def raw_input_problems(model: type[BaseModel], data: Any, origins: dict[str, Path], default_file: str,
                       prefix: str = "") -> list[Problem]:
    """Missing input files named in the raw (unvalidated) data, for a spec that failed validation.

    Walks the model's fields beside the data, so that a spec missing a required section still has its missing
    inputs reported in the same pass. Only string values are checked; values of the wrong type are the
    validation errors' business. A union of sections (a method's options) is walked by its tag.
    """
    problems: list[Problem] = []
    if not isinstance(data, dict):
        return problems
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        value, dotted = data[name], f"{prefix}{name}"
        marker = next((m for m in field.metadata if isinstance(m, PathMarker)), None) or _marker_of(
            field.annotation)
        if marker is not None and marker.kind == "input":
            origin = origins.get(dotted)
            base = origin.parent if origin is not None else Path.cwd()
            where = f"{file_for(dotted, origins, default_file)}: {dotted}"
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) \
                else [value]
            for item in items:
                if isinstance(item, str):
                    _resolve_one(item, base, marker, where, problems)
        children = value if isinstance(value, list) else [value]
        for child in children:
            if not isinstance(child, dict):
                continue
            tags = {child.get(key) for key in ("name", "kind", "preset")}
            members = [m for m in models_in(field.annotation) if tag_of(m) is None or tag_of(m) in tags]
            for member in members[:1]:
                problems += raw_input_problems(member, child, origins, default_file, f"{dotted}.")
    return problems
