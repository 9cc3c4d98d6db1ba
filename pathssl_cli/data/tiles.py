"""The pretraining data stream: tiles of tile stores and image folders, split by rank and worker.

    stream = TileStream([store_dir, image_folder], image_size=224, mpp_weights={0.25: 1, 0.5: 1}, seed=0,
                        shuffle_buffer=10_000, rank=rank, world_size=world, batch_size=per_rank_batch)
    stream.set_epoch(epoch); stream.skip(samples_already_seen_this_epoch)     # set_epoch first: it
    clears skip
    loader = DataLoader(stream, batch_size=per_rank_batch, num_workers=4)     # yields uint8 (B, 3, S, S)

How one epoch is ordered (every step is a pure function of seed, epoch and rank, so it is reproducible and
decoding is the only work a worker does):

1. *Global sequence*: the tiles of every source grouped in shards (a store's tar shard; an image folder
   counts as one shard per 256 files), shards in a seeded random order, tiles in stored order inside a
   shard, so reads stay sequential. With `mpp_weights` each field of view (a store's mpp level) is its own
   sequence, and every position of the epoch draws its level with probability proportional to its weight
   (Kang et al.'s multi-FoV technique); a level that runs out starts again in a new order.
   The epoch has as many tiles as the weighted levels hold.
2. *Rank split*: position p goes to rank p mod world_size; shorter ranks wrap around to the start so that
   every rank yields the same number of tiles (DDP steps stay in lock-step), as DistributedSampler does.
3. *Shuffle buffer* per rank, over tile indices (cheap, so every worker replays it): a buffer of
   `shuffle_buffer` tiles; each incoming tile takes the place of a random one, which is emitted.
4. *Worker split*: the rank stream is cut into chunks of `batch_size`; chunk i goes to DataLoader worker
   i mod num_workers. A DataLoader with that batch size takes batch i from worker i mod num_workers, so it
   yields exactly the rank stream whatever the number of workers, and `skip(n)` resumes exactly.
   Set `persistent_workers=False` (the default) so that workers see `set_epoch` / `skip` calls.

Tiles whose side is not `image_size` are resized (bilinear, antialiased) to it; non-square images give
their central square first. JPEG decoding happens here, on
the CPU worker. Tile stores follow the contract of `pathssl_cli.tiling.store` (manifest + tar shards).
"""

from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from pathssl_cli.errors import WorkFailed
from pathssl_cli.tiling.store import read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_FOLDER_SHARD = 256  # files per pseudo-shard of an image folder: only affects the order's locality


@dataclass(frozen=True)
class TileRef:
    """Where one tile lives: a member of a tar shard (member set) or a plain image file (member None)."""

    path: Path
    member: str | None
    mpp: float | None
    shard: int  # index of its shard among all shards of the stream


def _is_store(path: Path) -> bool:
    return (path / "manifest.csv").exists() or (path / "parts").is_dir()


def index_sources(sources: Sequence[Path]) -> list[TileRef]:
    """Every tile of every source in a fixed order: sources as given, then shard and key, or file path."""
    refs: list[TileRef] = []
    shard_ids: dict[Path, int] = {}
    for source in map(Path, sources):
        if not source.is_dir():
            raise FileNotFoundError(
                f"{source}: tile source not found (a tile store folder or an image folder)"
            )
        if _is_store(source):
            for row in read_manifest(source):
                shard_path = source / row["shard"]
                shard = shard_ids.setdefault(shard_path, len(shard_ids))
                refs.append(TileRef(shard_path, f"{row['key']}.jpg", float(row["mpp"]), shard))
        else:
            files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise FileNotFoundError(
                    f"{source}: neither a tile store (manifest.csv) nor a folder with images "
                    f"({', '.join(IMAGE_SUFFIXES)})"
                )
            for position, file in enumerate(files):
                pseudo_shard = source / f"#folder-{position // _FOLDER_SHARD}"
                shard = shard_ids.setdefault(pseudo_shard, len(shard_ids))
                refs.append(TileRef(file, None, None, shard))
    if not refs:
        raise FileNotFoundError(f"no tiles in {', '.join(map(str, sources))}")
    return refs


class _ShardReader:
    """Random access to tar members by name: one member index per shard, a few open files (LRU)."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self.indexes: dict[Path, dict[str, tuple[int, int]]] = {}
        self.files: OrderedDict[Path, BinaryIO] = OrderedDict()

    def read(self, path: Path, member: str) -> bytes:
        if path not in self.indexes:
            with tarfile.open(path, "r:") as tar:
                self.indexes[path] = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        offset, size = self.indexes[path][member]
        handle = self.files.pop(path, None) or open(path, "rb")
        self.files[path] = handle
        while len(self.files) > self.max_open:
            self.files.popitem(last=False)[1].close()
        handle.seek(offset)
        return handle.read(size)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes → uint8 H×W×3 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy refuses read-only arrays


def load_tile(ref: TileRef, reader: _ShardReader) -> np.ndarray:
    where = str(ref.path) if ref.member is None else f"{ref.path} (member {ref.member})"
    try:
        data = ref.path.read_bytes() if ref.member is None else reader.read(ref.path, ref.member)
        return decode(data)
    except (OSError, ValueError) as exc:  # PIL raises OSError for truncated and undecodable images
        raise WorkFailed(f"{where}: cannot read this image ({exc}). Remove or replace it, or re-run "
                         "`pathssl tile` for a damaged store.") from None


def _to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    height, width = image.shape[:2]
    if height != width:  # a non-square image gives its central square: resizing it would distort cells
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = np.ascontiguousarray(image[top : top + side, left : left + side])
    if image.shape[0] != size:
        image = np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _shard_ordered(indices: np.ndarray, shards: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """indices reordered: their shards in random order, stored order inside a shard."""
    unique = np.unique(shards[indices])
    shard_rank = np.zeros(int(unique.max()) + 1, dtype=np.int64)
    shard_rank[unique] = rng.permutation(len(unique))
    return indices[np.lexsort((indices, shard_rank[shards[indices]]))]


def _shuffle_buffer(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of `size` emits `items` (indices only)."""
    if size <= 1 or len(items) <= 1:
        return items.copy()
    out = np.empty_like(items)
    buffer = list(items[:size])
    picks = rng.integers(0, len(buffer), size=max(0, len(items) - size))
    for emitted, (incoming, slot) in enumerate(zip(items[size:], picks, strict=True)):
        out[emitted] = buffer[slot]
        buffer[slot] = incoming
    tail = np.asarray(buffer, dtype=items.dtype)
    out[len(items) - len(buffer) :] = tail[rng.permutation(len(tail))]
    return out


