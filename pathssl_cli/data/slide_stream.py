"""Pre-training patches cut on the fly from whole slides: random positions in tissue, random fields of view.

    index = open_slide_index(slides, coords_dir, CoordSettings())          # pathssl_cli.data.slide_index
    stream = SlideStream(index, size=224, mpp=MppSampling(values=[0.25, 0.5, 1.0]), seed=0, rank=rank,
                         world_size=world, batch_size=per_rank_batch)
    stream.set_epoch(epoch); stream.skip(samples_already_seen_this_epoch)
    loader = DataLoader(stream, batch_size=per_rank_batch, num_workers=4)   # uint8 (B, 3, size, size)

How an epoch is planned (a pure function of seed, epoch and rank: nothing to checkpoint but the step):

1. *Length*: the tissue's area over the expected patch area (size² × E[mpp²]), so an epoch covers the tissue
   about once, as a tile store at that field of view would (at least one batch per rank); every rank yields
   ceil(length / world_size).
2. *Slides per rank*: the usable slides in a seeded order, cut into world_size contiguous runs of about equal
   tissue area, so ranks read disjoint slides (with fewer slides than ranks every rank reads every slide, at
   positions drawn from its own seeds).
3. *Visits*: the rank's samples come in visits of `patches_per_visit` consecutive samples from one slide. Each
   slide gets visits in proportion to its tissue area; the visits are dealt over `pool` lanes of consecutive
   slides and taken round-robin across the lanes, so `pool` slides are in use at a time (a batch mixes them)
   and a worker that keeps `pool` slides open opens each about once per epoch.
4. *Sample i* of the rank: visit i // patches_per_visit, draw i % patches_per_visit of it, whose field of view,
   tissue cell (in proportion to its tissue fraction) and position inside the cell come from a generator seeded
   with (seed, epoch, rank, visit). The field of view is drawn from those the slide can give (`pathssl tile`'s
   rule: no upsampling beyond its finest level), read from the coarsest pyramid level at least that fine,
   then resized (area) to `size`. Where that level is JPEG and the patch is 2, 4 or 8 times coarser (a 40x
   scan with levels 4x apart read at 20x, a single-level slide), its tiles are decoded at that scale by
   libjpeg's scaled IDCT (within a grey level on average of decoding in full and area-resizing, at a
   fraction of the cost). A patch whose own pixels are less than `min_tissue` tissue (the detector's
   saturation threshold for that slide) is replaced by the next of `max_tries` positions; after that the most
   tissue-rich of them is kept, so the sample count never changes.
5. *Worker split* as in `pathssl_cli.data.tiles`: chunk c of `batch_size` samples goes to worker c mod
   num_workers, so the rank's sequence is the same for any number of workers and `skip(n)` resumes exactly.

A slide that fails mid-run (vanished, truncated) is recorded in `bad_slides_log` (one line per slide and
process) and its samples come from the next slides of the rank's run, deterministically; slides that could not
be indexed are listed in `index.bad`. Workers keep decoded internal tiles of the slides in a bounded cache
(`cache_mb`), so nearby patches of a visit decode each tile once.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pathssl_cli.data.fields_of_view import MppSampling
from pathssl_cli.data.slide_arrays import SlideArrays, reopen_slide_index
from pathssl_cli.data.slide_index import GRID_UM
from pathssl_cli.errors import WorkFailed
from pathssl_cli.tiling.slide import LevelReader, SlideError, choose_level, open_slide

__all__ = ["FIT_EPOCH", "MppSampling", "SlideStream", "patch_tissue_fraction"]
_EPOCH_TAG, _VISIT_TAG = 0x511DE, 0x9A7C
#: The generator "epoch" of the patches sampled to fit stain statistics: no training epoch reaches it.
FIT_EPOCH = 2**40


class _TileCache:
    """Decoded internal tiles of every open slide of a worker, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        found = self.tiles.get(key)
        if found is not None:
            self.tiles.move_to_end(key)
        return found

    def put(self, key: tuple, tile: np.ndarray) -> None:
        self.tiles[key] = tile
        self.bytes += tile.nbytes
        while self.bytes > self.max_bytes and len(self.tiles) > 1:
            self.bytes -= self.tiles.popitem(last=False)[1].nbytes


