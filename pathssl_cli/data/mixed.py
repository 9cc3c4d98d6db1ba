"""Tile stores and image folders mixed with whole slides in one pre-training stream, and the sample that stain
statistics are fitted on.

`MixedStream(tiles, slides)`: a rank's epoch holds both streams' epochs (len(tiles) + len(slides) samples per
rank); which one position p draws from is a seeded permutation of (seed, epoch, rank), so each source keeps its
own order and the mix follows their epoch lengths. The worker split and `skip` are those of the two streams
(chunk c of `batch_size` samples to worker c mod num_workers), so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pathssl_cli.data.slide_stream import SlideStream, _Plan
from pathssl_cli.data.tile_index import TileReader, mark_pins_used
from pathssl_cli.data.tiles import TileStream, _to_tensor, load_tile, sample_images

_MIX_TAG = 0x313D


class MixedStream(torch.utils.data.IterableDataset):
    """uint8 (3, S, S) samples of a tile stream and a slide stream with the same S, rank and batch size."""

    def __init__(self, tiles: TileStream, slides: SlideStream) -> None:
        super().__init__()
        if tiles.image_size != slides.size or tiles.rank != slides.rank or tiles.world_size != slides.world_size:
            raise ValueError("the tile and slide streams must share the image size, rank and world size")
        self.tiles, self.slides = tiles, slides
        self.seed, self.rank, self.batch_size = tiles.seed, tiles.rank, tiles.batch_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._skip = 0
        self.tiles.set_epoch(epoch)
        self.slides.set_epoch(epoch)

    def skip(self, n: int) -> None:
        self._skip = max(0, int(n))

    def __len__(self) -> int:
        return len(self.tiles) + len(self.slides)

    def epoch_length(self) -> int:
        return self.tiles.epoch_length() + self.slides.epoch_length()

    def from_tiles(self) -> np.ndarray:
        """Per position of this rank's epoch: True where it takes the tile stream's next sample."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, _MIX_TAG])
        return rng.permutation(len(self)) < len(self.tiles)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mark_pins_used(self.tiles.index.pins)
        which = self.from_tiles()
        order = self.tiles.rank_order()
        plan = _Plan(self.slides, self.epoch)
        reader = TileReader(self.tiles.index, max_open=self.tiles._open_shards)
        pool = self.slides.pool_for(info is None)
        tile_j = int(np.count_nonzero(which[: self._skip]))
        slide_j = self._skip - tile_j
        try:
            for position in range(self._skip, len(which)):
                mine = ((position - self._skip) // self.batch_size) % workers == worker
                if which[position]:
                    if mine:
                        image = load_tile(self.tiles.index, int(order[tile_j]), reader)
                        yield _to_tensor(image, self.tiles.image_size)
                    tile_j += 1
                else:
                    if mine:
                        yield torch.from_numpy(plan.sample(slide_j, pool)).permute(2, 0, 1).contiguous()
                    slide_j += 1
        finally:
            reader.close()
            if info is not None:
                pool.close()


def stain_sample(stream: TileStream | SlideStream | MixedStream, tile_sources: Sequence[Path], n: int,
                 seed: int) -> list[np.ndarray]:
    """n images to fit stain statistics on: from tiles and slides in proportion to their epoch lengths (tiles
    drawn uniformly without replacement, slide patches from a fitting epoch no training epoch uses)."""
    if isinstance(stream, TileStream):
        return sample_images(tile_sources, n, seed)
    if isinstance(stream, SlideStream):
        return stream.sample_images(n)
    from_tiles = round(n * stream.tiles.epoch_length() / stream.epoch_length())
    return sample_images(tile_sources, from_tiles, seed) + stream.slides.sample_images(n - from_tiles)
