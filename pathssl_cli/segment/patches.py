"""HoVer-Net training patches: input-size windows cut from nuclei sources, augmented, with the NP, HV and TP
targets built on the centre output-size window, as HoVer-Net's loader does (targets computed on the whole input
patch, then cropped, so a nucleus cut by the output border keeps the centroid of its visible part in the input
patch; `target_context` widens that to labels beyond the input).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pathssl_cli.augment.stain import hed_jitter_image
from pathssl_cli.segment.datasets import NucleiSample, NucleiSource


@dataclass(frozen=True)
class AugmentConfig:
    flips: bool = True
    rotations: bool = True
    stain: float = 0.0  # HED jitter σ (0 = off), see `pathssl_cli.augment.stain.hed_jitter_image`
    # HoVer-Net's own augmentations (`pathssl_cli.augment.nuclei`): affine + flips on image and maps, then
    # blur/noise and colour jitter; they replace `flips`/`rotations` (the affine rotation covers them).
    hovernet: bool = False


def pad_to(array: np.ndarray, top: int, left: int, height: int, width: int, reflect: bool) -> np.ndarray:
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


def _writable(window: np.ndarray) -> np.ndarray:
    """`window` itself, or a copy when it is a view of a (read-only) cached image."""
    return window if window.flags.writeable else window.copy()


class DecodedImageCache:
    """Least-recently-used decoded samples, bounded in bytes, so the several patches cut from one image per
    epoch decode it once (CoNSeP's PNG + .mat cost 3.5 ms of the 6 ms a 128 px training patch takes). The
    bound keeps memory flat in the dataset's size; each DataLoader worker holds its own cache, so the total
    is workers x budget. Cached arrays are read-only: an in-place edit downstream fails loudly instead of
    corrupting every later patch of that image."""

    def __init__(self, sources: Sequence[NucleiSource], budget_bytes: int) -> None:
        self.sources = sources
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._samples: OrderedDict[tuple[int, int], NucleiSample] = OrderedDict()

    def get(self, source: int, index: int) -> NucleiSample:
        """Image `index` of `sources[source]`, decoded at most once while it stays in the budget."""
        key = (source, index)
        if key in self._samples:
            self._samples.move_to_end(key)
            return self._samples[key]
        sample = self.sources[source].load(index)
        if _arrays_nbytes(sample) > self.budget_bytes:
            return sample
        for array in _arrays(sample):
            array.flags.writeable = False
        self._samples[key] = sample
        self.bytes += _arrays_nbytes(sample)
        while self.bytes > self.budget_bytes:
            _, old = self._samples.popitem(last=False)
            self.bytes -= _arrays_nbytes(old)
        return sample


def _arrays(sample: NucleiSample) -> list[np.ndarray]:
    return [a for a in (sample.image, sample.inst_map, sample.type_map) if a is not None]


def _arrays_nbytes(sample: NucleiSample) -> int:
    return sum(a.nbytes for a in _arrays(sample))


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

    `cache_mb`: bound of the decoded-image cache (`DecodedImageCache`) per process; 0 = decode every time.
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
        cache_mb: float = 256,
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
        self.cache = DecodedImageCache(self.sources, int(cache_mb * 2**20))

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from pathssl_cli.segment.targets import hv_map

        s, i, top, left = self.items[index]
        sample = self.cache.get(s, i)
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
        image = _writable(pad_to(sample.image, *args, reflect=True))
        # Maps are mirrored with the image (HoVer-Net's mirror-padded patch extraction), so mirrored
        # nuclei keep their labels; a nucleus and its mirror form one piece, as the official targets see it.
        ctx = self.target_context  # the maps' extra px per side; dihedral poses keep them centred
        map_args = (args[0] - ctx, args[1] - ctx, cut + 2 * ctx, cut + 2 * ctx)
        inst = _writable(pad_to(sample.inst_map, *map_args, reflect=True))
        types = None if sample.type_map is None else _writable(pad_to(sample.type_map, *map_args, reflect=True))
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