class TileStream(torch.utils.data.IterableDataset):
    """uint8 (3, image_size, image_size) tiles, one epoch per iteration (see the module docstring).

    `batch_size` (beyond the shared contract, optional): the DataLoader's per-rank batch size, so the worker
    split reproduces the rank stream exactly; with the default 1 a multi-worker loader still yields every
    tile of
    the rank once per epoch, but in an order that depends on the number of workers.
    """

    def __init__(
        self,
        sources: list[Path],
        *,
        image_size: int,
        mpp_weights: dict[float, float] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.refs = index_sources(sources)
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.batch_size = max(1, batch_size)
        self.epoch = 0
        self._skip = 0
        self._shards = np.array([ref.shard for ref in self.refs], dtype=np.int64)
        self._groups, self._weights = self._fields_of_view(mpp_weights)

    def _fields_of_view(self, mpp_weights: dict[float, float] | None) -> tuple[list[np.ndarray], np.ndarray]:
        everything = np.arange(len(self.refs))
        if not mpp_weights:
            return [everything], np.ones(1)
        levels = np.array([np.nan if ref.mpp is None else round(ref.mpp, 4) for ref in self.refs])
        present = sorted({float(v) for v in levels if not np.isnan(v)})
        groups, weights = [], []
        for mpp, weight in sorted(mpp_weights.items()):
            members = everything[levels == round(float(mpp), 4)]
            if weight > 0 and len(members) == 0:
                raise ValueError(
                    f"mpp_weights asks for {mpp} µm/px but no tile has that field of view; levels present: "
                    f"{present or 'none (image folders carry no mpp)'}"
                )
            if weight > 0:
                groups.append(members)
                weights.append(float(weight))
        if not groups:
            raise ValueError("mpp_weights gives every field of view weight 0; give one a positive weight")
        return groups, np.asarray(weights)

    # ------------------------------------------------------------------------------------------ public API
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows; clears any `skip`."""
        self.epoch = int(epoch)
        self._skip = 0

    def skip(self, n: int) -> None:
        """Start the next iteration at the n-th tile of this rank's stream of the current epoch (resume)."""
        self._skip = max(0, int(n))

    def __len__(self) -> int:
        """Tiles per rank per epoch."""
        return -(-self.epoch_length() // self.world_size)

    def epoch_length(self) -> int:
        """Tiles per epoch over all ranks (before the wrap-around padding)."""
        return int(sum(len(group) for group in self._groups))

    def global_order(self) -> np.ndarray:
        """Tile indices (into `self.refs`) of the whole epoch, before the rank split."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x7153])
        if len(self._groups) == 1:
            return _shard_ordered(self._groups[0], self._shards, rng)
        total = self.epoch_length()
        level_of = rng.choice(len(self._groups), size=total, p=self._weights / self._weights.sum())
        order = np.empty(total, dtype=np.int64)
        for level, group in enumerate(self._groups):
            positions = np.flatnonzero(level_of == level)
            if len(positions) == 0:
                continue
            passes = [
                _shard_ordered(group, self._shards, rng) for _ in range(-(-len(positions) // len(group)))
            ]
            order[positions] = np.concatenate(passes)[: len(positions)]
        return order

    def rank_order(self) -> np.ndarray:
        """This rank's tile indices for the epoch: rank split (with wrap-around), then the shuffle buffer."""
        order = self.global_order()
        per_rank = -(-len(order) // self.world_size)
        mine = np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0xB0F])
        return _shuffle_buffer(mine, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = self.rank_order()
        reader = _ShardReader()
        try:
            for position in range(self._skip, len(order)):
                # batches are counted from the skip point: a resumed DataLoader again asks worker 0 first
                if ((position - self._skip) // self.batch_size) % workers != worker:
                    continue
                yield _to_tensor(load_tile(self.refs[order[position]], reader), self.image_size)
        finally:
            reader.close()


def sample_images(sources: Sequence[Path], n: int, seed: int) -> list[np.ndarray]:
    """n tiles drawn uniformly without replacement over all sources (all when fewer), uint8 H×W×3 RGB.

    For fitting stain statistics; tiles keep their stored size.
    """
    refs = index_sources([Path(s) for s in sources])
    rng = np.random.default_rng([seed, 0x5A11])
    chosen = np.sort(rng.choice(len(refs), size=min(n, len(refs)), replace=False))  # sorted: sequential reads
    reader = _ShardReader()
    try:
        return [load_tile(refs[i], reader) for i in chosen]
    finally:
        reader.close()
