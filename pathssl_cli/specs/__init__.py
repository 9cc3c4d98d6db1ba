"""Spec kinds and the public loading API.

Each kind maps to the pydantic model that validates it; models are imported lazily so that `pathssl spec
validate` on a tile spec never pays for importing the training stack.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.registry import closest
from pathssl_cli.specs.building import build_spec
from pathssl_cli.specs.core import (
    BackboneName,
    InputPath,
    OutputPath,
    PathPattern,
    Section,
    SpecModel,
    WeightsRef,
)
from pathssl_cli.specs.problems import validation_problems
from pathssl_cli.specs.toml_files import apply_overrides, load_with_extends

__all__ = [
    "SPEC_KINDS", "BackboneName", "InputPath", "OutputPath", "PathPattern", "Section", "SpecModel", "WeightsRef",
    "is_partial", "load_spec", "spec_model", "spec_schema", "spec_to_toml", "validate_partial",
]

SPEC_KINDS: dict[str, str] = {
    "tile": "pathssl_cli.specs.tile:TileSpec",
    "pretrain": "pathssl_cli.specs.pretrain:PretrainSpec",
    "linear": "pathssl_cli.specs.evaluate:LinearSpec",
    "finetune": "pathssl_cli.specs.evaluate:FinetuneSpec",
    "knn": "pathssl_cli.specs.evaluate:KnnSpec",
    "subsample": "pathssl_cli.specs.subsample:SubsampleSpec",
    "segment": "pathssl_cli.specs.segment:SegmentSpec",
    "study": "pathssl_cli.specs.study:StudySpec",
}


def spec_model(kind: str) -> type[SpecModel]:
    if kind not in SPEC_KINDS:
        hint = closest(kind, list(SPEC_KINDS))
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        raise SpecError(f"unknown spec kind {kind!r}.{did_you_mean} Valid kinds: {', '.join(SPEC_KINDS)}")
    module_name, _, class_name = SPEC_KINDS[kind].partition(":")
    model: type[SpecModel] = getattr(importlib.import_module(module_name), class_name)
    return model


def load_spec(path: str | Path, overrides: Sequence[str] = (), kind: str | None = None, *,
              check_inputs: bool = True) -> SpecModel:
    """Load, merge, override, validate and resolve a spec file; raise `SpecError` listing every problem.

    `check_inputs=False` checks structure and values only, not that input files exist: for CI machines that
    validate the paper's specs without holding the data.
    """
    path = Path(path)
    data, origins = load_with_extends(path)
    data = apply_overrides(data, overrides, origins)
    source = path.resolve()
    found = _kind_of(data, source, kind)
    try:
        return build_spec(spec_model(found), data, origins, source=source, check_inputs=check_inputs)
    except SpecError as exc:
        if not is_partial(path):
            raise
        hint = Problem(str(source), "this file is a partial base (its name starts with '_'): run a spec that "
                                    "extends it; `pathssl spec validate` checks the partial on its own.")
        raise SpecError([*exc.problems, hint]) from None


def is_partial(path: str | Path) -> bool:
    """A partial base exists only to be extended; its file name starts with an underscore (_base.toml)."""
    return Path(path).name.startswith("_")


def validate_partial(path: str | Path, overrides: Sequence[str] = ()) -> str | None:
    """Check a partial base as far as it can be checked on its own; return its kind (None if it sets none).

    TOML syntax, the `extends` chain, the kind, and every key and value it sets are checked. Required fields
    it leaves to the specs that extend it are not problems, and its input files are not checked: a path in
    a base may be meant to be overridden. Raises `SpecError` listing every other problem.
    """
    path = Path(path)
    data, origins = load_with_extends(path)
    data = apply_overrides(data, overrides, origins)
    source = path.resolve()
    if "kind" not in data:
        return None  # a shared fragment such as a [run] table: syntax and extends are all there is to check
    model = spec_model(_kind_of(data, source, None))
    try:
        model.model_validate(data)
    except ValidationError as exc:
        problems = [problem for problem, error in zip(validation_problems(model, exc, origins, str(source)),
                                                      exc.errors(include_url=False), strict=True)
                    if error["type"] != "missing"]
        if problems:
            raise SpecError(problems) from None
    return str(data["kind"])


def _kind_of(data: dict[str, Any], source: Path, kind: str | None) -> str:
    """The spec's kind, checked against the known kinds and against what the command needs (`kind`)."""
    found = data.get("kind")
    if found is None:
        expected = f" (kind = {kind!r} for this command)" if kind else ""
        raise SpecError([Problem(f"{source}: kind", f"missing the top-level 'kind' key{expected}. "
                                 f"Valid kinds: {', '.join(SPEC_KINDS)}")])
    if not isinstance(found, str) or found not in SPEC_KINDS:
        hint = closest(str(found), list(SPEC_KINDS))
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        raise SpecError([Problem(f"{source}: kind",
                                 f"unknown kind {found!r}.{did_you_mean} Valid kinds: {', '.join(SPEC_KINDS)}")])
    if kind is not None and found != kind:
        raise SpecError([Problem(f"{source}: kind", f"this command needs a spec of kind {kind!r}, but the file "
                                 f"has kind = {found!r}. Use the command for {found!r} specs or another file.")])
    return found


def without_none(value: Any) -> Any:
    # TOML has no null: an unset optional field is simply absent from the resolved spec.
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def spec_to_toml(spec: SpecModel) -> str:
    """The resolved spec as TOML text: what `pathssl spec show` prints and every run saves as spec.toml."""
    data = without_none(spec.model_dump(mode="json"))
    ordered = {"kind": data.pop("kind")} if "kind" in data else {}
    ordered.update(data)
    return tomli_w.dumps(ordered)


def spec_schema(kind: str) -> str:
    """JSON Schema of a spec kind, for editors' TOML plugins (e.g. Taplo's `#:schema` directive)."""
    schema = spec_model(kind).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", f"pathssl {kind} spec")
    return json.dumps(schema, indent=2)
