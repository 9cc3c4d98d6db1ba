"""Pre-training input for the loop: tiles from tile stores or image folders as uint8 (B, 3, S, S) batches.

Adapter used by `pathssl_cli/pretrain.py` until the streaming `pathssl_cli.data.tiles.TileStream` lands: a
map-style dataset over an epoch plan, so a DataLoader with any number of workers yields the same batches in the
same order, and the data position is a pure function of the number of samples consumed (exact resume).

Epoch plan: epoch e is a permutation of all usable tiles drawn from (seed, e) — or, with `mpp_weights`, a
weighted draw with replacement where a field of view's share of the epoch equals its weight — dealt to ranks
round-robin and cut to a whole number of global batches, so every rank makes the same number of steps per epoch.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pathssl_cli.errors import SpecError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class TileRef:
    """One tile: a member of a store's tar shard (`key`) or an image file (`key` empty)."""

    path: str
    key: str
    mpp: float | None


def list_tiles(sources: Sequence[Path]) -> list[TileRef]:
    """Every tile of the given stores (manifest.csv present) and image folders, in a stable order."""
    from pathssl_cli.tiling.store import read_manifest

    tiles: list[TileRef] = []
    for source in sources:
        source = Path(source)
        if (source / "manifest.csv").exists() or (source / "parts").is_dir():
            tiles += [TileRef(str(source / row["shard"]), row["key"], float(row["mpp"]))
                      for row in read_manifest(source)]
        elif source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            tiles += [TileRef(str(p), "", None) for p in files]
        else:
            raise SpecError(f"data.tiles: {source} is neither a tile store (no manifest.csv) nor a folder of "
                            "images. Give the output dir of `pathssl tile` or a folder of image files.")
    return tiles


def _select(tiles: list[TileRef], mpp_weights: dict[str, float]) -> tuple[list[TileRef], np.ndarray | None]:
    """Tiles at the weighted fields of view and each tile's draw probability (None = uniform permutation)."""
    if not mpp_weights:
        return tiles, None
    weights = {round(float(k), 4): w for k, w in mpp_weights.items() if w > 0}
    chosen = [t for t in tiles if t.mpp is not None and round(t.mpp, 4) in weights]
    if not chosen:
        found = sorted({t.mpp for t in tiles if t.mpp is not None})
        raise SpecError(f"data.mpp_weights: no tile at {sorted(weights)} µm/px; the stores hold {found}")
    counts: dict[float, int] = {}
    for t in chosen:
        counts[round(t.mpp, 4)] = counts.get(round(t.mpp, 4), 0) + 1  # type: ignore[arg-type]
    total = sum(weights[m] for m in counts)
    probability = np.array([weights[round(t.mpp, 4)] / total / counts[round(t.mpp, 4)]  # type: ignore[arg-type]
                            for t in chosen])
    return chosen, probability / probability.sum()


def count_tiles(sources: Sequence[Path], mpp_weights: dict[str, float]) -> int:
    """Tiles in one epoch."""
    return len(_select(list_tiles(sources), mpp_weights)[0])


def epoch_plan(n: int, probability: np.ndarray | None, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if probability is None:
        return torch.randperm(n, generator=generator).numpy()
    return torch.multinomial(torch.from_numpy(probability), n, replacement=True, generator=generator).numpy()


class _Decoder:
    """Reads and decodes tiles; each DataLoader worker keeps its own open tar files."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def __call__(self, tile: TileRef) -> np.ndarray:
        if tile.key:
            if tile.path not in self._tars:
                tar = tarfile.open(tile.path, "r:")
                self._tars[tile.path] = (tar, {m.name: m for m in tar.getmembers()})
            tar, members = self._tars[tile.path]
            member = members.get(f"{tile.key}.jpg")
            if member is None:
                raise OSError(f"{tile.path}: tile {tile.key} listed in the manifest is missing from the shard")
            image = Image.open(io.BytesIO(tar.extractfile(member).read()))  # type: ignore[union-attr]
        else:
            image = Image.open(tile.path)
        image = image.convert("RGB")
        if self.size is not None and image.size != (self.size, self.size):
            side = min(image.size)  # centre square, then the common size
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _tile_size(tiles: list[TileRef]) -> int:
    first = _Decoder(None)(tiles[0])
    return int(min(first.shape[:2]))


class _EpochSlice(torch.utils.data.Dataset):
    def __init__(self, tiles: list[TileRef], indices: np.ndarray, size: int) -> None:
        self.tiles, self.indices, self.decode = tiles, indices, _Decoder(size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.decode(self.tiles[int(self.indices[i])])).permute(2, 0, 1).contiguous()


class TileBatches(Iterator[torch.Tensor]):
    """Endless uint8 (batch_size, 3, S, S) batches for one rank, starting after `start_sample` of its samples."""

    def __init__(self, data: Any, *, rank: int, world_size: int, batch_size: int, seed: int,
                 start_sample: int = 0) -> None:
        tiles, self.probability = _select(list_tiles(data.tiles), data.mpp_weights)
        self.tiles, self.rank, self.world, self.batch, self.seed = tiles, rank, world_size, batch_size, seed
        self.workers = data.workers
        self.size = _tile_size(tiles)
        self.per_rank_epoch = (len(tiles) // (batch_size * world_size)) * batch_size
        if self.per_rank_epoch == 0:
            raise SpecError(f"data.tiles hold {len(tiles)} tiles, fewer than one global batch")
        self.epoch, offset = divmod(start_sample, self.per_rank_epoch)
        self._iterator = self._open(self.epoch, offset)

    def _open(self, epoch: int, offset: int) -> Iterator[torch.Tensor]:
        plan = epoch_plan(len(self.tiles), self.probability, self.seed, epoch)
        mine = plan[self.rank::self.world][: self.per_rank_epoch][offset:]
        loader = torch.utils.data.DataLoader(_EpochSlice(self.tiles, mine, self.size), batch_size=self.batch,
                                             shuffle=False, drop_last=True, num_workers=self.workers,
                                             persistent_workers=False)
        return iter(loader)

    def __next__(self) -> torch.Tensor:
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._iterator = self._open(self.epoch, 0)
            return next(self._iterator)


def fit_stain_from_tiles(data: Any, n_tiles: int, space: str, distribution: str, seed: int) -> Any:
    """RandStainNA statistics fitted on `n_tiles` tiles drawn with `seed` (the same sample on every rank)."""
    from pathssl_cli.augment.stain import fit_stain_stats

    tiles, _ = _select(list_tiles(data.tiles), data.mpp_weights)
    decode = _Decoder(None)
    sample = epoch_plan(len(tiles), None, seed + 7, 0)[:n_tiles]
    return fit_stain_stats((decode(tiles[int(i)]) for i in sample), space, distribution,  # type: ignore[arg-type]
                           seed=seed)
