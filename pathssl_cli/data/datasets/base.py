"""What every classification benchmark shares: the dataset contract, image files, layout checks and splits.

A loader (one small file per benchmark in this package) turns a dataset root in its official layout into a
`ClassificationDataset` for one split. Everything a user can get wrong about the layout is checked when the
dataset is opened, so that a wrong root fails before any work with a message naming what was found, what was
expected and how to fix it.
"""

from __future__ import annotations

import abc
import copy
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from pathssl_cli import console
from pathssl_cli.errors import SpecError, WorkFailed

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")



class DataSource(Protocol):
    """What a loader reads of the `[data]` table of a spec (`pathssl_cli.specs.data.DataSource` is one).

    A protocol here rather than the spec model itself, so the data layer never imports the spec layer that
    validates against its registry."""

    @property
    def dataset(self) -> str: ...
    @property
    def root(self) -> Path: ...
    @property
    def train_subset(self) -> Path | None: ...
    @property
    def val_fraction(self) -> float: ...
    @property
    def test_fraction(self) -> float: ...
    @property
    def split_seed(self) -> int: ...
    @property
    def folds(self) -> int | None: ...
    @property
    def fold(self) -> int | None: ...


# Extensions torchvision's ImageFolder accepts, plus the TIFF spellings the pathology benchmarks use.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".ppm")


class ClassificationDataset(torch.utils.data.Dataset, abc.ABC):
    """One split of a labelled image dataset: `len(self)` items, each an RGB image and a class index.

    `classes[k]` names class index k; `targets` (int64, one per item) are class indices; `ids` are stable item
    ids (a path relative to the dataset root, or ``"idx:<row>"`` for array datasets) that subset files refer
    to. `transform` (set by the caller) maps the uint8 HxWx3 image to the tensor `__getitem__` returns;
    without one, `__getitem__` returns the CHW uint8 tensor. Subclasses implement `_load(row)` for their
    own storage. `groups` (optional, one per item) names what items share (a patient, a slide, the source
    image of augmented copies): every hold-out keeps a group on one side, so near-copies never straddle
    train and test.
    """

    def __init__(self, name: str, split: Split, classes: Sequence[str], targets: Sequence[int] | np.ndarray,
                 ids: Sequence[str]) -> None:
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.ids = list(ids)
        # Position → row of the underlying storage; `select` narrows it without touching the storage.
        self._rows = np.arange(len(self.ids), dtype=np.int64)
        self.transform: Callable[[np.ndarray], torch.Tensor] | None = None
        # The official training partition this split and its val split were carved from (`carve_val`), so
        # that a protocol fitting nothing on val (kNN) can use all of it; None for an official split.
        self.carved_from: ClassificationDataset | None = None
        self.groups: list[str] | None = None
        if len(self.targets) != len(self.ids):
            raise ValueError(f"{len(self.targets)} targets for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> np.ndarray:
        """Item i as an RGB uint8 array of shape (H, W, 3)."""
        return self._load(int(self._rows[i]))

    @abc.abstractmethod
    def _load(self, row: int) -> np.ndarray:
        """Decode the image stored at `row` of the dataset's own listing."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(i)
        tensor = self.transform(image) if self.transform is not None else torch.from_numpy(
            np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, int(self.targets[i])

    def select(self, positions: Sequence[int] | np.ndarray) -> ClassificationDataset:
        """A view of the given items, in the given order (a shallow copy sharing the storage)."""
        positions = np.asarray(positions, dtype=np.int64)
        view = copy.copy(self)
        view._rows = self._rows[positions]
        view.targets = self.targets[positions]
        view.ids = [self.ids[p] for p in positions]
        if self.groups is not None:
            view.groups = [self.groups[p] for p in positions]
        return view

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=True)}


class UnreadableImage(WorkFailed):
    """An image file that cannot be decoded (exit 1), named with the fix.

    A DataLoader worker re-raises an exception in the main process as ``type(exc)(wrapped_text)``, where the
    wrapped text holds the worker's traceback; the constructor keeps only the original message, so the user
    sees the file and the fix rather than a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); grey, palette, RGBA and 16-bit files are converted."""
    try:
        # PIL warns before failing on a broken header; the error below says it better, once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
                return _to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(
            f"{path}: cannot read this image ({error}). The file is corrupt, truncated or not an image: "
            "re-download it from the dataset's official source, or delete it and rebuild the dataset "
            "folder."
        ) from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith(("I", "F")):
        # 16-bit, 32-bit and float greyscale: convert("RGB") would clip them; rescale their range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class ImageFileDataset(ClassificationDataset):
    """A split whose items are image files; `ids` are their paths relative to `root` (POSIX style)."""

    def __init__(self, name: str, split: Split, root: Path, classes: Sequence[str], files: Sequence[Path],
                 targets: Sequence[int] | np.ndarray) -> None:
        self.root = root
        self.files = [Path(f) for f in files]
        super().__init__(name, split, classes, targets, [relative_id(root, f) for f in self.files])

    def _load(self, row: int) -> np.ndarray:
        return read_rgb(self.files[row])


def relative_id(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly in `folder`, sorted by name so every listing order gives the same dataset."""
    allowed = tuple(e.lower() for e in extensions)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in allowed and not p.name.startswith("."))


def require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise SpecError(f"{path}: expected {what}, but it {describe_missing(path)}. {fix}")
    return path


