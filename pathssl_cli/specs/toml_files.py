"""Reading spec files: TOML with line and column in syntax errors, `extends` chains merged deeply, and `--set`
overrides; `origins` remembers which file set each key, so a problem can name the file that holds it."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathssl_cli.errors import Problem, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


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
