"""NCT-CRC-HE-100K / CRC-VAL-HE-7K (Kather et al. 2019, zenodo record 1214456): colorectal tissue classes.

Official layout (the two zip files unpacked side by side under `root`)::

    root/NCT-CRC-HE-100K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/<CLASS>-<ID>.tif   100,000 tiles (training)
    root/CRC-VAL-HE-7K/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/<CLASS>-<ID>.tif     7,180 tiles (testing)

Tiles are 224×224 px RGB TIFF at 0.5 µm/px, Macenko-normalised. Splits: `test` is CRC-VAL-HE-7K (the official
test set); there is no official validation set, so `val` is a seeded class-stratified `data.val_fraction` of
NCT-CRC-HE-100K and `train` is the rest. Every file name starts with its class (``ADI-AAAFLCLY.tif``); a tile
whose prefix disagrees with its folder is reported as a label mismatch rather than trained on.
"""

from __future__ import annotations

from pathlib import Path

from pathssl_cli.data.datasets.base import (
    ClassificationDataset,
    DataSource,
    ImageFileDataset,
    Split,
    carve_val,
    count_text,
    describe_missing,
    scan_class_folders,
)
from pathssl_cli.errors import SpecError

CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
TRAIN_DIR = "NCT-CRC-HE-100K"
TEST_DIR = "CRC-VAL-HE-7K"
FIX = (f"Set data.root to the folder holding {TRAIN_DIR}/ and {TEST_DIR}/ as unzipped from "
       "https://zenodo.org/record/1214456, each with the nine class folders " + ", ".join(CLASSES) + ".")


def open_crc(data: DataSource, split: Split) -> ClassificationDataset:
    root = Path(data.root)
    if not (root / TRAIN_DIR).is_dir() and root.name in (TRAIN_DIR, TEST_DIR):
        raise SpecError(f"{root}: data.root points at {root.name}/ itself; it must be the folder that holds "
                        f"both {TRAIN_DIR}/ and {TEST_DIR}/ ({root.parent}).")
    folder = root / (TEST_DIR if split == "test" else TRAIN_DIR)
    if not folder.is_dir():
        raise SpecError(f"{folder}: expected the CRC {'test' if split == 'test' else 'training'} folder, "
                        f"but it {describe_missing(folder)}. {FIX}")
    classes, files, targets = scan_class_folders(folder, CLASSES, "the nine CRC class folders", FIX,
                                                 extensions=(".tif", ".tiff"), ignore_extra=True)
    misplaced = [f"{f.parent.name}/{f.name}" for f, t in zip(files, targets, strict=True)
                 if f.name.split("-", 1)[0] != classes[t]]
    if misplaced:
        raise SpecError(f"{folder}: {len(misplaced)} tile(s) sit in a class folder that disagrees with the "
                        f"class prefix of their file name: {count_text(misplaced)}. In the official "
                        "release every <CLASS>/ folder holds only <CLASS>-*.tif; move these files to the "
                        "folder of their prefix.")
    dataset = ImageFileDataset("crc", split, folder, classes, files, targets)
    if split == "test":
        return dataset
    return carve_val(dataset, split, data.val_fraction, data.split_seed)
