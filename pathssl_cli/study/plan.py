"""Expanding a study spec into its runs: names, command lines, specs, prerequisites and status.

Every run is a spec file plus `--set` overrides, exactly what a user would type; it is loaded with the same
`load_spec` as the CLI, so a run of the study and the printed command line are the same run.

Order: the pre-training runs (the "pretrain" stage: per [[pretrains]] entry and seed, under
`<output_root>/pretrain/<name>__seed<seed>/`), then the subsample runs (one per data source that a fraction below 1
needs), then per evaluation entry, backbone, fraction, seed and fold the evaluation runs, then the segmentation
runs the same way (the "evaluate" stage). Run directory names are `<entry>__<backbone>__<fraction>__seed<seed>`
under `<output_root>/runs/` (`...__fold<k>__seed<seed>` when the study loops over folds), subsets under
`<output_root>/subsets/<source>/`.

Seeds, which are the tables' replicates: a row of pre-trained backbones is evaluated seed by seed, pre-training
seed s with evaluation seed s (one replicate = one seed of the whole pipeline); any other row with each of
study.seeds, which also draw a random init. An evaluation that is deterministic given the weights (kNN, the
L-BFGS probe) of a fixed weights file runs once, with the first seed: other seeds would repeat it exactly.
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
#: The study list each spec kind belongs in, for messages.
LISTS = {**dict.fromkeys(EVALUATION_KINDS, "[[evaluations]]"), "segment": "[[segmentations]]",
         "pretrain": "[[pretrains]]"}
BACKBONE_FILE = "backbone.safetensors"  # what `pathssl pretrain` exports into its run directory


@dataclass(frozen=True)
class PlannedRun:
    index: int
    name: str
    kind: str  # spec kind: pretrain | subsample | linear | finetune | knn | segment
    base: Path  # the spec file; `overrides` complete it
    overrides: tuple[str, ...]
    output_dir: Path
    where: str  # the study field that asked for it, for messages
    backbone: str | None = None  # row label
    entry: str | None = None  # column label
    fraction: float = 1.0
    seed: int | None = None  # the replicate: pre-training seed, or evaluation seed
    needs: tuple[int, ...] = ()
    fold: int | None = None  # the test fold when the study loops over folds
    deterministic: bool = False  # an evaluation that no seed changes given the weights (kNN, L-BFGS)

    @property
    def stage(self) -> str:
        """'pretrain' (runs first, its own SLURM array) or 'evaluate' (everything that uses backbones)."""
        return "pretrain" if self.kind == "pretrain" else "evaluate"

    @property
    def commands(self) -> list[tuple[str, ...]]:
        """The pathssl sub-commands this run is made of, in order."""
        if self.kind == "segment":
            return [("segment", "train"), ("segment", "eval")]
        if self.kind in ("subsample", "pretrain"):
            return [(self.kind,)]
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
    architectures: dict[str, str] = field(default_factory=dict)  # row -> backbone registry name

    def stage(self, name: str) -> list[PlannedRun]:
        return [run for run in self.runs if run.stage == name]

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
    weights = entry.weights if entry.weights is not None else "random"
    if weights != "random" and Path(weights).is_dir():
        return Path(weights) / BACKBONE_FILE
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
    runs_dir = Path(s.output_root) / "runs"
    problems = plan.problems
    pretrained = _pretrain_runs(spec, plan)
    for j, bb in enumerate(spec.backbones):
        _check_backbone(plan, j, bb, pretrained)
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
            kind = _checked_kind(entry.spec, kinds, where, problems)
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
            folds = _folds(spec, template, kind, base_sets, fractions, where, problems)
            subset_index = _subsample_run(spec, plan, entry, template, kind, fractions, where, sources)
            deterministic = kind == "knn" or (kind == "linear" and template.probe.kind == "lbfgs")
            for bb in spec.backbones:
                weights_of = pretrained.get(bb.pretrain or "", {})
                for fraction in fractions:
                    for seed in _replicate_seeds(spec, bb, deterministic and kind != "segment"):
                        for fold in folds:
                            at_fold = "" if fold is None else f"__fold{fold}"
                            name = f"{entry.label}__{bb.name}__{fraction_label(fraction)}{at_fold}__seed{seed}"
                            out = runs_dir / name
                            weights, needs = _weights(bb), tuple[int, ...]()
                            if bb.pretrain is not None and seed in weights_of:
                                needs = (weights_of[seed],)
                                weights = plan.runs[needs[0]].output_dir / BACKBONE_FILE
                            sets = [*base_sets, f"model.backbone={toml_value(plan.architectures.get(bb.name))}",
                                    f"model.weights={toml_value(weights)}"]
                            if bb.normalization is not None:
                                sets.append(f"model.normalization={toml_value(bb.normalization)}")
                            if fold is not None:
                                sets += [f"data.folds={s.folds}", f"data.fold={fold}"]
                            sets.append(f"run.seed={seed}" if kind == "segment" else f"run.seeds=[{seed}]")
                            sets.append(f"run.output_dir={toml_value(out)}")
                            if fraction < 1 and subset_index is not None:
                                from pathssl_cli.data.subsets import subset_file_name

                                subsets = plan.runs[subset_index].output_dir
                                key = "data.subset" if kind == "segment" else "data.train_subset"
                                sets.append(f"{key}={toml_value(subsets / subset_file_name(fraction))}")
                                needs = (*needs, subset_index)
                            pending.append(PlannedRun(0, name, kind, Path(entry.spec), tuple(sets), out, where,
                                                      bb.name, entry.label, fraction, seed, needs, fold,
                                                      deterministic))
    plan.runs += [dataclasses.replace(run, index=len(plan.runs) + i) for i, run in enumerate(pending)]
    _collisions(plan, problems)
    return plan


def _pretrain_runs(spec: StudySpec, plan: Plan) -> dict[str, dict[int, int]]:
    """The pre-training runs, first in the plan: entry name -> seed -> run index. Each entry's backbone is
    read from its spec (structure only: its tile stores may be made later, and are checked when it runs)."""
    found: dict[str, dict[int, int]] = {}
    for i, entry in enumerate(spec.pretrains):
        where = f"pretrains[{i}]"
        if _checked_kind(entry.spec, ("pretrain",), where, plan.problems) is None:
            continue
        sets = (*spec.study.pretrain_set, *entry.set)
        try:
            template = PlannedRun(0, "", "pretrain", Path(entry.spec), sets, Path(), where).load(False)
        except SpecError as exc:
            plan.problems += [Problem(f"{where}.spec", str(p)) for p in exc.problems]
            continue
        for bb in spec.backbones:
            if bb.pretrain == entry.name:
                plan.architectures[bb.name] = template.model.backbone
        runs = found.setdefault(entry.name, {})
        for seed in entry.seeds or spec.study.seeds:
            out = Path(spec.study.output_root) / "pretrain" / f"{entry.name}__seed{seed}"
            # run.resume: a run killed mid-way continues from its checkpoint (a fresh directory starts anew)
            run_sets = (*sets, f"run.seed={seed}", f"run.output_dir={toml_value(out)}", "run.resume=true")
            runs[seed] = len(plan.runs)
            plan.runs.append(PlannedRun(len(plan.runs), f"pretrain/{entry.name}__seed{seed}", "pretrain",
                                        Path(entry.spec), run_sets, out, where, seed=seed))
    return found


def _check_backbone(plan: Plan, j: int, bb: Any, pretrained: dict[str, dict[int, int]]) -> None:
    where = f"backbones[{j}]"
    if bb.pretrain is not None:
        made = plan.architectures.get(bb.name)
        if made is not None and bb.backbone is not None and bb.backbone != made:
            plan.problems.append(Problem(f"{where}.backbone", f"{bb.backbone!r}, but pretrains {bb.pretrain!r} "
                                         f"pre-trains {made!r}; remove `backbone` (it is taken from the pretrain "
                                         "spec) or make them agree"))
        return
    plan.architectures[bb.name] = bb.backbone
    weights = _weights(bb)
    if weights != "random" and not Path(bb.weights).exists():
        plan.problems.append(Problem(f"{where}.weights", f"file not found: {bb.weights}. Give a weights file, a "
                                     "`pathssl pretrain` run directory, 'random', or `pretrain = <name>` of a "
                                     "[[pretrains]] entry."))
    elif weights != "random" and not Path(weights).is_file():
        plan.problems.append(Problem(f"{where}.weights", f"{bb.weights} is a folder without {BACKBONE_FILE}: give "
                                     "a finished `pathssl pretrain` run directory or a weights file"))


def _replicate_seeds(spec: StudySpec, bb: Any, deterministic: bool) -> list[int]:
    """The seeds a row is evaluated with (see the module docstring)."""
    seeds = spec.seeds_of(bb)
    fixed = bb.pretrain is None and _weights(bb) != "random"
    return seeds[:1] if fixed and deterministic else seeds


def _folds(spec: StudySpec, template: Any, kind: str, base_sets: tuple[str, ...], fractions: list[float],
           where: str, problems: list[Problem]) -> list[int | None]:
    """The folds an entry runs over: 0..K-1 for a csv dataset when study.folds = K, else [None]."""
    k = spec.study.folds
    if k is None or kind == "segment" or template.data.dataset != "csv":
        return [None]
    if template.data.folds is not None:
        problems.append(Problem(f"{where}.spec", f"sets data.folds = {template.data.folds}, but the study loops "
                                "over folds itself (study.folds): remove data.folds and data.fold from the spec "
                                "or the entry's `set`"))
        return [None]
    below = [f for f in fractions if f < 1]
    if below:
        problems.append(Problem(f"{where}.fractions", f"label fractions {below} with study.folds: the subsets "
                                "would be drawn from one training split, but each fold has its own. Use "
                                "fractions = [1.0] with folds"))
        return [None]
    try:  # what the data section says about folds (test_fraction set beside them, ...), once for all runs
        PlannedRun(0, "", kind, Path(template.source_file), (*base_sets, f"data.folds={k}", "data.fold=0"),
                   Path(), where).load(False)
    except SpecError as exc:
        problems += [Problem(f"{where}.spec (with study.folds = {k})", str(p)) for p in exc.problems]
        return [None]
    return list(range(k))


def _checked_kind(spec_file: Path, kinds: tuple[str, ...], where: str, problems: list[Problem]) -> str | None:
    if not Path(spec_file).is_file():
        problems.append(Problem(f"{where}.spec", f"file not found: {spec_file}"))
        return None
    try:
        kind = _read_kind(Path(spec_file))
    except SpecError as exc:
        problems += [Problem(f"{where}.spec", str(p)) for p in exc.problems]
        return None
    if kind not in kinds:
        hint = f" ({kind!r} specs go under {LISTS[kind]})" if kind in LISTS else ""
        problems.append(Problem(f"{where}.spec", f"{spec_file} is a spec of kind {kind!r}; this list takes "
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
