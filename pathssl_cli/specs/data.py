"""`[data]`: which labelled dataset a linear, finetune, knn or subsample spec reads, and how it is split."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pathssl_cli.errors import Problem
from pathssl_cli.specs.core import InputPath, Section


class DataSection(Section):
    """A classification dataset in its official layout (see `pathssl_cli/data/datasets/<name>.py`)."""

    dataset: str = Field(
        description="Registry name of the dataset: 'bach', 'crc', 'pcam', 'mhist' (official layouts), "
        "'folder' (root/train|val|test/<class>/*) or 'csv' (a path,label[,split] file).")
    root: InputPath = Field(
        description="Dataset root in its official layout (for 'csv', the CSV file). Relative paths are "
        "relative to the spec file.")
    train_subset: InputPath | None = Field(
        default=None,
        description="Subset file written by `pathssl subsample` (low-label regimes): only its items of the "
        "train split are used. None uses the whole train split.")
    val_fraction: float = Field(
        default=0.1, gt=0, lt=1,
        description="Fraction of each class of the train pool held out for validation, used only where the "
        "dataset has no official validation split (BACH, CRC, MHIST, a folder without val/, a CSV without "
        "val rows). 0.1 leaves 90% for training while keeping a val set large enough to pick lr and weight "
        "decay.")
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1,
        description="Fraction of each class held out as the test split where no labelled test set exists "
        "(BACH, whose official test labels are hidden, and a CSV without a split column). 0.2 = 20 BACH "
        "images per class, the usual 80/20 protocol.")
    split_seed: int = Field(
        default=0,
        description="Seed of the val/test hold-outs above and of the folds below. Keep it fixed across runs you "
        "want to compare: it decides which items are trained on. Independent of the training seed on purpose.")
    folds: int | None = Field(
        default=None, ge=3,
        description="K group-aware folds of a 'csv' dataset without a split column, instead of the "
        "test_fraction/val_fraction hold-outs: scikit-learn's StratifiedGroupKFold over the `group` column "
        "(slide, patient), class-stratified as far as whole groups allow (pathssl_cli/data/datasets/folds.py). "
        "Fold `data.fold` is the test split, fold (fold + 1) mod K the val split, the other K - 2 train. At "
        "least 3 (train, val and test are each a fold); at most the number of groups. Unset = no folds.")
    fold: int | None = Field(
        default=None, ge=0,
        description="Which fold (0..folds-1) is the test split; required with data.folds. Running 0..K-1 "
        "scores every item once, by a probe that saw none of its group.")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from pathssl_cli.data.benchmarks import DATASETS

        if name not in DATASETS:
            raise ValueError(DATASETS.unknown_message(name))
        return name

    @model_validator(mode="after")
    def _folds_complete(self) -> DataSection:
        if self.folds is None:
            if self.fold is not None:
                raise ValueError(f"data.fold = {self.fold} needs data.folds (the number of folds K)")
            return self
        if self.dataset != "csv":
            raise ValueError(f"data.folds applies to 'csv' datasets, whose `group` column defines the folds; "
                             f"dataset {self.dataset!r} has its own splits. Remove data.folds and data.fold, or "
                             "list the images in a CSV with a group column.")
        if self.fold is None:
            raise ValueError(f"data.folds = {self.folds} needs data.fold: which fold (0..{self.folds - 1}) is the "
                             "test split")
        if self.fold >= self.folds:
            raise ValueError(f"data.fold = {self.fold}, but data.folds = {self.folds}: folds are numbered "
                             f"0..{self.folds - 1}")
        ignored = [f"data.{name}" for name in ("test_fraction", "val_fraction") if name in self.model_fields_set]
        if ignored:
            raise ValueError(f"{' and '.join(ignored)} cannot be combined with data.folds: fold data.fold is the "
                             "test split and the next fold the val split. Remove them, or remove data.folds.")
        return self

    def layout_problems(self, splits: tuple[str, ...] = ("train", "val", "test"),
                        where: str = "data") -> list[Problem]:
        """Problems with the dataset on disk for these splits (call from a spec's `check_inputs`)."""
        from pathssl_cli.data.benchmarks import layout_problems

        return layout_problems(self, splits, where)  # type: ignore[arg-type]
