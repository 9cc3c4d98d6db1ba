"""Nuclei datasets (PanNuke folds, CoNSeP, generic image + instance map folders) and HoVer-Net patches.

A *source* is a list of named images with instance maps and optional type maps; `HoVerNetPatches` cuts
input-size patches from sources, augments them and builds the HoVer-Net targets (NP, HV, TP) on the centre
output-size window, as HoVer-Net's loader does (targets computed on the whole input patch, then cropped, so a
nucleus cut by the output border keeps the centroid of its visible part in the input patch).
"""

from __future__ import annotations

import abc
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pathssl_cli.augment.stain import hed_jitter_image
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
        from pathssl_cli.data.subsample import read_subset  # type: ignore[attr-defined]

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


# ------------------------------------------------------------------------------------------------- patches
@dataclass(frozen=True)
class AugmentConfig:
    flips: bool = True
    rotations: bool = True
    stain: float = 0.0  # HED jitter σ (0 = off), see `pathssl_cli.augment.stain.hed_jitter_image`
    # HoVer-Net's own augmentations (`pathssl_cli.augment.nuclei`): affine + flips on image and maps, then
    # blur/noise and colour jitter; they replace `flips`/`rotations` (the affine rotation covers them).
    hovernet: bool = False


def _pad_to(array: np.ndarray, top: int, left: int, height: int, width: int, reflect: bool) -> np.ndarray:
    """The window [top:top+height, left:left+width] of `array`, padded where it leaves the array."""
    h, w = array.shape[:2]
    t, b = min(max(top, 0), h), min(max(top + height, 0), h)
    l_, r = min(max(left, 0), w), min(max(left + width, 0), w)
    if b <= t or r <= l_:  # wholly off the array: nothing to mirror
        return np.zeros((height, width, *array.shape[2:]), array.dtype)
    pads = ((t - top, top + height - b), (l_ - left, left + width - r))
    window = array[t:b, l_:r]
    if any(p for pair in pads for p in pair):
        extra = ((0, 0),) * (array.ndim - 2)
        window = np.pad(
            window, pads + extra, mode="reflect" if reflect and min(window.shape[:2]) > 1 else "constant"
        )
    return window


