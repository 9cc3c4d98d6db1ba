"""Spec loading: TOML → `extends` merge → `--set` overrides → pydantic validation → path resolution → input checks.

Every problem found along the way is collected and reported at once (`SpecError`, exit 2) before any work starts.
Each problem names the file, the line and column for syntax errors, or the dotted field path with what was given
and what was expected, and for unknown keys the closest valid key.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, PrivateAttr, ValidationError

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.registry import closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class _PathMarker:
    kind: Literal["input", "output", "pattern"]


InputPath = Annotated[Path, _PathMarker("input")]
"""A file or folder that must exist; relative paths are resolved against the directory of the spec file."""
OutputPath = Annotated[Path, _PathMarker("output")]
"""A file or folder that is written; relative paths are resolved against the directory of the spec file."""
PathPattern = Annotated[str, _PathMarker("pattern")]
"""A path or glob pattern resolved against the spec file's directory; matching is the command's job."""


def _check_backbone(name: str) -> str:
    from pathssl_cli.backbones import BACKBONES, is_known_backbone

    if not is_known_backbone(name):
        raise ValueError(BACKBONES.unknown_message(name) + " (or 'timm:<model>' for any timm model)")
    return name


BackboneName = Annotated[str, AfterValidator(_check_backbone)]
"""A name from the backbone registry (`pathssl backbones list`) or 'timm:<model name>'."""
WeightsRef = Union[Literal["random"], InputPath]  # noqa: UP007 - the marker inside must stay visible to the walker
"""'random' for random initialisation, or a local weights file (never downloaded)."""


class Section(BaseModel):
    """A table of a spec: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpecModel(Section):
    """The top-level model of one spec kind. Subclasses declare `kind: Literal["<kind>"]`."""

    _source_file: Path | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The TOML file the spec was loaded from (None when built in Python)."""
        return self._source_file

    def check_inputs(self) -> list[Problem]:
        """Checks that need resolved paths (globs that match nothing, CSV columns, ...); run before any work."""
        return []


# --------------------------------------------------------------------------------------------------- TOML reading
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SpecError(f"spec file not found: {path}. Check the path (it is relative to the current directory).")
    if path.is_dir():
        raise SpecError(f"{path} is a directory, not a spec file. Give a .toml file.")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        where = f"{path}: line {position[1]}, column {position[2]}" if position else str(path)
        reason = _TOML_POSITION.sub("", message).strip()
        raise SpecError([Problem(where, f"TOML syntax error: {reason}")]) from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; a spec must be TOML text.") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables are merged key by key; any other value in `override` (lists included) replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _origins(data: dict[str, Any], source: Path, prefix: str = "") -> dict[str, Path]:
    """Map every dotted key to the file that defined it, so paths resolve against the right directory."""
    found: dict[str, Path] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        found[dotted] = source
        if isinstance(value, dict):
            found.update(_origins(value, source, f"{dotted}."))
    return found


def load_with_extends(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """Read `path` and its `extends` parents (str or list, relative to the file); the file's own keys win."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise SpecError([Problem(f"{_chain[-1]}: extends", f"cycle in extends: {cycle}. Remove one of the links.")])
    data = read_toml(path)
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpecError([Problem(f"{path}: extends", f"expected a file name or a list of them, got {parents!r}")])
    merged: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.exists():
            raise SpecError([Problem(f"{path}: extends",
                                     f"parent spec {parent!r} not found (looked for {parent_path})")])
        parent_data, parent_origins = load_with_extends(parent_path, (*_chain, path))
        merged = deep_merge(merged, parent_data)
        origins.update(parent_origins)
    origins.update(_origins(data, path))
    return deep_merge(merged, data), origins


def apply_overrides(data: dict[str, Any], overrides: Sequence[str],
                    origins: dict[str, Path]) -> dict[str, Any]:
    """Apply `--set a.b=VALUE` overrides; VALUE is parsed as TOML, and taken as a plain string if it is not."""
    problems = []
    cwd_marker = Path.cwd() / "--set"
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE with a dotted key, e.g. tiles.size=256"))
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare strings such as run.output_dir=runs/x need no quotes on a shell
        parts = key.split(".")
        table = data
        for part in parts[:-1]:
            if not isinstance(table.get(part), dict):
                table[part] = {}
            table = table[part]
        table[parts[-1]] = value
        for dotted in list(origins):
            if dotted == key or dotted.startswith(key + "."):
                del origins[dotted]
        origins[key] = cwd_marker
    if problems:
        raise SpecError(problems)
    return data


