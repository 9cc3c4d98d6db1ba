"""The classification benchmarks of the paper (BACH, CRC, PCam, MHIST) plus any ImageFolder or CSV dataset.

Each dataset is one file in `pathssl_cli/data/datasets/` (its docstring documents the official layout and
how its train/val/test splits are made) and one line in `DATASETS` below. A loader takes the `[data]` section
and a split name and returns a `ClassificationDataset`; `open_dataset` adds what all share: the `train_subset`
file of the low-label regimes. `eval_transform` is the deterministic evaluation transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import cv2
import numpy as np
import torch

from pathssl_cli.data.datasets.bach import open_bach
from pathssl_cli.data.datasets.base import SPLITS, ClassificationDataset, DataSource, Split, count_text
from pathssl_cli.data.datasets.crc import open_crc
from pathssl_cli.data.datasets.csv_list import open_csv
from pathssl_cli.data.datasets.folder import open_folder
from pathssl_cli.data.datasets.mhist import open_mhist
from pathssl_cli.data.datasets.pcam import open_pcam
from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.registry import Registry

__all__ = ["DATASETS", "SPLITS", "ClassificationDataset", "DatasetLoader", "EvalTransform", "Split",
           "eval_transform", "layout_problems", "open_dataset"]

DatasetLoader = Callable[[DataSource, Split], ClassificationDataset]

DATASETS: Registry[DatasetLoader] = Registry("dataset")
DATASETS.add("bach", open_bach)
DATASETS.add("crc", open_crc)
DATASETS.add("pcam", open_pcam)
DATASETS.add("mhist", open_mhist)
DATASETS.add("folder", open_folder)
DATASETS.add("csv", open_csv)


def open_dataset(data: DataSource, split: Split) -> ClassificationDataset:
    """One split of the dataset the `[data]` section names; `train` is narrowed to `data.train_subset` if set.

    Layout problems raise `SpecError` (exit 2) naming what was found, what was expected and the fix; an image
    that cannot be decoded raises `WorkFailed` (exit 1) when it is loaded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = DATASETS.get(data.dataset)(data, split)
    if split == "train" and data.train_subset is not None:
        dataset = apply_subset(dataset, data)
    return dataset


def apply_subset(dataset: ClassificationDataset, data: DataSource) -> ClassificationDataset:
    """Narrow the train split to the items of a subset file written by `pathssl subsample`."""
    from pathssl_cli.data.subset_files import read_subset_rows, subset_metadata

    path = data.train_subset
    assert path is not None
    meta = subset_metadata(path)
    source = meta.get("source", {})
    if source.get("kind") == "images":
        raise SpecError(f"{path}: this subset lists segmentation images ({source.get('format')}), not the "
                        "train split of a classification dataset; give data.train_subset a file written "
                        "from a [data] source.")
    # The train split depends on how val (and for BACH/CSV, test) were carved; a file made under other
    # settings would silently leak val items into training, so settings that shape the split must agree.
    mismatched = [f"{key} = {source[key]!r} in the file, {getattr(data, key)!r} in this spec"
                  for key in ("dataset", "val_fraction", "test_fraction", "split_seed")
                  if key in source and source[key] != getattr(data, key)]
    # A pathssl file written before folds existed (no key) was drawn from the unfolded train split.
    mismatched += [f"{key} = {source.get(key)!r} in the file, {getattr(data, key)!r} in this spec"
                   for key in ("folds", "fold") if source and source.get(key) != getattr(data, key)]
    if mismatched:
        raise SpecError(f"{path}: written for another split of the data: {'; '.join(mismatched)}. Rerun "
                        "`pathssl subsample` with this [data] section, or set these fields to the file's "
                        "values.")
    rows = read_subset_rows(path)
    position = {item: i for i, item in enumerate(dataset.ids)}
    unknown = [item for item, _ in rows if item not in position]
    if unknown:
        raise SpecError(f"{path}: {len(unknown)} of its {len(rows)} ids are not in the train split of "
                        f"{data.dataset} at {data.root}: {count_text(unknown)}. The file was written for "
                        "other data; rerun `pathssl subsample` on this dataset.")
    wrong = [f"{item} (file: {label}, dataset: {dataset.classes[dataset.targets[position[item]]]})"
             for item, label in rows if dataset.classes[dataset.targets[position[item]]] != label]
    if wrong:
        raise SpecError(f"{path}: labels do not match the dataset for {len(wrong)} item(s): "
                        f"{count_text(wrong)}. Rerun `pathssl subsample` on this dataset.")
    return dataset.select(sorted(position[item] for item, _ in rows))


def layout_problems(data: DataSource, splits: Sequence[Split] = SPLITS,
                    where: str = "data") -> list[Problem]:
    """Every layout problem of the given splits, for a spec's `check_inputs` (so they surface before work)."""
    problems: list[Problem] = []
    seen: set[str] = set()

    def note(error: SpecError, field: str) -> None:
        for problem in error.problems:
            if str(problem) not in seen:  # a bad root fails every split the same way
                seen.add(str(problem))
                problems.append(Problem(problem.where or f"{where}.{field}", problem.message))

    for split in splits:
        try:
            dataset = DATASETS.get(data.dataset)(data, split)
        except SpecError as error:
            note(error, "root")
            continue
        if split == "train" and data.train_subset is not None:
            try:  # the subset file's own problems belong to its field, not to the dataset root
                apply_subset(dataset, data)
            except SpecError as error:
                note(error, "train_subset")
    return problems


class EvalTransform:
    """uint8 HxWx3 RGB → normalised float (3, size, size): resize the shorter side to `size`, centre-crop.

    Square inputs (CRC 224, PCam 96, MHIST 224 px) are resized whole. Non-square ones (BACH 2048×1536) keep
    their aspect ratio and lose the borders of the long side: squashing would distort nuclei shapes, which the
    features are sensitive to. `crop="none"` resizes to size×size instead. Shrinking uses area averaging (no
    aliasing), enlarging bicubic. A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop: Literal["center", "none"] = "center") -> None:
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.crop = crop

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        height, width = image.shape[:2]
        size = self.image_size
        if self.crop == "center":
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        else:
            scale, new_h, new_w = size / min(height, width), size, size
        if (new_h, new_w) != (height, width):
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
            image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        image = image[top:top + size, left:left + size]
        chw = image.transpose(2, 0, 1).astype(np.float32) / 255.0
        return torch.from_numpy((chw - self.mean) / self.std)

    def __repr__(self) -> str:
        return (f"EvalTransform(image_size={self.image_size}, mean={self.mean.ravel().tolist()}, "
                f"std={self.std.ravel().tolist()}, crop={self.crop!r})")


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop: Literal["center", "none"] = "center") -> EvalTransform:
    """The deterministic evaluation transform: resize to the backbone's input size, then its normalisation."""
    return EvalTransform(image_size, mean, std, crop)
