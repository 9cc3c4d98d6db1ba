"""`pathssl pretrain`'s data: the stream a spec's `[data]` names (tile stores and image folders, whole slides, or
both), the images its stain statistics are fitted on, and the slides that were left out.

Slides are indexed before the run directory is made, so a spec problem stops the run with nothing started. Under
torchrun every rank takes part in computing missing coordinate rows (a per-slide lock gives each slide to one
process), then checks that all ranks opened the same index state: the plan of every rank is derived from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pathssl_cli.console import warn
from pathssl_cli.data.mixed import MixedStream, stain_sample
from pathssl_cli.data.slide_arrays import open_slide_index
from pathssl_cli.data.slide_index import CoordSettings
from pathssl_cli.data.slide_stream import SlideStream
from pathssl_cli.data.tiles import TileStream, first_tile_side
from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.specs.pretrain import PretrainSpec
from pathssl_cli.specs.tile import resolve_slide_items
from pathssl_cli.tiling.index import StoreError, is_store

PretrainStream = TileStream | SlideStream | MixedStream
BAD_SLIDES = "bad_slides.tsv"  # in the run directory: slides that failed mid-run, one line per slide and process


def default_coords_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pathssl" / "coords"


def open_stream(spec: PretrainSpec, rank: int, world: int, local_batch: int, default_side: int) -> PretrainStream:
    """This rank's stream. Every sample is `data.tile_size` px (unset: the first tile of `data.tiles`, else the
    recipe's global view size, `default_side`)."""
    data = spec.data
    if data.mpp_weights:
        # A folder's tiles carry no µm/px, so no weighted field of view would ever select them: refuse rather
        # than train on the stores alone while the spec lists the folder.
        folders = [str(source) for source in data.tiles if not is_store(Path(source))]
        if folders:
            raise SpecError(
                f"data.mpp_weights samples tiles by field of view, but the image folder(s) {', '.join(folders)} "
                "in data.tiles have no µm/px, so none of their tiles would be drawn. Remove data.mpp_weights "
                "(every tile is then drawn in proportion), drop the folder(s) from data.tiles, or tile their "
                "slides with `pathssl tile` to get a store with fields of view")
    try:
        side = int(data.tile_size or (first_tile_side(data.tiles) if data.tiles else default_side))
        tiles = None
        if data.tiles:
            tiles = TileStream(list(data.tiles), image_size=side,
                               mpp_weights={float(k): v for k, v in data.mpp_weights.items()} or None,
                               seed=spec.run.seed, shuffle_buffer=data.shuffle_buffer, rank=rank, world_size=world,
                               batch_size=local_batch)
        if not data.slides:
            assert tiles is not None
            return tiles
        slides = _slide_stream(spec, side, rank, world, local_batch)
    except (FileNotFoundError, ValueError) as exc:
        raise SpecError(f"data: {exc}") from None
    return slides if tiles is None else MixedStream(tiles, slides)


def _slide_stream(spec: PretrainSpec, side: int, rank: int, world: int, local_batch: int) -> SlideStream:
    data = spec.data
    settings = CoordSettings(reader=data.reader, mpp_override=data.mpp_override)
    coords = Path(data.coords_dir) if data.coords_dir else default_coords_dir()
    slides = resolve_slide_items(list(data.slides))
    try:
        index = open_slide_index(slides, coords, settings, workers=max(1, data.workers) if world == 1 else 1)
    except StoreError as exc:
        raise WorkFailed(str(exc)) from None
    _same_state_everywhere(index.pins[0]["state"], world)
    if index.bad:
        listed = "; ".join(f"{path}: {why}" for path, why in index.bad[:10])
        more = f" (and {len(index.bad) - 10} more)" if len(index.bad) > 10 else ""
        warn(f"{len(index.bad)} of {len(slides)} slide(s) left out of pre-training: {listed}{more}")
    if not len(index):
        raise SpecError(f"data.slides: none of the {len(slides)} slide(s) can be used: "
                        + "; ".join(f"{p}: {w}" for p, w in index.bad[:5]))
    return SlideStream(index, size=side, mpp=data.mpp_sampling(), seed=spec.run.seed, rank=rank,
                       world_size=world, batch_size=local_batch, patches_per_visit=data.patches_per_visit,
                       pool=data.open_slides, min_tissue=data.min_tissue,
                       bad_slides_log=Path(spec.run.output_dir) / BAD_SLIDES)


def _same_state_everywhere(state: str, world: int) -> None:
    """Every rank plans its share from the index; a rank that saw other rows would read an overlapping share."""
    if world == 1 or not torch.distributed.is_initialized():
        return
    states: list[str | None] = [None] * world
    torch.distributed.all_gather_object(states, state)
    if len(set(states)) > 1:
        raise WorkFailed(f"the ranks opened different coordinate index states ({sorted(set(map(str, states)))}): "
                         "slides or their rows changed while the run started. Start it again.")


def stain_images(stream: PretrainStream, spec: PretrainSpec, n: int) -> list:
    return stain_sample(stream, list(spec.data.tiles), n, spec.run.seed)


def left_out_slides(stream: PretrainStream, run_dir: Path) -> list[tuple[str, str]]:
    """Slides not used: left out when indexed, or failed mid-run (any rank or worker), each named once."""
    slides = stream if isinstance(stream, SlideStream) else getattr(stream, "slides", None)
    if slides is None:
        return []
    found = dict(slides.index.bad)
    log = run_dir / BAD_SLIDES
    if log.exists():
        for line in log.read_text().splitlines():
            path, _, reason = line.partition("\t")
            found.setdefault(path, f"failed while training: {reason}")
    return sorted(found.items())
