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
2. *Rank split*: rank r takes the r-th of world_size contiguous blocks of the sequence, so it reads a few
   shards at a time, as WebDataset splits shards by node (position p mod world_size made every rank touch
   every shard: 0.90 shard opens per tile at 8 ranks, 0.99 at 64). The epoch is padded by wrapping around to
   its start, so that every rank yields the same number of tiles (DDP steps stay in lock-step).
3. *Shuffle buffer* per rank, over tile indices (cheap, so every worker replays it): a buffer of
   `shuffle_buffer` tiles; each incoming tile takes the place of a random one, which is emitted. Each worker
   keeps open as many shards as the buffer spans (`open_shards`), so a shard is opened about once per worker.
4. *Worker split*: the rank stream is cut into chunks of `batch_size`; chunk i goes to DataLoader worker
   i mod num_workers. A DataLoader with that batch size takes batch i from worker i mod num_workers, so it
   yields exactly the rank stream whatever the number of workers, and `skip(n)` resumes exactly.
   Set `persistent_workers=False` (the default) so that workers see `set_epoch` / `skip` calls.

Tiles whose side is not `image_size` are resized (bilinear, antialiased) to it; non-square images give
their central square first. JPEG decoding happens here, on
the CPU worker. Tile stores follow the contract of `pathssl_cli.tiling.store` (Parquet index + tar shards).

