"""Slides shared by the tiling tests, written once per session (synthetic slides take seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathssl_cli.synthetic_slide import SlideTruth, write_synthetic_slide


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def synthetic_slide(slide_dir: Path) -> SlideTruth:
    """1 x 0.77 mm at 1 µm/px, 3 levels (1, 2, 4 µm/px), 256 px JPEG tiles."""
    return write_synthetic_slide(
        slide_dir / "syn.tif", width=1024, height=768, mpp=1.0, tile_size=256, seed=4
    )


@pytest.fixture(scope="session")
def second_slide(slide_dir: Path) -> SlideTruth:
    return write_synthetic_slide(
        slide_dir / "syn2.tif",
        width=640,
        height=512,
        mpp=1.0,
        tile_size=128,
        n_levels=2,
        seed=5,
        tissue_fraction=0.6,
    )


@pytest.fixture(scope="session")
def slide_without_mpp(slide_dir: Path) -> SlideTruth:
    return write_synthetic_slide(
        slide_dir / "nompp.tif",
        width=384,
        height=384,
        mpp=1.0,
        tile_size=128,
        n_levels=1,
        seed=6,
        write_mpp=False,
        tissue_fraction=0.6,
    )
