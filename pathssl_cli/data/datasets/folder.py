"""Any dataset as one ImageFolder per split (torchvision's layout), for data the registry does not know.

Layout::

    root/train/<class>/<image>     required
    root/val/<class>/<image>       optional: without it, `val` is a seeded class-stratified
                                   `data.val_fraction` of train (and `train` the rest), and the run says so
    root/test/<class>/<image>      optional: without it, asking for the test split is an error

Classes are the train split's sub-folder names in sorted order; val and test must hold exactly the same class
folders. Images are .png/.jpg/.jpeg/.tif/.tiff/.bmp/.webp/.ppm, sorted by name. Item ids are paths relative to
`root` (``train/ADI/x.png``).
"""

from __future__ import annotations

from pathlib import Path

from pathssl_cli.data.datasets.base import (
    ClassificationDataset,
    DataSource,
    ImageFileDataset,
    Split,
    announce_once,
    carve_val,
    describe_missing,
    is_image,
    scan_class_folders,
)
from pathssl_cli.errors import SpecError

FIX = ("Lay the images out as root/train/<class>/*, root/val/<class>/* (optional) and root/test/<class>/* "
       "(optional).")


def open_folder(data: DataSource, split: Split) -> ClassificationDataset:
    root = Path(data.root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        # A common mistake: one ImageFolder of class folders with no split level.
        children = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        looks_flat = children and all(any(is_image(f) for f in c.iterdir()) for c in children)
        hint = (f" {root} looks like a single ImageFolder of class folders "
                f"({', '.join(sorted(c.name for c in children)[:6])}):"
                f" move them into {train_dir}/." if looks_flat else "")
        raise SpecError(f"{train_dir}: expected the train split folder, but it "
                        f"{describe_missing(train_dir)}.{hint} {FIX}")
    classes, files, targets = scan_class_folders(train_dir, None, "one folder per class", FIX)
    if split != "test" and not (root / "val").exists():
        announce_once(f"{root}: no val/ folder, so the validation split is a stratified "
                      f"{data.val_fraction:g} of train/ (seed {data.split_seed}); the rest is used for "
                      "training.")
        train = ImageFileDataset("folder", split, root, classes, files, targets)
        return carve_val(train, split, data.val_fraction, data.split_seed)
    if split == "train":
        return ImageFileDataset("folder", split, root, classes, files, targets)
    split_dir = root / split
    if split == "test" and not split_dir.exists():
        raise SpecError(f"{split_dir}: this dataset has no test split (found "
                        f"{sorted(p.name for p in root.iterdir())}). Add {split_dir}/<class>/ folders, or "
                        "evaluate without a test split.")
    _, files, targets = scan_class_folders(split_dir, classes, f"the {split} split's class folders", FIX)
    return ImageFileDataset("folder", split, root, classes, files, targets)