def describe_missing(path: Path) -> str:
    """"does not exist" plus what the parent does hold, so a user sees the layout they actually have."""
    if path.exists():
        return "is a file, not a folder"
    parent = path.parent
    if not parent.is_dir():
        return f"does not exist (nor does {parent})"
    entries = sorted(p.name + ("/" if p.is_dir() else "")
                     for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    return f"does not exist; {parent} holds: {shown or 'nothing'}"


def scan_class_folders(
    split_dir: Path, expected: Sequence[str] | None, what: str, fix: str,
    extensions: Iterable[str] = IMAGE_EXTENSIONS, ignore_extra: bool = False,
) -> tuple[list[str], list[Path], list[int]]:
    """(classes, files, targets) of a folder holding one sub-folder of images per class.

    With `expected`, the class folders must be exactly those (the official class list, or the train split's
    classes when scanning val/test): a missing, extra or empty class folder is an error naming both lists.
    `ignore_extra` turns extra folders into a warning, for official layouts where a stray folder (a backup, a
    thumbnail cache) beside the class folders cannot be a class.
    """
    require_dir(split_dir, what, fix)
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(expected) if expected is not None else found
    missing = [c for c in classes if c not in found]
    extra = [c for c in found if c not in classes]
    if extra and ignore_extra:
        announce_once(f"{split_dir}: ignoring folder(s) {extra}, which are not classes of this dataset.")
        extra = []
    if missing or extra or not classes:
        details = []
        if missing:
            details.append(f"missing class folder(s) {missing}")
        if extra:
            details.append(f"unexpected folder(s) {extra}")
        if not classes:
            details.append("no class folders at all")
        raise SpecError(f"{split_dir}: {'; '.join(details)}. Expected one folder per class: "
                        f"{classes or '<class>/'}; found {found}. {fix}")
    files: list[Path] = []
    targets: list[int] = []
    allowed = tuple(extensions)
    for index, name in enumerate(classes):
        images = list_images(split_dir / name, allowed)
        if not images:
            raise SpecError(f"{split_dir / name}: class folder holds no images with extension "
                            f"{list(allowed)}. {fix}")
        files += images
        targets += [index] * len(images)
    return classes, files, targets


# ---------------------------------------------------------------------------------------------- splits


def class_permutation(ids: Sequence[str], seed: int, class_name: str, salt: str) -> np.ndarray:
    """A seeded permutation of `ids` (positions into `ids`) that depends only on the ids, not their order.

    The ids are sorted first and the generator is keyed by (seed, class name, purpose), so the same items get
    the same permutation whatever the file listing order or the other classes present.
    """
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    key = zlib.crc32(f"{salt}\0{class_name}".encode())
    rng = np.random.default_rng([seed & 0xFFFFFFFF, key])
    return order[rng.permutation(len(order))]


def stratified_holdout(ids: Sequence[str], targets: np.ndarray, classes: Sequence[str], fraction: float,
                       seed: int, salt: str, groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (kept, held out), holding out `fraction` of every class.

    Per class with n items, round(fraction * n) items are held out, clipped to [1, n - 1] so that both sides
    keep every class that has at least two items (a class with one item stays on the kept side).
    With `groups` (one name per item), whole groups are held out: the groups of a class in a seeded order
    until the class's target is reached (at least one group per class stays kept), so the counts are
    approximate; a group whose items span classes goes by its first item's class. Both outputs are sorted
    positions.
    """
    targets = np.asarray(targets)
    if groups is not None:
        return _grouped_holdout(ids, targets, classes, fraction, seed, salt, list(groups))
    kept: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for index, name in enumerate(classes):
        members = np.flatnonzero(targets == index)
        n = len(members)
        n_held = min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1) if n >= 2 else 0
        order = members[class_permutation([ids[int(m)] for m in members], seed, name, salt)]
        held.append(order[:n_held])
        kept.append(order[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _grouped_holdout(ids: Sequence[str], targets: np.ndarray, classes: Sequence[str], fraction: float,
                     seed: int, salt: str, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if len(groups) != len(ids):
        raise ValueError(f"{len(groups)} groups for {len(ids)} items")
    members: dict[str, list[int]] = {}
    for position, group in enumerate(groups):
        members.setdefault(group, []).append(position)
    held_mask = np.zeros(len(ids), dtype=bool)
    for index, name in enumerate(classes):
        names = [g for g, items in members.items() if targets[items[0]] == index]
        n = sum(len(members[g]) for g in names)
        if len(names) < 2:
            continue  # one group: it stays on the kept side, as a class with one item does
        target = max(int(np.floor(fraction * n + 0.5)), 1)
        held = 0
        for position in class_permutation(names, seed, name, salt)[:-1]:  # the last group always stays kept
            if held >= target:
                break
            held_mask[members[names[int(position)]]] = True
            held += len(members[names[int(position)]])
    return np.flatnonzero(~held_mask), np.flatnonzero(held_mask)


def carve_val(pool: ClassificationDataset, split: Split, fraction: float, seed: int) -> ClassificationDataset:
    """The `split` part ("train" = the rest, "val" = held out) of a seeded stratified val split of `pool`."""
    kept, held = stratified_holdout(pool.ids, pool.targets, pool.classes, fraction, seed, salt="val",
                                    groups=pool.groups)
    if split == "val" and len(held) == 0:
        raise SpecError(f"{pool.name}: no class has two or more training items, so no validation split can "
                        f"be held out of the {len(pool)} training items. Add data, or give an explicit val "
                        "split.")
    part = pool.select(held if split == "val" else kept)
    part.carved_from = pool
    return part


def count_text(values: Sequence[str], limit: int = 5) -> str:
    """"a, b, c, ... (12 in all)": a short, readable sample of offending names for error messages."""
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


_announced: set[str] = set()


def announce_once(message: str) -> None:
    """console.info a message once per process: a loader is opened once per split, the note concerns all."""
    if message not in _announced:
        _announced.add(message)
        console.info(message)