Memory: the tiles' locations are flat numpy arrays (`pathssl_cli.data.tile_index`), memory-mapped from a cache
beside the store and built once per process, so a rank and its workers share them (~17 bytes per tile); each
worker holds its rank order (4 bytes per tile of the rank) and reads members by offset. A spawned worker
reopens exactly the index states the main process opened (`tile_index.reopen`), whatever was added since.
"""

from __future__ import annotations

import io
import math
import resource
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pathssl_cli.data.tile_index import (
    IMAGE_SUFFIXES,
    DamagedTile,
    TileArrays,
    TileReader,
    damaged_message,
    mark_pins_used,
    open_sources,
    release_freed_memory,
    reopen,
)

__all__ = ["IMAGE_SUFFIXES", "TileRef", "TileStream", "decode", "first_tile_side", "sample_images"]
_SHUFFLE_CHUNK = 65536  # items per Python-list chunk of the shuffle buffer: fast loop, bounded extra memory


@dataclass(frozen=True)
class TileRef:
    """Where one tile lives: bytes [offset, offset + nbytes) of a shard, or a whole image file (nbytes -1)."""

    path: Path
    offset: int
    nbytes: int
    mpp: float | None
    shard: int  # index of its shard among all shards of the stream


class _Refs(Sequence[TileRef]):
    """`stream.refs[i]`: a TileRef made on demand from the index arrays (none is kept)."""

    def __init__(self, arrays: TileArrays) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index, i = self.arrays, int(i)
        nbytes, offset, shard = int(index.nbytes[i]), int(index.offset[i]), int(index.shard[i])
        path = Path(index.files[offset] if nbytes < 0 else index.shard_paths[shard])
        return TileRef(path, offset, nbytes, index.mpp(i), shard)


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes → uint8 H×W×3 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy refuses read-only arrays


def load_tile(index: TileArrays, i: int, reader: TileReader) -> np.ndarray:
    data = reader.read(i)
    try:
        return decode(data)
    except (OSError, ValueError) as exc:  # PIL raises OSError for truncated and undecodable images
        raise DamagedTile(damaged_message(index, i, f"undecodable image: {exc}")) from None


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
    """indices reordered: their shards in random order, stored order inside a shard.

    `indices` ascend and their shard ids never decrease along them (the index is sorted by shard), so each
    shard is one contiguous block and the blocks are permuted: the same result as sorting by (shard rank,
    index), drawn from the same single permutation, without sorting every tile.
    """
    of = shards[indices]
    if len(of) > 1 and bool((of[1:] < of[:-1]).any()):  # not blocked (a source given twice): sort
        unique = np.unique(of)
        shard_rank = np.zeros(int(unique.max()) + 1, dtype=np.int64)
        shard_rank[unique] = rng.permutation(len(unique))
        return indices[np.lexsort((indices, shard_rank[of]))]
    starts = np.flatnonzero(of[1:] != of[:-1]) + 1
    del of
    starts = np.concatenate(([0], starts))
    lengths = np.diff(np.append(starts, len(indices)))
    blocks = np.argsort(rng.permutation(len(starts)))  # block b has rank perm[b]: emit blocks by rank
    out_starts = np.concatenate(([0], np.cumsum(lengths[blocks])[:-1]))
    dtype = np.int32 if len(indices) < 2**31 else np.int64
    positions = np.arange(len(indices), dtype=dtype)
    np.add(positions, np.repeat((starts[blocks] - out_starts).astype(dtype), lengths[blocks]), out=positions)
    return indices[positions]


def _shuffle_buffer(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of `size` emits `items` (indices only)."""
    if size <= 1 or len(items) <= 1:
        return items.copy()
    out = np.empty_like(items)
    buffer = items[:size].tolist()
    picks = rng.integers(0, len(buffer), size=max(0, len(items) - size))
    for start in range(size, len(items), _SHUFFLE_CHUNK):  # Python ints in chunks: ~3x faster than numpy scalars
        incoming = items[start : start + _SHUFFLE_CHUNK].tolist()
        slots = picks[start - size : start - size + len(incoming)].tolist()
        emitted = []
        for new, slot in zip(incoming, slots, strict=True):
            emitted.append(buffer[slot])
            buffer[slot] = new
        out[start - size : start - size + len(emitted)] = emitted
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
        self._sources = [Path(s) for s in sources]
        self._mpp_weights = mpp_weights
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.batch_size = max(1, batch_size)
        self.epoch = 0
        self._skip = 0
        self._open()

    def _open(self, pins: list[dict] | None = None) -> None:
        # once per process per store state; memory-mapped. A spawned worker reopens the states the main process
        # pinned: the store's newest state may hold parts an array job published since.
        self.index = open_sources(self._sources) if pins is None else reopen(pins)
        self.refs = _Refs(self.index)
        self._groups, self._weights = self._fields_of_view(self._mpp_weights)
        self._open_shards = open_shards(self.shuffle_buffer, self._groups, self.index.shard)

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker reopens the memory maps instead of receiving a pickled copy of them.
        state = {k: v for k, v in self.__dict__.items() if k not in ("index", "refs", "_groups", "_weights")}
        state["_pins"] = self.index.pins
        return state

    def __setstate__(self, state: dict) -> None:
        pins = state.pop("_pins")
        self.__dict__.update(state)
        self._open(pins)

    def _fields_of_view(self, mpp_weights: dict[float, float] | None) -> tuple[list[np.ndarray], np.ndarray]:
        dtype = np.int32 if len(self.index) < 2**31 else np.int64
        if not mpp_weights:
            return [np.arange(len(self.index), dtype=dtype)], np.ones(1)
        index = self.index
        present = sorted(index.mpps)
        groups, weights = [], []
        for mpp, weight in sorted(mpp_weights.items()):
            wanted = round(float(mpp), 4)
            code = present.index(wanted) if wanted in present else -1
            members = np.flatnonzero(index.level == code).astype(dtype) if code >= 0 else np.empty(0, dtype)
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
        """Tile indices (into `self.index` / `self.refs`) of the whole epoch, before the rank split."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x7153])
        if len(self._groups) == 1:
            return _shard_ordered(self._groups[0], self.index.shard, rng)
        total = self.epoch_length()
        level_of = rng.choice(len(self._groups), size=total, p=self._weights / self._weights.sum())
        order = np.empty(total, dtype=self._groups[0].dtype)
        for level, group in enumerate(self._groups):
            positions = np.flatnonzero(level_of == level)
            if len(positions) == 0:
                continue
            passes = [
                _shard_ordered(group, self.index.shard, rng) for _ in range(-(-len(positions) // len(group)))
            ]
            order[positions] = np.concatenate(passes)[: len(positions)]
        return order

    def rank_order(self) -> np.ndarray:
        """This rank's tile indices for the epoch: its contiguous block (the epoch padded by wrapping around to
        its start), then the shuffle buffer."""
        order = self.global_order()
        per_rank = -(-len(order) // self.world_size)
        start = self.rank * per_rank
        mine = order[start : start + per_rank]
        if len(mine) < per_rank:  # the last ranks' blocks run past the end: they continue from the start
            mine = np.concatenate([mine, np.resize(order, per_rank - len(mine))])
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0xB0F])
        return _shuffle_buffer(mine, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mark_pins_used(self.index.pins)  # this job still maps these index states: no prune may remove them
        order = self.rank_order()
        release_freed_memory()  # the order's temporaries: several times its size, freed but kept by malloc
        reader = TileReader(self.index, max_open=self._open_shards)
        try:
            for position in range(self._skip, len(order)):
                # batches are counted from the skip point: a resumed DataLoader again asks worker 0 first
                if ((position - self._skip) // self.batch_size) % workers != worker:
                    continue
                yield _to_tensor(load_tile(self.index, int(order[position]), reader), self.image_size)
        finally:
            reader.close()


def open_shards(shuffle_buffer: int, groups: list[np.ndarray], shard: np.ndarray) -> int:
    """Shard files a worker keeps open: as many as the shuffle buffer spans, so each is opened about once.

    A tile that entered the buffer k tiles ago is still there with probability (1 - 1/B)^k ≈ exp(-k/B), so of
    the shard that entered j shards of T tiles ago about B·(1 - exp(-T/B))·exp(-jT/B) tiles remain: more than
    1/20 while j ≤ (B/T)·ln(20·B·(1 - exp(-T/B))) (a simulation of the LRU at B = 10,000, T = 2,000 gives
    1.2 opens per shard at that size, 6 at half of it). Each weighted field of view is its own interleaved
    sequence of shards. Bounded by a quarter of the process's file-descriptor limit.
    """
    total = 0
    for group in groups:
        if len(group) == 0:
            continue
        in_group = shard[group]
        shards = 1 + int(np.count_nonzero(in_group[1:] != in_group[:-1]))  # blocks: the index is shard-sorted
        per_shard = len(group) / shards
        remaining = 20 * shuffle_buffer * -math.expm1(-per_shard / shuffle_buffer)
        total += math.ceil(shuffle_buffer / per_shard * math.log(max(remaining, 2.0))) + 4
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 1024 if soft == resource.RLIM_INFINITY else max(8, soft // 4)
    return max(8, min(total, limit))


def _load_tiles(index: TileArrays, positions: np.ndarray) -> list[np.ndarray]:
    """The tiles at `positions` of `index` (sorted positions read sequentially), uint8 H×W×3 RGB."""
    reader = TileReader(index)
    try:
        return [load_tile(index, int(i), reader) for i in positions]
    finally:
        reader.close()


def sample_images(sources: Sequence[Path], n: int, seed: int) -> list[np.ndarray]:
    """n tiles drawn uniformly without replacement over all sources (all when fewer), uint8 H×W×3 RGB.

    For fitting stain statistics; tiles keep their stored size.
    """
    index = open_sources([Path(s) for s in sources])  # the same opened index the stream then uses
    rng = np.random.default_rng([seed, 0x5A11])
    return _load_tiles(index, np.sort(rng.choice(len(index), size=min(n, len(index)), replace=False)))


def first_tile_side(sources: Sequence[Path]) -> int:
    """The side (px, the shorter one) of the first tile of the first source in stored order.

    Independent of any seed: `open_sources` orders tiles by source as given, then shard and offset, or path.
    """
    index = open_sources([Path(s) for s in sources])
    if len(index) == 0:
        raise ValueError(f"{sources[0]}: no tiles")
    return int(min(_load_tiles(index, np.zeros(1, np.int64))[0].shape[:2]))