#: An Adobe APP14 segment saying "no colour transform": Aperio writes RGB-coded JPEG tiles (photometric RGB), which
#: a JPEG decoder would otherwise take for YCbCr.
_ADOBE_RGB = bytes.fromhex("FFEE000E41646F626500640000000000")
_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def dct_reduction(page: Any, ratio: float) -> int:
    """1, 2, 4 or 8: the scale at which libjpeg can decode this level's tiles for a patch `ratio` times coarser
    than the level (a JPEG IDCT at 1/r costs about 1/r² of a full decode and replaces most of the resize)."""
    if (page is None or page.compression != 7 or page.samplesperpixel != 3 or page.planarconfig != 1
            or page.photometric not in (2, 6)):
        return 1
    reduce = 1
    while reduce < 8 and ratio >= 2 * reduce * (1 - 1e-6) and page.tilewidth % (2 * reduce) == 0 \
            and page.tilelength % (2 * reduce) == 0:
        reduce *= 2
    return reduce


class _CachedLevel(LevelReader):
    """A pyramid level read through the worker's shared tile cache instead of the row-band cache of tiling;
    with `reduce` > 1, a JPEG level decoded at 1/reduce scale (a virtual level of its own pixel grid)."""

    def __init__(self, slide: Any, level: int, cache: _TileCache, key: tuple, reduce: int = 1) -> None:
        super().__init__(slide, level)
        self._shared, self._key, self.reduce = cache, key, reduce
        if reduce > 1:
            assert self.page is not None  # dct_reduction is 1 without a tiled JPEG page
            self.tile_h, self.tile_w = self.tile_h // reduce, self.tile_w // reduce
            self.width, self.height = -(-self.width // reduce), -(-self.height // reduce)
            self._prefix = bytes(self.page.jpegtables[:-2]) if self.page.jpegtables else b""
            self._adobe = _ADOBE_RGB if self.page.photometric == 2 else b""

    def _decode(self, row: int, col: int) -> np.ndarray:
        if self.reduce == 1:
            return super()._decode(row, col)
        self.decoded += 1
        data = self.raw_tile(row, col)
        # tables = SOI ... EOI; tile = SOI ... EOI -> SOI [Adobe] tables tile-body: one self-contained stream
        stream = data[:2] + self._adobe + (self._prefix[2:] + data[2:] if self._prefix else data[2:])
        bgr = cv2.imdecode(np.frombuffer(stream, np.uint8), _REDUCED_FLAGS[self.reduce])
        if bgr is None:
            raise SlideError(f"level {self.level}: cannot decode internal tile ({row}, {col})",
                             "the file is corrupt or truncated")
        return np.ascontiguousarray(bgr[..., ::-1])

    def tile(self, row: int, col: int) -> np.ndarray:
        key = (*self._key, row, col)
        found = self._shared.get(key)
        if found is None:
            found = self._decode(row, col)
            self._shared.put(key, found)
        return found


class _Pool:
    """The slides a worker holds open (least recently used closed first), and the slides that failed."""

    def __init__(self, stream: SlideStream) -> None:
        self.stream = stream
        self.open: OrderedDict[int, tuple[Any, dict[tuple[int, int], _CachedLevel]]] = OrderedDict()
        self.cache = _TileCache(stream.cache_mb * 2**20)
        self.bad: dict[int, str] = {}
        self.opens = 0

    def level(self, s: int, level: int, ratio: float = 1.0) -> _CachedLevel:
        """The reader of `level` of slide s, decoding at the coarsest JPEG scale a patch `ratio` times coarser
        than the level allows (`dct_reduction`)."""
        entry = self.open.get(s)
        if entry is None:
            index = self.stream.index
            handle = open_slide(index.paths[s], index.readers[s])
            self.opens += 1
            entry = self.open[s] = (handle, {})
            while len(self.open) > self.stream.pool:
                _, (old, _) = self.open.popitem(last=False)
                old.close()
        else:
            self.open.move_to_end(s)
        readers = entry[1]
        if (level, 1) not in readers:
            readers[level, 1] = _CachedLevel(entry[0], level, self.cache, (s, level, 1))
        reduce = dct_reduction(readers[level, 1].page, ratio)
        if (level, reduce) not in readers:
            readers[level, reduce] = _CachedLevel(entry[0], level, self.cache, (s, level, reduce), reduce)
        return readers[level, reduce]

    def fail(self, s: int, reason: str) -> None:
        self.bad[s] = reason
        entry = self.open.pop(s, None)
        if entry is not None:
            entry[0].close()
        log = self.stream.bad_slides_log
        if log is not None:  # O_APPEND: lines of concurrent workers and ranks never interleave
            line = f"{self.stream.index.paths[s]}\t{reason}\n".encode()
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def close(self) -> None:
        for handle, _ in self.open.values():
            handle.close()
        self.open.clear()


def patch_tissue_fraction(patch: np.ndarray, threshold: float) -> float:
    """Fraction of the patch's pixels (one in 16) whose HSV saturation exceeds the slide's tissue threshold."""
    sample = np.ascontiguousarray(patch[::4, ::4])
    saturation = cv2.cvtColor(sample, cv2.COLOR_RGB2HSV)[..., 1]
    return float(np.count_nonzero(saturation > threshold)) / saturation.size


class SlideStream(torch.utils.data.IterableDataset):
    """uint8 (3, size, size) patches from whole slides, one epoch per iteration (see the module docstring)."""

    def __init__(self, index: SlideArrays, *, size: int, mpp: MppSampling, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1, patches_per_visit: int = 16, pool: int = 8,
                 min_tissue: float = 0.5, max_tries: int = 4, cache_mb: int = 64,
                 bad_slides_log: Path | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.size, self.mpp, self.seed = size, mpp, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, max(1, batch_size)
        self.patches_per_visit, self.pool = max(1, patches_per_visit), max(1, pool)
        self.min_tissue, self.max_tries, self.cache_mb = min_tissue, max(1, max_tries), cache_mb
        self.bad_slides_log = bad_slides_log
        self.epoch = 0
        self._skip = 0
        self._open(index)

    def _open(self, index: SlideArrays) -> None:
        self.index = index
        # one object per distinct (level-0 µm/px, shorter side up to where it stops limiting), not per slide
        cap = math.ceil(self.mpp.widest() * self.size / float(np.min(index.base_mpp))) + 1 if len(index) else 1
        sides = np.minimum(np.minimum(index.width, index.height), cap)
        found: dict[tuple[float, int], Any] = {}
        self._feasible = []
        for base, side in zip(index.base_mpp.tolist(), sides.tolist(), strict=True):
            key = (base, side)
            if key not in found:
                found[key] = self.mpp.for_slide(base, side, self.size)
            self._feasible.append(found[key])
        starts, ends = np.asarray(index.cell_start[:-1]), np.asarray(index.cell_start[1:])
        last = index.cum[np.maximum(ends - 1, 0)] if len(index.cum) else np.zeros(len(ends))
        usable = np.array([f is not None for f in self._feasible], bool) & (ends > starts)
        self._area = np.where(usable, last / 255.0, 0.0)  # tissue cells: the sum of their fractions
        if not self._area.any():
            raise ValueError(f"no slide can give {self.size} px patches at the fields of view asked for "
                             f"({self.mpp}); slides left out: {index.bad or 'none'}")

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("index", "_feasible", "_area", "_kept_pool", "_pool_pid")}
        state["_pins"] = self.index.pins
        return state

    def __setstate__(self, state: dict) -> None:
        pins = state.pop("_pins")
        self.__dict__.update(state)
        self._open(reopen_slide_index(pins[0]))

    # ------------------------------------------------------------------------------------------ public API
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._skip = 0

    def skip(self, n: int) -> None:
        self._skip = max(0, int(n))

    def epoch_length(self) -> int:
        """Patches per epoch over all ranks: the usable tissue area over the expected patch area, and at least
        one batch per rank (positions are drawn anew, so a few small slides still make whole batches)."""
        area_um2 = float(self._area.sum()) * GRID_UM * GRID_UM
        covering = round(area_um2 / (self.size * self.size * self.mpp.expected_square()))
        return max(covering, self.batch_size * self.world_size)

    def __len__(self) -> int:
        return -(-self.epoch_length() // self.world_size)

    def rank_slides(self, epoch: int | None = None) -> np.ndarray:
        """This rank's slides for the epoch (indices into the index), in their seeded order."""
        epoch = self.epoch if epoch is None else epoch
        usable = np.flatnonzero(self._area > 0)
        order = usable[np.random.default_rng([self.seed, epoch, _EPOCH_TAG]).permutation(len(usable))]
        if len(order) < self.world_size:
            return order
        cumulative = np.cumsum(self._area[order])
        bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(self.world_size + 1) / self.world_size)
        bounds = np.clip(bounds, np.arange(self.world_size + 1), len(order) - self.world_size +
                         np.arange(self.world_size + 1))  # every run keeps at least one slide
        bounds[0], bounds[-1] = 0, len(order)
        return order[bounds[self.rank] : bounds[self.rank + 1]]

    def visit_slides(self, epoch: int | None = None) -> np.ndarray:
        """The slide of each visit of this rank's epoch (see step 3 of the module docstring)."""
        mine = self.rank_slides(epoch)
        visits = -(-len(self) // self.patches_per_visit)
        share = self._area[mine] / self._area[mine].sum() * visits
        quota = np.floor(share).astype(np.int64)
        short = visits - int(quota.sum())
        quota[np.argsort(-(share - quota), kind="stable")[:short]] += 1  # largest remainders
        lanes = min(self.pool, len(mine))
        load = np.zeros(lanes, np.int64)
        lane_of = np.empty(len(mine), np.int64)
        for i, q in enumerate(quota.tolist()):  # per slide, not per sample: the lightest lane takes the next
            lane = int(np.argmin(load))
            lane_of[i] = lane
            load[lane] += q
        grid = np.full((lanes, int(load.max())), -1, np.int32)
        filled = np.zeros(lanes, np.int64)
        for i in np.flatnonzero(quota).tolist():
            at = int(lane_of[i])
            grid[at, filled[at] : filled[at] + quota[i]] = mine[i]
            filled[at] += quota[i]
        flat = grid.T.reshape(-1)  # round-robin across the lanes
        return flat[flat >= 0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = _Plan(self, self.epoch)
        pool = self.pool_for(info is None)
        try:
            for position in range(self._skip, len(self)):
                if ((position - self._skip) // self.batch_size) % workers != worker:
                    continue
                yield torch.from_numpy(plan.sample(position, pool)).permute(2, 0, 1).contiguous()
        finally:
            if info is not None:
                pool.close()

    def pool_for(self, in_process: bool) -> _Pool:
        """The open slides to read with. Iterated in-process (DataLoader num_workers = 0) they stay open from one
        epoch to the next, with their decoded tiles (small slides make epochs of a batch or two); a DataLoader
        worker opens its own, never a forked copy of these (their file offsets are shared with the parent)."""
        if not in_process:
            return _Pool(self)
        if self.__dict__.get("_pool_pid") != os.getpid():
            self._kept_pool, self._pool_pid = _Pool(self), os.getpid()
        return self._kept_pool

    def describe(self, positions: list[int]) -> list[dict[str, Any]]:
        """Where samples of this rank's current epoch come from: slide, µm/px, pyramid level, level-0 x and y of
        the patch's top-left corner, its side in level-0 pixels, and its tissue fraction (reads the patches)."""
        plan = _Plan(self, self.epoch)
        pool = _Pool(self)
        try:
            found = []
            for i in positions:
                where: dict[str, Any] = {}
                plan.sample(i, pool, where)
                found.append(where)
            return found
        finally:
            pool.close()

    def sample_images(self, n: int) -> list[np.ndarray]:
        """n patches (H×W×3 uint8) of a fitting epoch no training epoch uses, for the stain statistics."""
        plan = _Plan(self, FIT_EPOCH)
        pool = _Pool(self)
        try:
            return [plan.sample(i, pool) for i in range(min(n, len(self)))]
        finally:
            pool.close()


class _Plan:
    """One epoch of one rank: visits' slides, and each visit's draws when first needed."""

    def __init__(self, stream: SlideStream, epoch: int) -> None:
        self.stream, self.epoch = stream, epoch
        self.slides = stream.rank_slides(epoch)
        self.visits = stream.visit_slides(epoch)
        self.position_of = {int(s): i for i, s in enumerate(self.slides.tolist())}
        self._draws: dict[tuple[int, int], tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}

    def _visit_draws(self, visit: int, attempt: int, slide: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        key = (visit, attempt)
        if key not in self._draws:
            if len(self._draws) > 64:
                self._draws.clear()
            st, index = self.stream, self.stream.index
            per, tries = st.patches_per_visit, st.max_tries
            rng = np.random.default_rng([st.seed, self.epoch, st.rank, visit, attempt, _VISIT_TAG])
            mpps = st.mpp.draw(rng, per, st._feasible[slide])
            start, end = index.cells(slide)
            cum = index.cum[start:end]
            picks = rng.integers(0, int(cum[-1]), size=per * tries)
            cells = index.cell[start + np.searchsorted(cum, picks, side="right")]
            jitter = rng.random((per * tries, 2))
            self._draws[key] = (slide, mpps, np.asarray(cells, np.int64), jitter)
        return self._draws[key]

    def sample(self, i: int, pool: _Pool, where: dict[str, Any] | None = None) -> np.ndarray:
        st = self.stream
        visit, j = divmod(i, st.patches_per_visit)
        first = int(self.visits[visit])
        for attempt in range(len(self.slides)):  # a failed slide hands its samples to the next of the rank's run
            slide = first if attempt == 0 else int(
                self.slides[(self.position_of[first] + attempt) % len(self.slides)])
            if slide in pool.bad:
                continue
            try:
                return self._read(self._visit_draws(visit, attempt, slide), j, pool, where)
            except (SlideError, OSError) as exc:
                reason = exc.reason if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
                pool.fail(slide, reason)
        raise WorkFailed(f"rank {st.rank}: every slide of its share failed to read, e.g. "
                         f"{next(iter(pool.bad.items()), ('?', '?'))}; see {st.bad_slides_log}")

    def _read(self, draws: tuple[int, np.ndarray, np.ndarray, np.ndarray], j: int, pool: _Pool,
              where: dict[str, Any] | None) -> np.ndarray:
        st, index = self.stream, self.stream.index
        slide, mpps, cells, jitter = draws
        mpp, base = float(mpps[j]), float(index.base_mpp[slide])
        choice = choose_level(base, index.downsamples(slide), mpp, st.size)
        reader = pool.level(slide, choice.level, choice.read_size / st.size)
        scale = choice.downsample * reader.reduce  # level-0 pixels per pixel of what is decoded
        n = round(choice.read_size / reader.reduce)
        cols, cell_px = int(index.cols[slide]), float(index.cell_px[slide])
        width, height = float(index.width[slide]), float(index.height[slide])
        extent = st.size * mpp / base  # level-0 pixels
        best, best_fraction, best_at = None, -1.0, (0.0, 0.0)
        for c in range(j * st.max_tries, (j + 1) * st.max_tries):
            row, col = divmod(int(cells[c]), cols)
            x0 = min(max((col + jitter[c, 0]) * cell_px - extent / 2, 0.0), width - extent)
            y0 = min(max((row + jitter[c, 1]) * cell_px - extent / 2, 0.0), height - extent)
            region = reader.read(int(x0 / scale + 0.5), int(y0 / scale + 0.5), n, n)
            if n != st.size:
                interpolation = cv2.INTER_AREA if n > st.size else cv2.INTER_LINEAR
                region = cv2.resize(region, (st.size, st.size), interpolation=interpolation)
            fraction = patch_tissue_fraction(region, float(index.threshold[slide]))
            if fraction > best_fraction:
                best, best_fraction, best_at = region, fraction, (x0, y0)
            if fraction >= st.min_tissue:
                break
        if where is not None:
            where.update(slide=index.paths[slide], mpp=mpp, level=choice.level, x=best_at[0], y=best_at[1],
                         extent=extent, tissue=best_fraction, reduce=reader.reduce)
        return best  # type: ignore[return-value]
