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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

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


class BackboneEntry(Section):
    name: str = Field(description="Row label in the tables and part of each run directory's name.")
    backbone: BackboneName = Field(description="Registry name (`pathssl backbones list`) or 'timm:<name>'.")
    weights: Literal["random"] | GridPath = Field(
        default="random",
        description="'random', a local weights file, or a `pathssl pretrain` run directory (its "
        "backbone.safetensors is used). Never downloaded.")
    normalization: NormalizationSpec | None = Field(
        default=None, description="Overrides model.normalization of every spec (Lunit's release: 'lunit_tcga'; "
                                  "timm's ImageNet ViT-S/16: 'timm'); unset keeps each spec's own.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value)


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
    setup: list[str] = Field(default_factory=list,
                             description="Shell lines run before pathssl (module load, source venv/bin/activate).")


class StudySpec(SpecModel):
    kind: Literal["study"] = Field(description="Spec kind: 'study'.")
    study: StudySection = Field(description="Name, output root and seeds.")
    labels: LabelsSection = Field(default_factory=LabelsSection, description="Label fractions (`subsample`).")
    backbones: list[BackboneEntry] = Field(min_length=1, description="The pre-trained backbones: the rows.")
    evaluations: list[GridEntry] = Field(default_factory=list,
                                         description="linear | finetune | knn specs applied to each backbone.")
    segmentations: list[GridEntry] = Field(default_factory=list,
                                           description="segment specs (train, then eval) applied to each backbone.")
    slurm: SlurmSection = Field(default_factory=SlurmSection, description="Resources of `--emit-slurm`.")

    # The grid's own input check (spec kinds, weights, fractions subsample would refuse, runs sharing a
    # directory) is the planner's, `pathssl_cli.study.plan.build_plan`: `pathssl study` and `pathssl spec
    # validate` run it before any work. A spec model never imports the command that runs it.