class HoVerNetPatches(Dataset):
    """Input-size patches with HoVer-Net targets. Each image gives ceil(H/out) x ceil(W/out) patches on a
    grid of output windows (the tiling inference uses too); training jitters each window by up to half a step.

    Item: {"image": (3, in, in) float [0, 1], "np": (out, out) int64, "hv": (2, out, out) float32,
    "tp": (out, out) int64 (when typed)}.

    `target_context` (px, dihedral/no augmentation only): the label maps are read this much wider than the
    input on every side and the HV targets computed there before the crop, so a nucleus cut by the patch
    border gets the HV map of its whole shape, as HoVer-Net's own targets do (computed on the 270 px input,
    cropped to the 80 px output). In mode 'same' (input = output) with 0, the default, a cut nucleus is
    centred on its visible part, so two overlapping patches disagree about its centre.
    """

    def __init__(
        self,
        sources: Sequence[NucleiSource],
        input_size: int,
        output_size: int,
        *,
        train: bool,
        augment: AugmentConfig = AugmentConfig(),
        typed: bool = False,
        seed: int = 0,
        target_context: int = 0,
    ) -> None:
        if target_context < 0:
            raise ValueError(f"target_context must be >= 0, got {target_context}")
        if target_context and augment.hovernet:
            raise ValueError("target_context needs dihedral (or no) augmentation: the affine warp crops maps "
                             "to the input size")
        self.target_context = target_context
        self.sources = list(sources)
        self.input_size, self.output_size = input_size, output_size
        self.train, self.augment, self.typed, self.seed = train, augment, typed, seed
        self.epoch = 0
        self.items: list[tuple[int, int, int, int]] = []  # (source, image, top, left) of the output window
        for s, source in enumerate(self.sources):
            for i in range(len(source)):
                h, w = source.size(i)
                for top in range(0, max(h - output_size, 0) + output_size, output_size):
                    for left in range(0, max(w - output_size, 0) + output_size, output_size):
                        if top < h and left < w:
                            self.items.append((s, i, top, left))

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from pathssl_cli.segment.targets import hv_map

        s, i, top, left = self.items[index]
        sample = self.sources[s].load(i)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.train:
            jitter = self.output_size // 2
            # Jitter, but keep the output window on the image: a window off the image has nothing to learn.
            h, w = self.sources[s].size(i)
            top = int(np.clip(top + rng.integers(-jitter, jitter + 1), 0, max(h - self.output_size, 0)))
            left = int(np.clip(left + rng.integers(-jitter, jitter + 1), 0, max(w - self.output_size, 0)))
        margin = (self.input_size - self.output_size) // 2
        cut = self.input_size
        if self.train and self.augment.hovernet:
            from pathssl_cli.augment.nuclei import context_size

            cut = context_size(self.input_size)  # centred on the same window, cropped back by the affine
        extra = (cut - self.input_size) // 2
        args = (top - margin - extra, left - margin - extra, cut, cut)
        image = _pad_to(sample.image, *args, reflect=True)
        # Maps are mirrored with the image (HoVer-Net's mirror-padded patch extraction), so mirrored
        # nuclei keep their labels; a nucleus and its mirror form one piece, as the official targets see it.
        ctx = self.target_context  # the maps' extra px per side; dihedral poses keep them centred
        map_args = (args[0] - ctx, args[1] - ctx, cut + 2 * ctx, cut + 2 * ctx)
        inst = _pad_to(sample.inst_map, *map_args, reflect=True)
        types = _pad_to(sample.type_map, *map_args, reflect=True) if sample.type_map is not None else None
        if self.train:
            image, inst, types = self._augment(image, inst, types, rng)
        hv = hv_map(np.ascontiguousarray(inst))
        window = slice(ctx + margin, ctx + margin + self.output_size)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0),
            "np": torch.from_numpy((inst[window, window] > 0).astype(np.int64)),
            "hv": torch.from_numpy(np.ascontiguousarray(hv[:, window, window]).astype(np.float32)),
        }
        if self.typed:
            tp = types[window, window] if types is not None else (inst[window, window] > 0).astype(np.uint8)
            item["tp"] = torch.from_numpy(tp.astype(np.int64))
        return item

    def _augment(
        self, image: np.ndarray, inst: np.ndarray, types: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        # Geometric ops move maps with the image; HV targets are computed after, so they stay exact.
        if self.augment.hovernet:
            from pathssl_cli.augment import nuclei

            image, maps = nuclei.geometric(image, [inst] + ([types] if types is not None else []),
                                           self.input_size, rng)
            image = nuclei.photometric(image, rng)
            if self.augment.stain > 0:
                image = hed_jitter_image(image, self.augment.stain, rng)
            return image, maps[0], (maps[1].astype(np.uint8) if types is not None else None)
        arrays = [image, inst] + ([types] if types is not None else [])
        if self.augment.rotations:
            k = int(rng.integers(4))
            arrays = [np.rot90(a, k) for a in arrays]
        if self.augment.flips and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        image = np.ascontiguousarray(arrays[0])
        if self.augment.stain > 0:
            image = hed_jitter_image(image, self.augment.stain, rng)  # the one HED jitter, β in OD
        return (
            image,
            np.ascontiguousarray(arrays[1]),
            np.ascontiguousarray(arrays[2]) if types is not None else None,
        )


def check_sources(fmt: str, roots: Sequence[Path], where: str) -> list[Problem]:
    """Problems opening `roots` as `fmt` sources, for the spec's pre-work checks."""
    problems = []
    for root in roots:
        try:
            open_source(fmt, root, merge_consep_types=False, num_types=0)
        except SpecError as exc:
            problems += [Problem(where, p.message if p.where == "" else str(p)) for p in exc.problems]
    return problems
