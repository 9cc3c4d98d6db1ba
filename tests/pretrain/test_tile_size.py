"""`data.tile_size`: the side every tile is brought to before views are cut is a rule of the spec, never the
side of whichever tile a seed happens to sample first (which silently rescaled one of two mixed sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathssl_cli.data.tiles import TileStream, first_tile_side
from pathssl_cli.pretrain_data import open_stream
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.pretrain import PretrainSpec

SPECS = Path(__file__).resolve().parents[2] / "specs" / "pretrain"


@pytest.fixture(scope="module")
def mixed_sides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one 24 px tile, twenty 40 px tiles): a seeded first draw over both nearly always picks a 40 px tile."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for name, side, n in (("small", 24, 1), ("large", 40, 20)):
        (root / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root / "small", root / "large"


def _spec(sources: tuple[Path, ...], seed: int, tmp_path: Path, *extra: str) -> PretrainSpec:
    tiles = ", ".join(f'"{s}"' for s in sources)
    spec = load_spec(SPECS / "tiny_mocov2.toml", [f"data.tiles=[{tiles}]", f"run.seed={seed}",
                                                  f"run.output_dir={tmp_path / 'run'}", *extra], kind="pretrain")
    assert isinstance(spec, PretrainSpec)
    return spec


def _open_stream(spec: PretrainSpec, rank: int, world: int, batch: int) -> TileStream:
    stream = open_stream(spec, rank, world, batch, default_side=64)  # the default side is for slides alone
    assert isinstance(stream, TileStream)
    return stream


def test_unset_tile_size_is_the_first_sources_side_whatever_the_seed(mixed_sides: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    small, large = mixed_sides
    assert first_tile_side([small, large]) == 24 and first_tile_side([large, small]) == 40
    for seed in range(6):
        assert _open_stream(_spec((small, large), seed, tmp_path), 0, 1, 4).image_size == 24
        assert _open_stream(_spec((large, small), seed, tmp_path), 0, 1, 4).image_size == 40


def test_tile_size_resizes_every_source_to_it(mixed_sides: tuple[Path, Path], tmp_path: Path) -> None:
    spec = _spec(mixed_sides, 3, tmp_path, "data.tile_size=32")
    stream = _open_stream(spec, 0, 1, 4)
    stream.set_epoch(0)
    sides = {tuple(tile.shape) for tile in stream}
    assert sides == {(3, 32, 32)}


def test_tile_size_is_validated(mixed_sides: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(Exception, match="tile_size"):
        _spec(mixed_sides, 0, tmp_path, "data.tile_size=4")
