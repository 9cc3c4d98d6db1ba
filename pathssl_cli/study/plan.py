"""Expanding a study spec into its runs: names, command lines, specs, prerequisites and status.

Every run is a spec file plus `--set` overrides, exactly what a user would type; it is loaded with the same
`load_spec` as the CLI, so a run of the study and the printed command line are the same run.

Order: the subsample runs (one per data source that a fraction below 1 needs), then per evaluation entry,
backbone, fraction and seed the evaluation runs, then the segmentation runs the same way. Run directory names
are `<entry>__<backbone>__<fraction>__seed<seed>` under `<output_root>/runs/`, subsets under
`<output_root>/subsets/<source>/`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.specs.study import GridEntry, StudySpec

EVALUATION_KINDS = ("linear", "finetune", "knn")
SEGMENT_SOURCES = ("consep", "pannuke")


@dataclass(frozen=True)
class PlannedRun:
    index: int
    name: str
    kind: str  # spec kind: subsample | linear | finetune | knn | segment
    base: Path  # the spec file; `overrides` complete it
    overrides: tuple[str, ...]
    output_dir: Path
    where: str  # the study field that asked for it, for messages
    backbone: str | None = None  # row label
    entry: str | None = None  # column label
    fraction: float = 1.0
    seed: int | None = None
    needs: tuple[int, ...] = ()

    @property
    def commands(self) -> list[tuple[str, ...]]:
        """The pathssl sub-commands this run is made of, in order."""
        if self.kind == "segment":
            return [("segment", "train"), ("segment", "eval")]
        if self.kind == "subsample":
            return [("subsample",)]
        return [("evaluate", self.kind)]

    def command_lines(self) -> list[str]:
        sets = " ".join(f"--set {shlex.quote(item)}" for item in self.overrides)
        return [f"pathssl {' '.join(cmd)} {shlex.quote(str(self.base))} {sets}" for cmd in self.commands]

    def load(self, check_inputs: bool = True) -> Any:
        from pathssl_cli.specs import load_spec

        return load_spec(self.base, self.overrides, kind=self.kind, check_inputs=check_inputs)


@dataclass
class Plan:
    spec: StudySpec
    runs: list[PlannedRun] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.spec.study.output_root)


# ---------------------------------------------------------------------------------------------- helpers
def toml_value(value: Any) -> str:
    """A value as TOML text for `--set` (strings in JSON's escapes, which TOML basic strings share)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "model_dump"):  # a spec table, e.g. model.normalization = {mean = [...], std = [...]}
        return toml_value(value.model_dump(mode="json"))
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def fraction_label(fraction: float) -> str:
    return "all" if fraction >= 1 else f"{fraction * 100:g}pct"


def _weights(entry: Any) -> Path | str:
    weights = entry.weights
    if weights != "random" and Path(weights).is_dir():
        return Path(weights) / "backbone.safetensors"
    return weights  # type: ignore[no-any-return]


def _read_kind(path: Path) -> str | None:
    from pathssl_cli.specs.toml_files import load_with_extends

    kind = load_with_extends(path)[0].get("kind")
    return kind if isinstance(kind, str) else None


def _source_slug(parts: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", "-".join(p for p in parts if p)).strip("-") or "source"


# ---------------------------------------------------------------------------------------------- expansion
def build_plan(spec: StudySpec) -> Plan:
    """Every run of the grid, with the problems found on the way (kinds, sources, fractions, collisions)."""
    plan = Plan(spec)
    s = spec.study
    root = Path(s.output_root)
    runs_dir = root / "runs"
    problems = plan.problems
    for j, bb in enumerate(spec.backbones):
        weights = _weights(bb)
        if bb.weights != "random" and not Path(bb.weights).exists():
            problems.append(Problem(f"backbones[{j}].weights", f"file not found: {bb.weights}. Give a weights "
                                    "file, a `pathssl pretrain` run directory or 'random'."))
        elif weights != "random" and not Path(weights).is_file():
            problems.append(Problem(f"backbones[{j}].weights", f"{bb.weights} is a folder without "
                                    "backbone.safetensors: give a finished `pathssl pretrain` run directory or "
                                    "a weights file"))
    _unique([bb.name for bb in spec.backbones], "backbones", "name", problems)
    _unique([e.label for e in spec.evaluations] + [e.label for e in spec.segmentations],
            "evaluations/segmentations", "name (default: the spec file's stem)", problems)
    if not spec.evaluations and not spec.segmentations:
        problems.append(Problem("evaluations", "the study has no [[evaluations]] and no [[segmentations]]: "
                                               "nothing to run"))

    sources: dict[str, int] = {}  # subsample overrides (minus fractions) -> index into plan.runs
    pending: list[PlannedRun] = []
    for group, kinds, entries, common in (
        ("evaluations", EVALUATION_KINDS, spec.evaluations, s.evaluation_set),
        ("segmentations", ("segment",), spec.segmentations, s.segmentation_set),
    ):
        for i, entry in enumerate(entries):
            where = f"{group}[{i}]"
            kind = _checked_kind(entry, kinds, where, problems)
            if kind is None:
                continue
            base_sets = (*common, *entry.set)
            try:
                template = PlannedRun(0, "", kind, Path(entry.spec), base_sets, Path(), where).load(False)
            except SpecError as exc:
                problems += [Problem(f"{where}.spec", str(p)) for p in exc.problems]
                continue
            preset = getattr(template.data, "subset" if kind == "segment" else "train_subset")
            if preset is not None:  # its runs would be labelled with the study's fraction but use this subset
                problems.append(Problem(f"{where}.spec", f"{entry.spec} already restricts the training labels "
                                        f"({preset}); the study sets label fractions itself: use the spec "
                                        "without a subset and list the fractions under [labels] or the entry"))
                continue
            fractions = entry.fractions if entry.fractions is not None else spec.labels.fractions
            subset_index = _subsample_run(spec, plan, entry, template, kind, fractions, where, sources)
            for bb in spec.backbones:
                for fraction in fractions:
                    for seed in s.seeds:
                        name = f"{entry.label}__{bb.name}__{fraction_label(fraction)}__seed{seed}"
                        out = runs_dir / name
                        sets = [*base_sets, f"model.backbone={toml_value(bb.backbone)}",
                                f"model.weights={toml_value(_weights(bb))}"]
                        if bb.normalization is not None:
                            sets.append(f"model.normalization={toml_value(bb.normalization)}")
                        sets.append(f"run.seed={seed}" if kind == "segment" else f"run.seeds=[{seed}]")
                        sets.append(f"run.output_dir={toml_value(out)}")
                        needs: tuple[int, ...] = ()
                        if fraction < 1 and subset_index is not None:
                            from pathssl_cli.data.subsets import subset_file_name

                            subsets = plan.runs[subset_index].output_dir
                            key = "data.subset" if kind == "segment" else "data.train_subset"
                            sets.append(f"{key}={toml_value(subsets / subset_file_name(fraction))}")
                            needs = (subset_index,)
                        pending.append(PlannedRun(0, name, kind, Path(entry.spec), tuple(sets), out, where,
                                                  bb.name, entry.label, fraction, seed, needs))
    plan.runs += [dataclasses.replace(run, index=len(plan.runs) + i) for i, run in enumerate(pending)]
    _collisions(plan, problems)
    return plan


def _checked_kind(entry: GridEntry, kinds: tuple[str, ...], where: str, problems: list[Problem]) -> str | None:
    if not Path(entry.spec).is_file():
        problems.append(Problem(f"{where}.spec", f"file not found: {entry.spec}"))
        return None
    try:
        kind = _read_kind(Path(entry.spec))
    except SpecError as exc:
        problems += [Problem(f"{where}.spec", str(p)) for p in exc.problems]
        return None
    if kind not in kinds:
        other = "[[segmentations]]" if kind == "segment" else "[[evaluations]]"
        hint = f" ({kind!r} specs go under {other})" if kind in (*EVALUATION_KINDS, "segment") else ""
        problems.append(Problem(f"{where}.spec", f"{entry.spec} is a spec of kind {kind!r}; this list takes "
                                f"{' | '.join(kinds)} specs{hint}"))
        return None
    return kind


def _subsample_run(spec: StudySpec, plan: Plan, entry: GridEntry, template: Any, kind: str,
                   fractions: list[float], where: str, sources: dict[str, int]) -> int | None:
    """The subsample run that writes this entry's subsets (shared by entries with the same source)."""
    below = [f for f in fractions if f < 1]
    if not below:
        return None
    labels = spec.labels
    if kind == "segment":
        base, d = labels.segmentation_spec, template.data
        if base is None or d.format not in SEGMENT_SOURCES or len(d.train) != 1:
            plan.problems.append(Problem(f"{where}.fractions", f"fractions {below} need labels.segmentation_spec "
                                         "and a consep or pannuke spec with exactly one data.train folder"))
            return None
        source = ("images", {"format": d.format, "root": str(d.train[0])})
        slug = _source_slug([d.format, Path(d.train[0]).name])
    else:
        base = labels.classification_spec
        if base is None:
            plan.problems.append(Problem("labels.classification_spec", f"{where} uses fractions {below}: name a "
                                         "subsample spec with a [data] table (e.g. specs/subsample/tiny.toml)"))
            return None
        data = template.data.model_dump(mode="json", exclude={"train_subset"})
        source = ("data", data)
        slug = _source_slug([data["dataset"], Path(data["root"]).stem])
    key = json.dumps(source, sort_keys=True)
    if key in sources:  # one subsample run per source, writing every fraction below 1 of the study
        return sources[key]
    all_below = sorted({f for e in (*spec.evaluations, *spec.segmentations)
                        for f in (e.fractions if e.fractions is not None else labels.fractions) if f < 1})
    taken = {r.name for r in plan.runs}
    name = slug if f"subsets/{slug}" not in taken else f"{slug}-{len(plan.runs)}"
    out = Path(spec.study.output_root) / "subsets" / name
    sets = (f"{source[0]}={toml_value(source[1])}", f"subsample.fractions={toml_value(all_below)}",
            f"subsample.seed={labels.seed}", f"run.output_dir={toml_value(out)}")
    run = PlannedRun(len(plan.runs), f"subsets/{name}", "subsample", Path(base), sets, out, where)
    if not Path(base).is_file():
        field_name = "labels.segmentation_spec" if kind == "segment" else "labels.classification_spec"
        plan.problems.append(Problem(field_name, f"file not found: {base}"))
        return None
    try:
        run.load(check_inputs=True)  # the fractions that subsample would refuse for this source
    except SpecError as exc:
        field_name = "labels.fractions" if any("fraction" in p.message for p in exc.problems) else f"{where}.spec"
        plan.problems += [Problem(f"{field_name} ({where}, {name})", p.message) for p in exc.problems]
    plan.runs.append(run)
    sources[key] = run.index
    return run.index


def _unique(names: list[str], group: str, what: str, problems: list[Problem]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            problems.append(Problem(f"{group}[{i}]", f"{what} {name!r} is also used by entry {seen[name]}; the "
                                    "two would write the same run directories. Give one a distinct name."))
        seen.setdefault(name, i)


def _collisions(plan: Plan, problems: list[Problem]) -> None:
    owners: dict[Path, PlannedRun] = {}
    for run in plan.runs:
        first = owners.setdefault(run.output_dir, run)
        if first is not run and first.where != run.where:
            problems.append(Problem(run.where, f"writes {run.output_dir}, as {first.where} does; give one of "
                                    "them a distinct `name`"))


def plan_problems(spec: StudySpec) -> list[Problem]:
    """The spec kind's input check: every problem of the grid at once (called by `load_spec`)."""
    return build_plan(spec).problems
