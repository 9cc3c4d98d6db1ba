"""Tiny pre-training inputs: a synthetic tile store (two fields of view) and a synthetic image folder."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathssl_cli.synthetic import labelled_tiles, write_image_folder
from pathssl_cli.tiling.store import SlideShardWriter, tile_key

SPECS = Path(__file__).resolve().parents[2] / "specs" / "pretrain"
TILE = 32  # px: the tiny specs crop 32 px global views from these


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tile_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tile store as `pathssl tile` writes it: 2 slides × 2 fields of view (0.5 and 1.0 µm/px), 96 tiles."""
    root = tmp_path_factory.mktemp("store")
    for s in range(2):
        writer = SlideShardWriter(root, f"slide{s}", tiles_per_shard=16)
        for mpp in (0.5, 1.0):
            images, _ = labelled_tiles(4, TILE, seed=10 * s + int(mpp * 2), mpp=mpp)
            for i, image in enumerate(images):
                row = dict(slide=f"slide{s}", mpp=mpp, level=0, x=i * TILE, y=0, size=TILE, tissue=1.0,
                           key=tile_key(f"slide{s}", mpp, i * TILE, 0))
                writer.add(_jpeg(image), row)
        writer.commit()
    return root


@pytest.fixture(scope="session")
def slide_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 512 px synthetic slides at 1 µm/px (levels at 1, 2 and 4 µm/px) to pre-train from directly."""
    from pathssl_cli.synthetic_slide import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    return [write_synthetic_slide(folder / f"s{i}.tif", width=512, height=512, mpp=1.0, tile_size=128, n_levels=3,
                                  seed=60 + i, tissue_fraction=0.5).path for i in range(2)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 synthetic 32 px tissue tiles (16 per texture) as an image folder."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), 16, TILE, seed=0, splits=("train",))


def _tiny_overrides(tiles: Path, output_dir: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {"data.tiles": f'["{tiles}"]', "run.output_dir": str(output_dir),
                                 "augment.global_size": TILE, "augment.local_size": TILE // 2,
                                 "augment.stain_fit_tiles": 16, "data.batch_size": 16, "run.steps": 4,
                                 "run.log_every": 1}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def specs_dir() -> Path:
    return SPECS


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[..., list[str]]:
    """tiny_overrides(tiles, output_dir, **{"run.steps": 8}): --set arguments that point a tiny spec at
    `tiles`
    and `output_dir`, with 32 px views, a batch of 16 and a few steps."""
    return _tiny_overrides
