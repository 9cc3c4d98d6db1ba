"""Nuclei datasets: PanNuke folds, CoNSeP, generic image + instance map folders, and subsets of them.

A *source* is a list of named images with instance maps and optional type maps; `pathssl_cli.segment.patches`
cuts HoVer-Net training patches from sources.
"""

from __future__ import annotations

import abc
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pathssl_cli.errors import Problem, SpecError

PANNUKE_TYPES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
CONSEP_TYPES_4 = ("other", "inflammatory", "epithelial", "spindle")
# HoVer-Net's CoNSeP merge (Graham et al. 2019, Sec. 4.1): 1 other, 2 inflammatory, 3 healthy + 4 dysplastic/
# malignant epithelial -> 3 epithelial, 5 fibroblast + 6 muscle + 7 endothelial -> 4 spindle-shaped.
CONSEP_MERGE_7_TO_4 = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.uint8)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MAP_SUFFIXES = (".npy", ".png", ".tif", ".tiff")


@dataclass
class NucleiSample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    inst_map: np.ndarray  # (H, W) int32, 0 background, ids > 0
    type_map: np.ndarray | None  # (H, W) uint8, 0 background, 1..C


class NucleiSource(abc.ABC):
    """Named images with instance (and optionally type) maps, loaded on demand."""

    names: list[str]
    num_types: int  # 0 when the source has no types

    def __len__(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of image `index` without decoding it."""

    @abc.abstractmethod
    def load(self, index: int) -> NucleiSample:
        """Image `index` with its instance (and type) maps."""


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) from png/jpg/tif."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SpecError(f"{path}: cannot read as an image (expected png, jpg or tif)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label_map(path: Path) -> np.ndarray:
    """An integer label map (H, W) from .npy, .png or .tif (16/32-bit PNG/TIFF keep their ids)."""
    if path.suffix == ".npy":
        array = np.load(path)
    else:
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            import tifffile

            array = tifffile.imread(path)
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., 0]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or np.all(np.mod(array, 1) == 0)):
        raise SpecError(
            f"{path}: expected a 2-D integer instance map, got {array.dtype} of shape {array.shape}"
        )
    return array.astype(np.int32)


class PanNukeFold(NucleiSource):
    """One PanNuke fold: images.npy (N,256,256,3), masks.npy (N,256,256,6), types.npy (N,) tissue names,
    found anywhere under `root` (the official release nests them as `images/fold1/images.npy`). Arrays are
    memory-mapped, so a fold costs no RAM until a sample is read. Nucleus types: 1..5 = mask channels 0..4."""

    num_types = len(PANNUKE_TYPES)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        found = {name: sorted(self.root.rglob(f"{name}.npy")) for name in ("images", "masks", "types")}
        missing = [name for name in ("images", "masks") if not found[name]]
        if missing:
            raise SpecError(
                f"{root}: no {' or '.join(m + '.npy' for m in missing)} found under this PanNuke fold "
                "folder. Point data.train/val/test at a fold folder of the official release."
            )
        self.images = np.load(found["images"][0], mmap_mode="r")
        self.masks = np.load(found["masks"][0], mmap_mode="r")
        self.tissues = np.load(found["types"][0], allow_pickle=False) if found["types"] else None
        if (
            self.images.ndim != 4
            or self.masks.shape[:3] != self.images.shape[:3]
            or self.masks.shape[-1] != 6
        ):
            raise SpecError(
                f"{root}: images.npy {self.images.shape} and masks.npy {self.masks.shape} do not form "
                "a PanNuke fold (expected (N,H,W,3) and (N,H,W,6))"
            )
        self.names = [f"{self.root.name}_{i:05d}" for i in range(len(self.images))]

    def size(self, index: int) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def tissue(self, index: int) -> str | None:
        return None if self.tissues is None else str(self.tissues[index])

    def load(self, index: int) -> NucleiSample:
        image = np.asarray(self.images[index]).astype(np.uint8)  # stored as float64 in the release
        inst, types = pannuke_mask_to_maps(np.asarray(self.masks[index]))
        return NucleiSample(self.names[index], image, inst, types)


def pannuke_mask_to_maps(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 6) PanNuke mask -> (instance map with ids unique across channels, type map 1..5)."""
    inst = np.zeros(mask.shape[:2], np.int32)
    types = np.zeros(mask.shape[:2], np.uint8)
    next_id = 1
    for channel in range(5):
        layer = mask[..., channel].astype(np.int64)
        ids = np.unique(layer[layer > 0])
        if ids.size == 0:
            continue
        lookup = np.zeros(int(ids.max()) + 1, np.int32)
        lookup[ids] = np.arange(next_id, next_id + ids.size, dtype=np.int32)
        hit = layer > 0
        inst[hit] = lookup[layer[hit]]
        types[hit] = channel + 1
        next_id += ids.size
    return inst, types


class ConsepFolder(NucleiSource):
    """CoNSeP layout: `Images/<name>.png` + `Labels/<name>.mat` (inst_map, type_map, inst_type, ...).
    `merge_types` maps the release's 7 types to HoVer-Net's 4; leave it off for data already merged."""

    def __init__(self, root: Path, merge_types: bool) -> None:
        self.root = Path(root)
        self.image_paths = sorted(
            p for p in (self.root / "Images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.image_paths:
            raise SpecError(
                f"{root}: no images in {root / 'Images'}; expected CoNSeP's Images/*.png + Labels/*.mat "
                "(or set data.format to 'generic' or 'pannuke' for those layouts)"
            )
        self.label_paths = [self.root / "Labels" / f"{p.stem}.mat" for p in self.image_paths]
        missing = [p.name for p in self.label_paths if not p.exists()]
        if missing:
            raise SpecError(f"{root / 'Labels'}: missing {len(missing)} label files, e.g. {missing[0]}")
        self.merge_types = merge_types
        self.names = [p.stem for p in self.image_paths]
        self.num_types = 4 if merge_types else 0  # 0 = unknown until read; fixed by the spec's num_types

    def size(self, index: int) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self.image_paths[index]) as im:
            return im.height, im.width

    def load(self, index: int) -> NucleiSample:
        from scipy.io import loadmat

        label = loadmat(self.label_paths[index])
        inst = label["inst_map"].astype(np.int32)
        types = label["type_map"].astype(np.int64) if "type_map" in label else None
        if types is not None and self.merge_types:
            if types.max() > 7:
                raise SpecError(
                    f"{self.label_paths[index]}: type ids up to {types.max()}, but the 7->4 merge "
                    "expects CoNSeP's 1..7"
                )
            types = CONSEP_MERGE_7_TO_4[types]
        return NucleiSample(
            self.names[index],
            read_image(self.image_paths[index]),
            inst,
            None if types is None else types.astype(np.uint8),
        )


class GenericFolder(NucleiSource):
    """`images/<name>.{png,jpg,tif}` + `labels/<name>.{npy,png,tif}` instance maps, optional
    `types/<name>.{npy,png,tif}` type maps (0 background, 1..C)."""

    def __init__(self, root: Path, num_types: int) -> None:
        self.root = Path(root)
        self.image_paths = sorted(
            p for p in (self.root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.image_paths:
            raise SpecError(
                f"{root}: no images in {root / 'images'}; the generic layout is images/<name>.png + "
                "labels/<name>.npy|png|tif (+ optional types/<name>.*)"
            )
        self.label_paths = [_find_map(self.root / "labels", p.stem) for p in self.image_paths]
        missing = [p.name for p, lab in zip(self.image_paths, self.label_paths, strict=False) if lab is None]
        if missing:
            raise SpecError(
                f"{root / 'labels'}: no instance map for {len(missing)} images, e.g. {missing[0]}"
            )
        self.type_paths = [_find_map(self.root / "types", p.stem) for p in self.image_paths]
        self.names = [p.stem for p in self.image_paths]
        self.num_types = num_types

    def size(self, index: int) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self.image_paths[index]) as im:
            return im.height, im.width

    def load(self, index: int) -> NucleiSample:
        label_path = self.label_paths[index]
        assert label_path is not None
        type_path = self.type_paths[index]
        from pathssl_cli.segment.io import read_instance_map

        inst, types = read_instance_map(label_path)  # .npy may hold (H, W, 2) instance + type maps
        if type_path is not None:
            types = read_label_map(type_path)
        return NucleiSample(
            self.names[index],
            read_image(self.image_paths[index]),
            inst.astype(np.int32),
            None if types is None else types.astype(np.uint8),
        )


def _find_map(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in MAP_SUFFIXES if (folder / f"{stem}{s}").exists()), None)


def open_source(
    fmt: str, root: Path, *, merge_consep_types: bool = False, num_types: int = 0
) -> NucleiSource:
    if fmt == "pannuke":
        return PanNukeFold(root)
    if fmt == "consep":
        return ConsepFolder(root, merge_consep_types)
    if fmt == "generic":
        return GenericFolder(root, num_types)
    raise SpecError(f"unknown nuclei data format {fmt!r}; use pannuke, consep or generic")


def read_subset_ids(path: Path) -> set[str]:
    """Image ids from a `pathssl subsample` output, a CSV (column id/name/image/path) or a plain list."""
    try:
        from pathssl_cli.data.subset_files import read_subset

        return {Path(str(item)).stem for item in read_subset(path)}
    except (ImportError, SpecError):
        pass  # not a `pathssl subsample` file (no id header): read it as a plain list
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if lines and "," in lines[0]:
        rows = list(csv.DictReader(lines))
        column = next((c for c in ("id", "name", "image", "path", "file") if rows and c in rows[0]), None)
        if column is None:
            raise SpecError(f"{path}: subset CSV needs an id, name, image or path column")
        return {Path(row[column]).stem for row in rows}
    return {Path(line).stem for line in lines if not line.startswith("#")}


class Subset(NucleiSource):
    """The images of `source` whose names are in `keep` (low-label training on image-level fractions)."""

    def __init__(self, source: NucleiSource, keep: set[str]) -> None:
        self.source = source
        # PanNuke subsets from `pathssl subsample` list array indices rather than names.
        by_index = isinstance(source, PanNukeFold)
        self.indices = [
            i for i, name in enumerate(source.names) if name in keep or (by_index and str(i) in keep)
        ]
        self.names = [source.names[i] for i in self.indices]
        self.num_types = source.num_types

    def size(self, index: int) -> tuple[int, int]:
        return self.source.size(self.indices[index])

    def load(self, index: int) -> NucleiSample:
        return self.source.load(self.indices[index])


def check_sources(fmt: str, roots: Sequence[Path], where: str) -> list[Problem]:
    """Problems opening `roots` as `fmt` sources, for the spec's pre-work checks."""
    problems = []
    for root in roots:
        try:
            open_source(fmt, root, merge_consep_types=False, num_types=0)
        except SpecError as exc:
            problems += [Problem(where, p.message if p.where == "" else str(p)) for p in exc.problems]
    return problems
