"""`kind = "study"`: the paper's grid as one spec (`pathssl study`).

A study names backbones, the evaluation and segmentation specs to apply to each, the label fractions and the
seeds; `pathssl study` expands the grid into ordinary runs of `pathssl evaluate|segment|subsample` under
`output_root`, runs them in order (skipping what is done), and writes the tables through `report`.

```toml
kind = "study"
[study]
name = "tiny"
output_root = "../../runs/study/tiny"
seeds = [0, 1]

[labels]                                   # label fractions, written by `pathssl subsample`
fractions = [0.5, 1.0]                     # 1.0 = the whole train split, no subset file
classification_spec = "../subsample/tiny.toml"

[[backbones]]
name = "random_cnn"                        # row label in the tables, part of each run directory's name
backbone = "resnet_tiny"
weights = "random"                         # or a weights file, or a `pathssl pretrain` run directory

[[evaluations]]
spec = "../evaluate/tiny_linear.toml"      # kind linear | finetune | knn
set = ["optim.epochs=5"]                   # --set overrides applied to this spec in every run
```

Pre-training inside the study: each `[[pretrains]]` entry is a pretrain spec with `set` overrides, run once per
seed (`<output_root>/pretrain/<name>__seed<s>/`); a `[[backbones]]` entry with `pretrain = "<name>"` is the row
of those backbones, evaluated seed by seed (pre-training seed s is evaluated with seed s):

```toml
[[pretrains]]
name = "pathology"
spec = "../pretrain/cpu_real.toml"
set = ["augment.preset='pathology'"]
seeds = [0, 1, 2]                          # unset = study.seeds

[[backbones]]
name = "pathology"
pretrain = "pathology"                     # backbone: the pretrain spec's model.backbone

[tables]
reference = "random_cnn"                   # paired differences of every other row against this one
```

`--set` values in the `set` lists (and `evaluation_set`, `pretrain_set`) are read like `--set` on a command
line: a relative path there is relative to the working directory. Put paths in spec files (which resolve them
against themselves) and refer to those.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pathssl_cli.specs.core import BackboneName, NormalizationSpec, OutputPath, PathMarker, Section, SpecModel

GridPath = Annotated[Path, PathMarker("output")]
"""An input file resolved against the spec file like every path, but checked for existence by the grid check
(`pathssl_cli.study.plan`) rather than first: a missing file is then reported with every other problem."""

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _slug(value: str) -> str:
    if not _SLUG.match(value) or "__" in value:
        raise ValueError(f"{value!r} is used in run directory names: use letters, digits, '.', '-' and single '_' "
                         "(no spaces, no '__', not starting with a symbol)")
    return value


def _check_fractions(values: list[float] | None) -> list[float] | None:
    if values is None:
        return None
    bad = [f for f in values if not 0 < f <= 1]
    if bad:
        raise ValueError(f"label fractions must lie in (0, 1] (0.01 = 1%, 1.0 = all labels), got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"label fractions repeat a value: {values}")
    return sorted(values)


class StudySection(Section):
    name: str = Field(description="Name of the study: the SLURM job name and the title of the report.")
    output_root: OutputPath = Field(
        description="Folder holding every run (runs/<run name>/), the subsets (subsets/<name>/), plan.json and "
        "the report (report.md, report.csv, report.png).")
    seeds: list[int] = Field(
        default=[0, 1, 2], min_length=1,
        description="Training seeds; one run per seed, reported as mean ± std (3 by default, as evaluate's "
        "run.seeds).")
    evaluation_set: list[str] = Field(
        default_factory=list,
        description="--set overrides applied to every evaluation spec before its own `set` (e.g. "
        "'data.root=...' to point the tiny study at other data).")
    segmentation_set: list[str] = Field(
        default_factory=list, description="--set overrides applied to every segmentation spec before its own.")
    pretrain_set: list[str] = Field(
        default_factory=list,
        description="--set overrides applied to every [[pretrains]] spec before its own (e.g. 'run.steps=300': "
        "one length for the whole grid).")
    folds: int | None = Field(
        default=None, ge=3,
        description="K-fold cross-validation by group: every evaluation of a 'csv' dataset runs once per fold "
        "(data.folds = K, data.fold = 0..K-1: fold k is test, fold k+1 val, the rest train; the csv's `group` "
        "column, e.g. the slide, keeps groups whole). A replicate's value is the mean over its K folds, so every "
        "item is scored once. Unset = each spec's own split. At least 3 (train, val and test are folds).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"study.seeds repeats a seed ({seeds}); a repeated seed repeats the same run")
        return seeds


class LabelsSection(Section):
    fractions: list[float] = Field(
        default=[1.0],
        description="Label fractions of every grid entry without its own `fractions` (1.0 = all labels, no "
        "subset; the paper's low-label regimes are 0.01 and 0.1).")
    seed: int = Field(default=0, description="Seed of the subsets: one fixed subset per fraction, as in the "
                                             "paper; the training seeds vary the runs.")
    classification_spec: GridPath | None = Field(
        default=None,
        description="A `subsample` spec with a [data] table: its [data] is replaced by each evaluation's [data] "
        "(same splits), its fractions by the study's. Needed when an evaluation uses a fraction below 1.")
    segmentation_spec: GridPath | None = Field(
        default=None,
        description="A `subsample` spec with an [images] table, for segmentation entries with a fraction "
        "below 1 (CoNSeP: images of data.train[0]).")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        return _check_fractions(value) or []


class PretrainEntry(Section):
    name: str = Field(description="Name a [[backbones]] entry refers to (`pretrain = \"<name>\"`); part of each "
                                  "pre-training run directory's name.")
    spec: GridPath = Field(description="A `pathssl pretrain` spec; the study sets run.seed, run.output_dir and "
                                       "run.resume = true.")
    set: list[str] = Field(default_factory=list,
                           description="--set overrides applied to the spec, after study.pretrain_set.")
    seeds: list[int] | None = Field(
        default=None, min_length=1,
        description="Pre-training seeds, one run (and one backbone) each; unset = study.seeds. Each is a "
        "replicate of the rows that use it, evaluated with the same seed.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeats a seed ({seeds}); a repeated seed repeats the same pre-training")
        return seeds


class BackboneEntry(Section):
    name: str = Field(description="Row label in the tables and part of each run directory's name.")
    backbone: BackboneName | None = Field(
        default=None, description="Registry name (`pathssl backbones list`) or 'timm:<name>'. Required unless "
                                  "`pretrain` is set (then the pretrain spec's model.backbone; if given, it "
                                  "must be that one).")
    weights: Literal["random"] | GridPath | None = Field(
        default=None,
        description="'random', a local weights file, or a `pathssl pretrain` run directory (its "
        "backbone.safetensors is used). Never downloaded. Unset = 'random', or the [[pretrains]] entry's "
        "backbones when `pretrain` is set.")
    pretrain: str | None = Field(
        default=None,
        description="Name of a [[pretrains]] entry: the row's backbones are that entry's pre-training runs, one "
        "per seed (instead of `weights`).")
    normalization: NormalizationSpec | None = Field(
        default=None, description="Overrides model.normalization of every spec (Lunit's release: 'lunit_tcga'; "
                                  "timm's ImageNet ViT-S/16: 'timm'); unset keeps each spec's own.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value)

    @model_validator(mode="after")
    def _one_source(self) -> BackboneEntry:
        if self.pretrain is not None and self.weights is not None:
            raise ValueError(f"backbone {self.name!r} sets both weights ({self.weights}) and pretrain "
                             f"({self.pretrain!r}); its weights are the pre-training runs': remove `weights`")
        if self.pretrain is None and self.backbone is None:
            raise ValueError(f"backbone {self.name!r} needs `backbone` (a registry name) or `pretrain` (a "
                             "[[pretrains]] entry, whose spec names the backbone)")
        return self


class GridEntry(Section):
    spec: GridPath = Field(description="The spec file applied to each backbone.")
    name: str | None = Field(default=None,
                             description="Column label and part of the run directory name; unset = the spec "
                                         "file's stem.")
    set: list[str] = Field(default_factory=list, description="--set overrides applied to this spec in every run.")
    fractions: list[float] | None = Field(default=None,
                                          description="Label fractions for this entry; unset = labels.fractions.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return value if value is None else _slug(value)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        return _check_fractions(value)

    @property
    def label(self) -> str:
        return self.name or Path(self.spec).stem


class SlurmSection(Section):
    gpus: int = Field(default=1, ge=0, description="GPUs per array task (one run at a time per task).")
    cpus: int = Field(default=8, ge=1, description="CPU cores per task: data loading workers plus one.")
    mem: str | None = Field(default=None, description="Memory per task in SLURM's syntax ('64G'); unset = the "
                                                      "cluster's default.")
    time: str = Field(default="24:00:00", description="Wall-clock limit per task (HH:MM:SS); a run killed at "
                                                       "the limit resumes when its task is resubmitted.")
    partition: str | None = Field(default=None, description="SLURM partition; unset = the cluster's default.")
    pretrain_time: str | None = Field(
        default=None, description="Wall-clock limit of each pre-training task (HH:MM:SS); unset = `time`. A "
                                  "pre-training killed at the limit resumes from its checkpoint when resubmitted.")
    setup: list[str] = Field(default_factory=list,
                             description="Shell lines run before pathssl (module load, source venv/bin/activate).")


class TablesSection(Section):
    reference: str | None = Field(
        default=None,
        description="A backbone name: every other row's paired difference against it, replicate by replicate "
        "(the same seeds, folds and test sets), with a paired t-interval over the replicates. Unset = no "
        "differences.")
    confidence: float = Field(default=0.95, gt=0, lt=1,
                              description="Confidence level of the intervals (0.95: the usual 95%).")


class StudySpec(SpecModel):
    kind: Literal["study"] = Field(description="Spec kind: 'study'.")
    study: StudySection = Field(description="Name, output root and seeds.")
    labels: LabelsSection = Field(default_factory=LabelsSection, description="Label fractions (`subsample`).")
    pretrains: list[PretrainEntry] = Field(default_factory=list,
                                           description="Pre-training runs whose backbones [[backbones]] use.")
    backbones: list[BackboneEntry] = Field(min_length=1, description="The pre-trained backbones: the rows.")
    evaluations: list[GridEntry] = Field(default_factory=list,
                                         description="linear | finetune | knn specs applied to each backbone.")
    segmentations: list[GridEntry] = Field(default_factory=list,
                                           description="segment specs (train, then eval) applied to each backbone.")
    tables: TablesSection = Field(default_factory=TablesSection,
                                  description="The report's paired differences and confidence level.")
    slurm: SlurmSection = Field(default_factory=SlurmSection, description="Resources of `--emit-slurm`.")

    @model_validator(mode="after")
    def _references(self) -> StudySpec:
        """Names that refer to other entries: checked here, so that `spec validate --no-input-check` sees them."""
        found: list[str] = []
        names = [p.name for p in self.pretrains]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            found.append(f"pretrains: name(s) {repeated} used twice; the runs would share directories")
        used = {bb.pretrain for bb in self.backbones}
        for i, bb in enumerate(self.backbones):
            if bb.pretrain is not None and bb.pretrain not in names:
                found.append(f"backbones[{i}].pretrain = {bb.pretrain!r} names no [[pretrains]] entry (there are: "
                             f"{names or 'none'})")
        for i, entry in enumerate(self.pretrains):
            if entry.name not in used:
                found.append(f"pretrains[{i}] ({entry.name!r}) is used by no [[backbones]] entry: it would pre-train "
                             f"for nothing; add [[backbones]] with pretrain = {entry.name!r}, or remove it")
        rows = [bb.name for bb in self.backbones]
        if self.tables.reference is not None and self.tables.reference not in rows:
            found.append(f"tables.reference = {self.tables.reference!r} is not a backbone name (the rows are: "
                         f"{rows})")
        if found:
            raise ValueError("; ".join(found))
        return self

    def seeds_of(self, backbone: BackboneEntry) -> list[int]:
        """The replicate seeds of a row: its pre-training entry's seeds, else the study's."""
        entry = next((p for p in self.pretrains if p.name == backbone.pretrain), None)
        return list(entry.seeds or self.study.seeds) if entry is not None else list(self.study.seeds)

    # The grid's own input check (spec kinds, weights, fractions subsample would refuse, runs sharing a
    # directory) is the planner's, `pathssl_cli.study.plan.build_plan`: `pathssl study` and `pathssl spec
    # validate` run it before any work. A spec model never imports the command that runs it.
