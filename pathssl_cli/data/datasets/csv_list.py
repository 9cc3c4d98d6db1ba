"""Any dataset listed in a CSV file: one row per image, columns `path`, `label`, optionally `split` and `group`.

    path,label,split,group
    images/a.png,tumour,train,patient7
    /data/b.tif,stroma,test,patient9

`data.root` is the CSV file; relative paths are relative to its folder. Labels are class names (any text);
classes are all labels in sorted order. `split` is train, val or test. Without a `split` column, the rows are
split like BACH: a seeded class-stratified `data.test_fraction` for test, then `data.val_fraction` of the rest
for val. With a split column but no val rows, val is a stratified `data.val_fraction` of the train rows. Item
ids are the `path` cells as written.

`group` (optional) names what rows share: a patient, a slide, or the source image of augmented copies
(LC25000's tiles are rotated and flipped copies of fewer originals). Every hold-out made here (test, val)
keeps each group whole on one side, so a copy of a training image is never scored as unseen; an empty cell
makes the row its own group. An explicit `split` column is taken as written.

With `data.folds` = K and `data.fold` = k (a CSV without a split column), the groups are dealt into K
class-stratified folds instead: fold k is test, fold k + 1 val, the rest train (folds.py).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from pathssl_cli.data.datasets.base import (
    SPLITS,
    ClassificationDataset,
    DataSource,
    ImageFileDataset,
    Split,
    announce_once,
    carve_val,
    count_text,
    stratified_holdout,
)
from pathssl_cli.data.datasets.folds import fold_split
from pathssl_cli.errors import SpecError

FIX = ("The CSV needs a header row 'path,label' (and optionally ',split' with train/val/test and ',group' "
       "naming the patient/slide/source image).")


class CsvDataset(ImageFileDataset):
    def __init__(self, split: Split, root: Path, classes: list[str], rows: list[dict[str, str]]) -> None:
        files = [resolve(root, r["path"]) for r in rows]
        super().__init__("csv", split, root, classes, files, [classes.index(r["label"]) for r in rows])
        self.ids = [r["path"] for r in rows]
        if rows and "group" in rows[0]:
            self.groups = [r["group"] or f"path:{r['path']}" for r in rows]


def resolve(folder: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else folder / path


def read_rows(table: Path) -> list[dict[str, str]]:
    if not table.is_file():
        raise SpecError(f"{table}: the csv dataset needs data.root to be the CSV file itself, not a folder. "
                        f"{FIX}")
    with table.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise SpecError(f"{table}: found columns {columns}; expected 'path', 'label' and optionally "
                            f"'split'. {FIX}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise SpecError(f"{table}: no rows. {FIX}")
    problems = [f"row {n}: empty {key}" for n, r in enumerate(rows, start=2) for key in ("path", "label")
                if not r[key]]
    if "split" in columns:
        problems += [f"row {n}: split {r['split']!r}" for n, r in enumerate(rows, start=2)
                     if r["split"] not in SPLITS]
    if problems:
        raise SpecError(f"{table}: {len(problems)} bad cell(s): {count_text(problems)}. Splits must be one "
                        f"of {list(SPLITS)}. {FIX}")
    repeated = sorted(path for path, n in Counter(r["path"] for r in rows).items() if n > 1)
    if repeated:
        raise SpecError(f"{table}: {len(repeated)} path(s) listed more than once: {count_text(repeated)}. "
                        "List each image once, with one label and one split.")
    missing = [r["path"] for r in rows if not resolve(table.parent, r["path"]).is_file()]
    if missing:
        raise SpecError(f"{table}: {len(missing)} listed image(s) not found (relative paths are relative to "
                        f"{table.parent}): {count_text(missing)}.")
    return rows


def open_csv(data: DataSource, split: Split) -> ClassificationDataset:
    table = Path(data.root)
    rows = read_rows(table)
    classes = sorted({r["label"] for r in rows})
    if data.folds is not None:
        if "split" in rows[0]:
            raise SpecError(f"{table}: data.folds makes the splits, but this CSV has a 'split' column that "
                            "makes them too. Remove data.folds and data.fold, or drop the column.")
        pool = CsvDataset(split, table.parent, classes, rows)
        return fold_split(pool, split, data.folds, data.fold or 0, data.split_seed, str(table))
    if "split" not in rows[0]:
        pool = CsvDataset(split, table.parent, classes, rows)
        rest, test = stratified_holdout(pool.ids, pool.targets, classes, data.test_fraction, data.split_seed,
                                        salt="csv-test", groups=pool.groups)
        if split == "test":
            return pool.select(test)
        return carve_val(pool.select(rest), split, data.val_fraction, data.split_seed)
    by_split = {name: [r for r in rows if r["split"] == name] for name in SPLITS}
    train_labels = {r["label"] for r in by_split["train"]}
    if not by_split["train"]:
        raise SpecError(f"{table}: no row has split 'train'. {FIX}")
    unseen = sorted({r["label"] for r in rows} - train_labels)
    if unseen:
        raise SpecError(f"{table}: label(s) {unseen} appear in val/test rows but never in train rows; a "
                        "classifier cannot learn them. Add training rows for them or drop those rows.")
    if split != "test" and not by_split["val"]:
        announce_once(f"{table}: no 'val' rows, so the validation split is a stratified "
                     f"{data.val_fraction:g} of the train rows (seed {data.split_seed}).")
        train = CsvDataset(split, table.parent, classes, by_split["train"])
        return carve_val(train, split, data.val_fraction, data.split_seed)
    if not by_split[split]:
        raise SpecError(f"{table}: no row has split {split!r}; add some, or evaluate without a {split} "
                        "split.")
    return CsvDataset(split, table.parent, classes, by_split[split])
