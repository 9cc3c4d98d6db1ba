"""PatchCamelyon (Veeling et al. 2018; github.com/basveeling/pcam): metastasis in lymph-node patches.

Official layout (the six files of the release, gunzipped, in `data.root`)::

    camelyonpatch_level_2_split_train_x.h5   dataset "x": (262144, 96, 96, 3) uint8 RGB
    camelyonpatch_level_2_split_train_y.h5   dataset "y": (262144, 1, 1, 1) uint8, 1 = tumour in the
                                             centre 32×32 px
    camelyonpatch_level_2_split_valid_{x,y}.h5   32768 patches
    camelyonpatch_level_2_split_test_{x,y}.h5    32768 patches

Splits are the official ones (`valid` → "val"); classes are 0 "no_tumor", 1 "tumor". Images are read
lazily, one patch per `load_image`, from an HDF5 handle opened on first use in each process (DataLoader
workers each open their own; handles are never pickled), so memory never holds the 262k training patches.
Labels (a few hundred KB) are read at open. The release ships `.h5.gz` files; those are refused with the
gunzip command to run. Item ids are ``idx:<row>`` within the split's file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathssl_cli.data.datasets.base import ClassificationDataset, DataSource, Split, describe_missing
from pathssl_cli.errors import SpecError, WorkFailed

CLASSES = ("no_tumor", "tumor")
FILE_SPLIT = {"train": "train", "val": "valid", "test": "test"}
PATCH_SHAPE = (96, 96, 3)


def pcam_file(root: Path, split: Split, part: str) -> Path:
    """The .h5 file of one split and part ("x" or "y"), refusing gzipped or missing files with the fix."""
    name = f"camelyonpatch_level_2_split_{FILE_SPLIT[split]}_{part}.h5"
    path = root / name
    if path.is_file():
        return path
    gz = root / f"{name}.gz"
    if gz.is_file():
        raise SpecError(f"{gz}: PatchCamelyon files must be decompressed before use (HDF5 cannot be read "
                        f"lazily through gzip). Run: gunzip {gz}  (or 'gunzip -k' to keep the archive).")
    raise SpecError(f"{path}: expected this PatchCamelyon file, but it {describe_missing(path)}. Set "
                    "data.root to the folder holding the six "
                    "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 files from "
                    "https://github.com/basveeling/pcam (gunzipped).")


def _dataset(handle: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in handle:
        raise SpecError(f"{path}: no HDF5 dataset {key!r} (found {sorted(handle.keys())}). The official "
                        f"*_{key}.h5 files hold one dataset named {key!r}; re-download the file.")
    return handle[key]


class PCamDataset(ClassificationDataset):
    def __init__(self, split: Split, x_path: Path, targets: np.ndarray) -> None:
        super().__init__("pcam", split, CLASSES, targets, [f"idx:{i}" for i in range(len(targets))])
        self.x_path = x_path
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def _images(self) -> h5py.Dataset:
        # One handle per process: an h5py handle inherited through fork or unpickled in a worker is unsafe.
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.x_path, "r")
            self._pid = os.getpid()
        return self._handle["x"]

    def _load(self, row: int) -> np.ndarray:
        try:
            return np.asarray(self._images()[row], dtype=np.uint8)
        except OSError as error:
            raise WorkFailed(f"{self.x_path}: cannot read patch {row} ({error}). The file is truncated or "
                             "corrupt; re-download and gunzip it.") from None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state


def open_pcam(data: DataSource, split: Split) -> ClassificationDataset:
    root = Path(data.root)
    x_path, y_path = pcam_file(root, split, "x"), pcam_file(root, split, "y")
    try:
        with h5py.File(x_path, "r") as xf, h5py.File(y_path, "r") as yf:
            x, y = _dataset(xf, x_path, "x"), _dataset(yf, y_path, "y")
            x_shape, x_dtype = x.shape, x.dtype
            labels = np.asarray(y[...]).reshape(-1) if y.ndim >= 1 and y.shape[1:] == (1, 1, 1) else None
            y_shape = y.shape
    except OSError as error:
        raise SpecError(f"{root}: cannot open the PatchCamelyon HDF5 files for split {split!r} ({error}). "
                        "Re-download and gunzip them.") from None
    if len(x_shape) != 4 or tuple(x_shape[1:]) != PATCH_SHAPE or x_dtype != np.uint8:
        raise SpecError(f"{x_path}: dataset 'x' is {x_shape} {x_dtype}; expected (N, 96, 96, 3) uint8 as in "
                        "the official release.")
    if labels is None:
        raise SpecError(f"{y_path}: dataset 'y' has shape {y_shape}; expected (N, 1, 1, 1) as in the "
                        "official release.")
    if len(labels) != x_shape[0]:
        raise SpecError(f"labels do not match the images: {y_path.name} holds {len(labels)} labels but "
                        f"{x_path.name} holds {x_shape[0]} patches. The x and y files must come from the "
                        "same split of the same release; re-download the pair.")
    bad = np.setdiff1d(np.unique(labels), [0, 1])
    if len(bad):
        raise SpecError(f"{y_path}: labels must be 0 (no tumour) or 1 (tumour); found {bad[:5].tolist()}.")
    return PCamDataset(split, x_path, labels.astype(np.int64))
