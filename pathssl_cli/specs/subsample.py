"""`kind = "subsample"`: seeded, stratified, nested low-label subsets of a train split (`pathssl subsample`).

```toml
kind = "subsample"
[data]                      # a classification dataset: its train split is subsampled ...
dataset = "crc"
root = "data/crc"
# [images]                  # ... or, instead, the images of a segmentation dataset
# format = "consep"         # "consep" (root holds Images/*.png) | "pannuke" (root holds types.npy)
# root = "data/CoNSeP/Train"
[subsample]
fractions = [0.01, 0.1, 1.0]
seed = 0
[run]
output_dir = "runs/subsets/crc"
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.specs.core import InputPath, OutputPath, Section, SpecModel
from pathssl_cli.specs.data import DataSection


class ImageSource(Section):
    """Images of a segmentation dataset, subsampled as whole images (nuclei of one image stay together)."""

    format: Literal["consep", "pannuke"] = Field(
        description="'consep': a folder holding Images/*.png (item id = file stem, one stratum). "
        "'pannuke': a PanNuke fold folder holding types.npy, that file, or the release's 'Fold N' folder "
        "(where images/foldN/types.npy is found); item id = array index, strata = tissue types.")
    root: InputPath = Field(description="The folder (or types.npy file) described under `format`.")


class SubsampleSection(Section):
    fractions: list[float] = Field(
        default=[0.01, 0.1, 1.0], min_length=1,
        description="Fractions of each class to keep, each in (0, 1]. The paper's low-label regimes are 1% "
        "and 10% of the labels; 1.0 writes the full split in the same format for uniform specs.")
    seed: int = Field(default=0,
                      description="Seed of the per-class shuffles; the same seed gives the same files.")

    @field_validator("fractions")
    @classmethod
    def _valid_fractions(cls, fractions: list[float]) -> list[float]:
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must lie in (0, 1] (0.01 = 1%), got {bad}")
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"fractions repeat a value: {fractions}")
        return sorted(fractions)


class SubsampleRun(Section):
    output_dir: OutputPath = Field(
        description="Run directory for the subset files, subsets.json, spec.toml and run.json.")


class SubsampleSpec(SpecModel):
    kind: Literal["subsample"] = Field(description="Spec kind: 'subsample'.")
    data: DataSection | None = Field(
        default=None,
        description="A classification dataset whose train split is subsampled; the [data] of the evaluation "
        "specs that will use the files (same val_fraction, test_fraction, split_seed, folds and fold).")
    images: ImageSource | None = Field(default=None, description="Segmentation images to subsample instead.")
    subsample: SubsampleSection = Field(default_factory=SubsampleSection, description="Fractions and seed.")
    run: SubsampleRun = Field(description="Where to write.")

    @model_validator(mode="after")
    def _one_source(self) -> SubsampleSpec:
        if (self.data is None) == (self.images is None):
            raise ValueError("give exactly one source: a [data] table (classification train split) or an "
                             "[images] table (segmentation images)")
        return self

    def check_inputs(self) -> list[Problem]:
        # Layout errors and fractions too small for a class are input errors: report them before any output.
        from pathssl_cli.data.subsets import load_items, nested_subsets

        try:
            images = self.images
            items = load_items(self.data, images.format if images else None, images.root if images else None)
            fractions, seed = self.subsample.fractions, self.subsample.seed
            nested_subsets(items.ids, items.targets, items.classes, fractions, seed)
        except SpecError as error:
            where = "data" if self.data is not None else "images"
            return [Problem(p.where or where, p.message) for p in error.problems]
        return []
