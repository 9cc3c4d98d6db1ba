"""benchmarks/peers: each comparison runs on a tiny input and the tools' outputs agree.

Peers are optional: a test needing one skips, naming how to get it, when the peer is neither importable here nor
given as another virtual environment's python (PATHSSL_TIATOOLBOX_PYTHON, PATHSSL_HISTOLAB_PYTHON,
PATHSSL_HOVERNET_PYTHON). CI installs only `.[test]`, so there the pathssl side and the re-implementation of the
official loops run, and the peers skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

import harness  # noqa: E402
import postproc_peers  # noqa: E402
import tiling_peers  # noqa: E402

TILE = 224


def _peer(label: str, import_name: str, function: str, module: str, variable: str) -> harness.Contender:
    """The peer here, or in the venv named by `variable`; skip (saying how to get it) otherwise."""
    if importlib.util.find_spec(import_name) is not None:
        return harness.Contender(label, module, function)
    python = os.environ.get(variable)
    if python and subprocess.run([python, "-c", f"import {import_name}"], capture_output=True).returncode == 0:
        return harness.Contender(label, module, function, python)
    pytest.skip(f"{label} not installed: pip install it, or set {variable} to a venv's python that has it")


# ------------------------------------------------------------------------------------------------------------
# Tiling: a slide whose tissue is a block of whole grid cells, so every tissue rule must pick the same tiles
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def block_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[tuple[int, int]]]:
    """A 1792 px square tiled TIFF at 0.5 µm/px: glass, with an H&E-coloured block covering grid cells
    (columns 2-5, rows 2-6 of the 224 px grid). Returns the path and the expected tile origins."""
    import tifffile

    rng = np.random.default_rng(0)
    side = 8 * TILE
    image = np.clip(rng.normal(238, 3, (side, side, 3)), 0, 255)
    block = np.s_[2 * TILE : 7 * TILE, 2 * TILE : 6 * TILE]
    stain = np.array([175.0, 95.0, 165.0]) + rng.normal(0, 18, (5 * TILE, 4 * TILE, 1))
    image[block] = np.clip(stain + rng.normal(0, 6, (5 * TILE, 4 * TILE, 3)), 0, 255)
    path = tmp_path_factory.mktemp("slide") / "block.tif"
    ppcm = 1e4 / 0.5
    tifffile.imwrite(path, image.astype(np.uint8), tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
    expected = {(c * TILE, r * TILE) for r in range(2, 7) for c in range(2, 6)}
    return path, expected


def _boxes(contender: harness.Contender, slide: Path, tmp_path: Path) -> list[list[int]]:
    done = contender.run(slides=[str(slide)], mpp=0.5, size=TILE, min_tissue=0.5, workers=1, out_root=str(tmp_path))
    result = done.result
    if contender.label == "pathssl":
        result = tiling_peers.pathssl_boxes(result["store"], 0.5, TILE)
    boxes = result[str(slide)]
    assert all(extent == TILE for _, _, extent in boxes), boxes
    return boxes


def _cells(boxes: list[list[int]]) -> set[tuple[int, int]]:
    """The grid cells of the tiles; LazySlide anchors its grid at its tissue polygon's bounding box, which its
    contour tracing puts one pixel outside the block, so origins may sit 1 px off the cell corner."""
    cells = {(round(x / TILE) * TILE, round(y / TILE) * TILE) for x, y, _ in boxes}
    assert all(abs(x - cx) <= 1 and abs(y - cy) <= 1 for (x, y, _), (cx, cy) in zip(
        sorted(boxes), sorted(cells), strict=True)), boxes
    return cells


def test_pathssl_tiles_the_block(block_slide: tuple[Path, set], tmp_path: Path) -> None:
    slide, expected = block_slide
    assert _cells(_boxes(harness.Contender("pathssl", "tiling_peers", "pathssl_tile"), slide, tmp_path)) == expected


@pytest.mark.parametrize(
    ("label", "name", "function", "variable"),
    [
        ("TIAToolbox", "tiatoolbox", "tiatoolbox_tile", "PATHSSL_TIATOOLBOX_PYTHON"),
        ("LazySlide", "lazyslide", "lazyslide_tile", "PATHSSL_LAZYSLIDE_PYTHON"),
        ("histolab", "histolab", "histolab_tile", "PATHSSL_HISTOLAB_PYTHON"),
    ],
)
def test_peer_tiles_the_same_block(
    block_slide: tuple[Path, set], tmp_path: Path, label: str, name: str, function: str, variable: str
) -> None:
    """Same cells as pathssl; histolab anchors its grid at its coarse mask's bounding box (the corner rounded
    on its thumbnail), so its grid is shifted: there, the same number of tiles, each at least half on the
    block, covering most of it."""
    slide, expected = block_slide
    peer = _peer(label, name, function, "tiling_peers", variable)
    try:
        boxes = _boxes(peer, slide, tmp_path)
    finally:
        peer.close()
    if label != "histolab":
        assert _cells(boxes) == expected
        return
    block = np.zeros((8 * TILE, 8 * TILE), bool)
    block[2 * TILE : 7 * TILE, 2 * TILE : 6 * TILE] = True
    assert len(boxes) == len(expected), boxes
    assert all(tiling_peers.score(block, [box])["purity"] >= 0.5 for box in boxes), boxes
    assert tiling_peers.score(block, boxes)["recall"] >= 0.8


def test_reference_tissue_and_scores() -> None:
    """OD >= 0.15 in some channel is tissue; recall and purity count pixels under the tiles."""
    assert 255 * 10 ** (-tiling_peers.REFERENCE_OD) == pytest.approx(180.5, abs=0.1)
    reference = np.zeros((10, 10), bool)
    reference[:4, :5] = True  # 20 tissue pixels
    scores = tiling_peers.score(reference, [[0, 0, 2], [8, 8, 2]])  # 4 tissue px covered, 8 px of tiles
    assert scores == {"recall": 4 / 20, "purity": 4 / 8}


# ------------------------------------------------------------------------------------------------------------
# Post-processing: identical instances on the same maps
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("maps") / "maps.npz"
    postproc_peers.write_maps(path, n_tiles=2)  # real CoNSeP truth when ../shared/data exists, else synthetic
    return path


def _instances(contender: harness.Contender, maps: Path, out: Path) -> Path:
    contender.run(maps=str(maps), out=str(out))
    return out


def test_same_partition_ignores_ids_only() -> None:
    a = np.array([[0, 1, 1], [0, 2, 2]])
    assert postproc_peers.same_partition(a, np.where(a > 0, 7 - a, 0))
    assert not postproc_peers.same_partition(a, np.array([[0, 1, 1], [0, 1, 1]]))  # merged
    assert not postproc_peers.same_partition(a, np.array([[1, 1, 1], [0, 2, 2]]))  # background differs


def _assert_identical(ours: Path, theirs: Path) -> None:
    check = postproc_peers.compare(str(ours), str(theirs))
    assert check["identical_maps"] == check["tiles"], check
    assert check["matched_records"] > 0 and not any(check["differ"].values()), check


def test_pathssl_matches_the_reimplemented_official_loops(maps: Path, tmp_path: Path) -> None:
    ours = _instances(harness.Contender("pathssl", "postproc_peers", "pathssl_postproc"), maps, tmp_path / "a.npz")
    loops = harness.Contender("loops", "postproc_peers", "reimplemented_postproc")
    _assert_identical(ours, _instances(loops, maps, tmp_path / "b.npz"))


@pytest.mark.parametrize(
    ("label", "name", "function", "variable"),
    [
        ("TIAToolbox", "tiatoolbox", "tiatoolbox_postproc", "PATHSSL_TIATOOLBOX_PYTHON"),
        ("official hover_net", "hover_net", "official_postproc", "PATHSSL_HOVERNET_PYTHON"),
    ],
)
def test_pathssl_matches_peer_postprocessing(
    maps: Path, tmp_path: Path, label: str, name: str, function: str, variable: str
) -> None:
    peer = _peer(label, name, function, "postproc_peers", variable)
    ours = _instances(harness.Contender("pathssl", "postproc_peers", "pathssl_postproc"), maps, tmp_path / "a.npz")
    try:
        _assert_identical(ours, _instances(peer, maps, tmp_path / "b.npz"))
    finally:
        peer.close()


# ------------------------------------------------------------------------------------------------------------
# Input pipeline: every contender makes every view at the recipe's sizes
# ------------------------------------------------------------------------------------------------------------
def test_views_contenders_make_the_recipe() -> None:
    import views_peers

    expected = {"images": 4, "views": 8, "sizes": [224, 224] + [96] * 6}  # SwAV: 2 global + 6 local views
    assert views_peers.pathssl_views("swav", "pathology", 4) == expected
    assert views_peers.torchvision_views("swav", "pathology", 4) == expected
    if importlib.util.find_spec("kornia") is None:
        pytest.skip('kornia not installed: pip install -e ".[peers]"')
    assert views_peers.kornia_views("swav", "pathology", 4) == expected