# ------------------------------------------------------------------------------------------ validation errors
def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated/list/dict annotations."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, set, dict):
        args = get_args(annotation)
        if origin is dict:
            args = args[1:]
        return [t for arg in args for t in _unwrap(arg)]
    return [annotation]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _walk_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, list[type[BaseModel]]]:
    """Dotted display path for a pydantic error location, and the models that the last element belongs to."""
    shown = ""
    current: list[type[BaseModel]] = [model]
    for element in loc:
        if isinstance(element, int):
            shown += f"[{element}]"
            continue
        owner = next((m for m in current if element in m.model_fields), None)
        if owner is None:
            # a discriminated-union tag such as 'dino' in ('method', 'dino', 'out_dim'): pick that member
            tagged = [m for m in current if _tag_of(m) == element]
            if tagged:
                current = tagged
                continue
            shown += f".{element}" if shown else str(element)
            current = []
            continue
        shown += f".{element}" if shown else str(element)
        current = _models_in(owner.model_fields[element].annotation)
    return shown, current


def _tag_of(model: type[BaseModel]) -> Any:
    for name in ("name", "kind", "preset"):
        field = model.model_fields.get(name)
        if field is not None and get_origin(field.annotation) is Literal:
            return get_args(field.annotation)[0]
    return None


def validation_problems(model: type[BaseModel], exc: ValidationError,
                        origins: dict[str, Path], default_file: str) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        dotted, _ = _walk_loc(model, loc)
        where = f"{_file_for(dotted, origins, default_file)}: {dotted or '(top level)'}"
        kind = error["type"]
        if kind == "extra_forbidden":
            _, parents = _walk_loc(model, loc[:-1])
            valid = sorted({name for m in parents for name in m.model_fields})
            hint = closest(str(loc[-1]), valid)
            message = f"unknown key {loc[-1]!r}."
            message += f" Did you mean {hint!r}?" if hint else ""
            message += f" Valid keys here: {', '.join(valid)}" if valid else ""
        elif kind == "missing":
            message = "required field is missing"
        else:
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if "input" in error and kind not in ("value_error", "assertion_error"):
                message += f" (got {_short(error['input'])})"
        problems.append(Problem(where, message))
    return problems


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_for(dotted: str, origins: dict[str, Path], default_file: str) -> str:
    key = re.sub(r"\[\d+\]", "", dotted)
    while key:
        if key in origins:
            origin = origins[key]
            return "--set" if origin.name == "--set" else str(origin)
        key = key.rpartition(".")[0]
    return default_file


# --------------------------------------------------------------------------------------------- path handling
def _marker_of(annotation: Any) -> _PathMarker | None:
    origin = get_origin(annotation)
    if origin is Annotated:
        for extra in get_args(annotation)[1:]:
            if isinstance(extra, _PathMarker):
                return extra
        return _marker_of(get_args(annotation)[0])
    for arg in get_args(annotation):
        marker = _marker_of(arg)
        if marker is not None:
            return marker
    return None


def iter_path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[BaseModel, str, str, _PathMarker]]:
    """(owner, field name, dotted key, marker) for every path-typed field, nested sections included."""
    for name, field in type(model).model_fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(model, name)
        # pydantic moves a top-level Annotated[...] marker into field.metadata; nested ones stay in the annotation
        marker = next((m for m in field.metadata if isinstance(m, _PathMarker)), None) or _marker_of(
            field.annotation)
        if marker is not None:
            yield model, name, dotted, marker
        children = value if isinstance(value, list | tuple) else list(value.values()) \
            if isinstance(value, dict) else [value]
        for i, child in enumerate(children):
            if isinstance(child, BaseModel):
                # an array of tables ([[evaluations]]) names its element: "evaluations[0].spec"
                yield from iter_path_fields(child, f"{dotted}[{i}]." if isinstance(value, list) else f"{dotted}.")


def _resolve_one(item: Any, base: Path, marker: _PathMarker, where: str, problems: list[Problem]) -> Any:
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
        where = f"{_file_for(dotted, origins, default_file)}: {dotted}"
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
        marker = next((m for m in field.metadata if isinstance(m, _PathMarker)), None) or _marker_of(
            field.annotation)
        if marker is not None and marker.kind == "input":
            origin = origins.get(dotted)
            base = origin.parent if origin is not None else Path.cwd()
            where = f"{_file_for(dotted, origins, default_file)}: {dotted}"
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
            members = [m for m in _models_in(field.annotation) if _tag_of(m) is None or _tag_of(m) in tags]
            for member in members[:1]:
                problems += raw_input_problems(member, child, origins, default_file, f"{dotted}.")
    return problems


# ------------------------------------------------------------------------------------------------- loading
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
