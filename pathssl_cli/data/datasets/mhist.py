"""MHIST (Wei et al. 2021, bmirds.github.io/MHIST): hyperplastic polyp vs sessile serrated adenoma.

Official layout (`images.zip` unpacked plus the annotation file, in `data.root`)::

    root/annotations.csv   columns: Image Name, Majority Vote Label (HP | SSA),
                           Number of Annotators who Selected SSA (Out of 7), Partition (train | test)
    root/images/MHIST_aaa.png ...     3,152 images of 224×224 px (2,175 train, 977 test)

Classes: 0 "HP", 1 "SSA" (SSA, the lesion to detect, is the positive class for AUROC). Splits: `train` and
`test` are the official partitions; MHIST has no validation set, so `val` is a seeded class-stratified
`data.val_fraction` of the official train partition and `train` the rest. Item ids are ``images/<name>``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pathssl_cli import console
from pathssl_cli.data.datasets.base import (
    ClassificationDataset,
    DataSource,
    ImageFileDataset,
    Split,
    carve_val,
    count_text,
    describe_missing,
)
from pathssl_cli.errors import SpecError

CLASSES = ("HP", "SSA")
NAME, LABEL, PARTITION = "Image Name", "Majority Vote Label", "Partition"
VOTES = "Number of Annotators who Selected SSA (Out of 7)"  # only used to cross-check the label
FIX = ("Set data.root to the folder holding annotations.csv and images/ as downloaded from "
       "bmirds.github.io/MHIST.")
ANNOTATORS = 7


def open_mhist(data: DataSource, split: Split) -> ClassificationDataset:
    root = Path(data.root)
    table, images = root / "annotations.csv", root / "images"
    for path, what in ((table, "annotations.csv"), (images, "the images/ folder")):
        if not path.exists():
            raise SpecError(f"{path}: expected {what} of MHIST, but it {describe_missing(path)}. {FIX}")
    with table.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing_columns = [c for c in (NAME, LABEL, PARTITION) if c not in columns]
        if missing_columns:
            raise SpecError(f"{table}: missing column(s) {missing_columns}; found {columns}; expected "
                            f"{[NAME, LABEL, VOTES, PARTITION]}. {FIX}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    problems = [f"row {n}: label {r[LABEL]!r}" for n, r in enumerate(rows, start=2)
                if r[LABEL] not in CLASSES]
    problems += [f"row {n}: partition {r[PARTITION]!r}" for n, r in enumerate(rows, start=2)
                 if r[PARTITION] not in ("train", "test")]
    if problems:
        raise SpecError(f"{table}: {len(problems)} bad value(s): {count_text(problems)}. Labels must be HP "
                        "or SSA and partitions train or test, as in the official file.")
    # The majority label must follow from the 7 votes; a disagreement means the file was edited or corrupted.
    votes = next((c for c in columns if c.startswith(VOTES.split(" (")[0])), None)
    disagree = [f"{r[NAME]} ({r[LABEL]}, {r[votes]} SSA votes)" for r in rows
                if votes and r[votes].isdigit() and (int(r[votes]) * 2 > ANNOTATORS) != (r[LABEL] == "SSA")]
    if disagree:
        console.warn(f"{table}: {len(disagree)} row(s) whose majority label disagrees with the SSA vote "
                     f"count: {count_text(disagree)}; the 'Majority Vote Label' column is used.")
    wanted = "test" if split == "test" else "train"
    chosen = [r for r in rows if r[PARTITION] == wanted]
    if not chosen:
        raise SpecError(f"{table}: no row has Partition = {wanted!r}. {FIX}")
    files = [images / r[NAME] for r in chosen]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise SpecError(f"labels do not match the images: {len(absent)} image(s) listed in {table.name} are "
                        f"not in {images}: {count_text(absent)}. Unzip images.zip into {images}.")
    targets = [CLASSES.index(r[LABEL]) for r in chosen]
    dataset = ImageFileDataset("mhist", split, root, CLASSES, files, targets)
    if split == "test":
        return dataset
    return carve_val(dataset, split, data.val_fraction, data.split_seed)
