"""Pydantic validation errors as problems a person can act on: the file that set the field, the dotted field
path, what was given and expected, and the closest valid key for a typo."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from pathssl_cli.errors import Problem
from pathssl_cli.registry import closest


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


def models_in(annotation: Any) -> list[type[BaseModel]]:
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
            tagged = [m for m in current if tag_of(m) == element]
            if tagged:
                current = tagged
                continue
            shown += f".{element}" if shown else str(element)
            current = []
            continue
        shown += f".{element}" if shown else str(element)
        current = models_in(owner.model_fields[element].annotation)
    return shown, current


def tag_of(model: type[BaseModel]) -> Any:
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
        where = f"{file_for(dotted, origins, default_file)}: {dotted or '(top level)'}"
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


def file_for(dotted: str, origins: dict[str, Path], default_file: str) -> str:
    key = re.sub(r"\[\d+\]", "", dotted)
    while key:
        if key in origins:
            origin = origins[key]
            return "--set" if origin.name == "--set" else str(origin)
        key = key.rpartition(".")[0]
    return default_file
