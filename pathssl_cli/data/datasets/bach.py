"""BACH, ICIAR 2018 Grand Challenge on Breast Cancer Histology, part A (microscopy; zenodo record 3632035).

Official layout (``ICIAR2018_BACH_Challenge/Photos/`` of the release)::

    Photos/microscopy_ground_truth.csv          no header; rows "b001.tif,Benign" (file name, class)
    Photos/Benign/b001.tif ... b100.tif         2048×1536 px RGB TIFF, 0.42 µm/px
    Photos/InSitu/is001.tif ... is100.tif
    Photos/Invasive/iv001.tif ... iv100.tif
    Photos/Normal/n001.tif ... n100.tif

`data.root` may be `Photos/`, or any folder above it in that path (``ICIAR2018_BACH_Challenge/`` or the
folder holding it). The CSV and the folders must agree: every listed file must exist in the folder of its
label, and every image must be listed.

Splits: the 100 labelled images per class are all there is (the 100 test images have hidden labels), so the
split is ours, seeded by `data.split_seed` and stratified by class: `test` holds round(`data.test_fraction` ×
100) images per class (20 at the default 0.2), `val` holds round(`data.val_fraction` × the rest) per class,
and `train` the remainder. BACH does not publish patient ids, so images of one patient may fall on both sides
of a split; results are comparable with other runs of this split, not with patient-level splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pathssl_cli.data.datasets.base import (
    ClassificationDataset,
    DataSource,
    ImageFileDataset,
    Split,
    carve_val,
    count_text,
    scan_class_folders,
    stratified_holdout,
)
from pathssl_cli.errors import SpecError

CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
CSV_NAME = "microscopy_ground_truth.csv"
FIX = ("Set data.root to ICIAR2018_BACH_Challenge/Photos/ as unzipped from https://zenodo.org/record/3632035 "
       f"(it holds {CSV_NAME} and the folders {', '.join(CLASSES)}).")


def find_photos(root: Path) -> Path:
    for candidate in (root, root / "Photos", root / "ICIAR2018_BACH_Challenge" / "Photos"):
        if (candidate / CSV_NAME).is_file():
            return candidate
    raise SpecError(f"{root}: no {CSV_NAME} here, in Photos/ or in ICIAR2018_BACH_Challenge/Photos/. {FIX}")


def read_ground_truth(csv_path: Path) -> dict[str, str]:
    """file name → class from the official CSV (no header; a header row, if someone added one, is skipped)."""
    labels: dict[str, str] = {}
    problems: list[str] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if len(cells) < 2:
                problems.append(f"line {number}: {row!r} (expected 'file.tif,Class')")
                continue
            name, label = cells[0], cells[1]
            if label not in CLASSES:
                if number == 1:
                    continue  # a header such as "name,label"
                problems.append(f"line {number}: class {label!r} is not one of {list(CLASSES)}")
                continue
            labels[name] = label
    if problems:
        raise SpecError(f"{csv_path}: {len(problems)} bad row(s): {count_text(problems, 3)}. The official "
                        "file has one 'file.tif,Class' row per image and no header.")
    return labels


def open_bach(data: DataSource, split: Split) -> ClassificationDataset:
    photos = find_photos(Path(data.root))
    labels = read_ground_truth(photos / CSV_NAME)
    classes, files, targets = scan_class_folders(photos, CLASSES, "the four BACH class folders", FIX,
                                                 extensions=(".tif", ".tiff"), ignore_extra=True)
    on_disk = {f.name: classes[t] for f, t in zip(files, targets, strict=True)}
    unlisted = sorted(set(on_disk) - set(labels))
    missing = sorted(set(labels) - set(on_disk))
    disagree = sorted(f"{name} (csv: {labels[name]}, folder: {on_disk[name]})"
                      for name in set(labels) & set(on_disk) if labels[name] != on_disk[name])
    details = []
    if disagree:
        details.append(f"{len(disagree)} image(s) whose folder disagrees with the CSV label: "
                       f"{count_text(disagree)}")
    if missing:
        details.append(f"{len(missing)} file(s) listed in {CSV_NAME} but not found: {count_text(missing)}")
    if unlisted:
        details.append(f"{len(unlisted)} image(s) not listed in {CSV_NAME}: {count_text(unlisted)}")
    if details:
        raise SpecError(f"{photos}: labels do not match the images: " + "; ".join(details) +
                        f". Restore the official folders and CSV (re-extract the archive). {FIX}")
    pool = ImageFileDataset("bach", split, photos, classes, files, targets)
    rest, test = stratified_holdout(pool.ids, pool.targets, classes, data.test_fraction, data.split_seed,
                                    salt="bach-test")
    if split == "test":
        return pool.select(test)
    return carve_val(pool.select(rest), split, data.val_fraction, data.split_seed)
