"""A spec kind used only by the spec-system tests, so they exercise every loader feature in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pathssl_cli.specs import BackboneName, InputPath, OutputPath, PathPattern, Section, SpecModel, WeightsRef


class ToyData(Section):
    root: InputPath = Field(description="Dataset folder; must exist.")
    extra: list[InputPath] = Field(default_factory=list, description="More inputs; each must exist.")
    patterns: list[PathPattern] = Field(default_factory=list, description="Globs, not checked.")


class ToyModel(Section):
    backbone: BackboneName = Field("resnet_tiny", description="Registry name.")
    weights: WeightsRef = Field("random", description="'random' or a local file.")


class ToyOptim(Section):
    lr: float = Field(1e-3, gt=0, description="Learning rate (1/step).")
    batch_size: int = Field(8, ge=1, description="Global batch (images).")
    schedule: Literal["cosine", "step"] = Field("cosine", description="LR schedule.")


class ToyRun(Section):
    output_dir: OutputPath = Field(Path("runs/toy"), description="Where outputs go.")
    world_size: int = Field(1, ge=1, description="Processes.")


class ToySpec(SpecModel):
    kind: Literal["toy"] = "toy"
    data: ToyData
    model: ToyModel = Field(default_factory=ToyModel)
    optim: ToyOptim = Field(default_factory=ToyOptim)
    run: ToyRun = Field(default_factory=ToyRun)

    @model_validator(mode="after")
    def _batch_divides(self) -> ToySpec:
        if self.optim.batch_size % self.run.world_size:
            raise ValueError(f"optim.batch_size={self.optim.batch_size} is not divisible by "
                             f"run.world_size={self.run.world_size}; make it a multiple")
        return self
