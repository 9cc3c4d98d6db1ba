"""Which name each `segment predict` input's outputs take, and whether outputs already there are that input's.

Outputs are named by the input's file stem, so `segment score --pred <out>/maps` pairs them with label files by
name. Two different inputs with one stem (siteA/slide_001.svs, siteB/slide_001.svs) would write the same files,
the second then "skipped" as done: the whole list is checked before any work (the same list in every array task,
so every task refuses alike), and each input's absolute path is kept beside its outputs
(`predictions/sources/<name>.json`), so outputs made from another input are never taken as this one's.
"""

from __future__ import annotations

import json
from pathlib import Path

from pathssl_cli.errors import SpecError
from pathssl_cli.fileio import write_json

SOURCES = "sources"


def unique_inputs(inputs: list[Path]) -> list[Path]:
    """`inputs` without repeats of one file (a path given and matched by a glob); a SpecError (exit 2) when two
    different files share an output name. Names are compared case-insensitively, as macOS and Windows do."""
    by_name: dict[str, Path] = {}
    kept: list[Path] = []
    for path in inputs:
        name = path.stem.casefold()
        seen = by_name.get(name)
        if seen is None:
            by_name[name] = path
            kept.append(path)
        elif seen.resolve() != path.resolve():
            raise SpecError(
                f"predict.inputs holds {seen} and {path}, whose outputs would both be named {path.stem!r} "
                "(outputs are named by file stem, which `segment score` pairs with labels): predict them into "
                "separate run.output_dir folders, or rename one")
    return kept


def _source_file(out_dir: Path, name: str) -> Path:
    return out_dir / SOURCES / f"{name}.json"


def recorded_source(out_dir: Path, name: str) -> str | None:
    """The absolute input path whose outputs are (or are being) written under `name`; None if not recorded."""
    record = _source_file(out_dir, name)
    if not record.exists():
        return None
    return str(json.loads(record.read_text())["input"])


def check_sources(out_dir: Path, names: list[tuple[Path, str]]) -> None:
    """SpecError (exit 2) before any work when a name's outputs were made from another input."""
    for path, name in names:
        found = recorded_source(out_dir, name)
        if found is not None and found != str(path.resolve()):
            raise SpecError(
                f"{out_dir} already holds outputs named {name!r} made from {found}, not from {path}: use another "
                f"run.output_dir, or delete {out_dir}/*/{name}.* to replace them")


def claim_name(out_dir: Path, name: str, path: Path) -> None:
    """Record that `name`'s outputs are `path`'s, before they are written (a failed attempt keeps the claim)."""
    write_json(_source_file(out_dir, name), {"input": str(path.resolve())})
