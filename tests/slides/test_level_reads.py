"""Reads at pyramid levels land on the level's own pixels, for every reader (issue 20 §2).

tiffslide's `read_region` maps a level-0 location back with `int(loc / downsample)`; with a real downsample
(2.000337 on the CMU-1 OME pyramid) a level-0 location computed as `round(l * downsample)` landed on level pixel
l - 1. The references here are each level decoded independently of pathssl (tifffile, pydicom + libjpeg-turbo, the
arrays written), on downsamples that are not whole numbers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pathssl_cli.segment.slide_scale import MppSlideReader
from pathssl_cli.slides.readers import open_slide

sys.path.insert(0, str(Path(__file__).parent))
from dicom_writer import decoded_frames, write_dicom_wsi

PYRAMID = "CMU-1-Small-Region-pyramid.ome.tif"
WINDOWS = [(0, 0, 48, 64), (101, 37, 64, 48), (333, 211, 40, 40)]  # (top, left, height, width) on the level


def needs(module: str) -> None:
    extra = {"openslide": "openslide", "wsidicom": "dicom"}[module]
    pytest.importorskip(module, reason=f"extra '{extra}' not installed: pip install -e '.[{extra}]'")


@pytest.fixture(scope="module")
def ome_levels(shared_data: Path) -> list[np.ndarray]:
    path = shared_data / "wsi" / PYRAMID
    return [tifffile.imread(path, series=0, level=level) for level in range(3)]


@pytest.fixture(scope="module")
def paged_pyramid(ome_levels: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OME pyramid's levels as a page-per-level tiled TIFF (the layout OpenSlide's generic-tiff reads),
    lossless so the written arrays are the exact reference."""
    path = tmp_path_factory.mktemp("paged") / "paged.tif"
    with tifffile.TiffWriter(path) as tw:
        for level, pixels in enumerate(ome_levels):
            tw.write(pixels, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1 if level else 0,
                     resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def dicom_dir(ome_levels: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1001 x 763 px of real H&E as DICOM-WSI: level 1 is 500 x 381, downsample 2.002."""
    needs("wsidicom")
    folder = tmp_path_factory.mktemp("dicom") / "odd"
    write_dicom_wsi(np.ascontiguousarray(ome_levels[0][700:1463, 500:1501]), 0.499, folder, tile=256, levels=2)
    return folder


def _cases(request: pytest.FixtureRequest, name: str) -> tuple[Path, str, list[np.ndarray], int]:
    """(slide path, reader, reference pixels per level, grey levels of decoder tolerance)."""
    if name == "tiffslide":
        path = request.getfixturevalue("shared_data") / "wsi" / PYRAMID
        return path, "tiffslide", request.getfixturevalue("ome_levels"), 0
    if name == "openslide":
        needs("openslide")
        return request.getfixturevalue("paged_pyramid"), "openslide", request.getfixturevalue("ome_levels"), 0
    folder = request.getfixturevalue("dicom_dir")
    return folder, "dicom", [decoded_frames(folder / f"level{k}.dcm") for k in range(2)], 1


def _best_shift(got: np.ndarray, level: np.ndarray, top: int, left: int) -> tuple[tuple[int, int], float]:
    """The (dy, dx) in -1..1 at which `got` matches `level` best, and the mean difference there."""
    h, w = got.shape[:2]
    scores = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if top + dy < 0 or left + dx < 0:
                continue
            ref = level[top + dy : top + dy + h, left + dx : left + dx + w].astype(np.int16)
            scores[(dy, dx)] = float(np.abs(got.astype(np.int16) - ref).mean())
    best = min(scores, key=scores.__getitem__)
    return best, scores[best]


@pytest.mark.parametrize("name", ["tiffslide", "openslide", "dicom"])
def test_a_read_at_every_level_is_that_levels_pixels(request: pytest.FixtureRequest, name: str) -> None:
    path, reader_name, levels, tolerance = _cases(request, name)
    slide = open_slide(path, reader_name)
    assert len(slide.level_downsamples) == len(levels) >= 2
    assert any(ds != round(ds) for ds in slide.level_downsamples), "the point is a non-integer downsample"
    base = float(slide.properties.get("tiffslide.mpp-x") or slide.properties.get("openslide.mpp-x")
                 or slide.properties["dicom.mpp-x"])
    for level, pixels in enumerate(levels):
        ds = slide.level_downsamples[level]
        reader = MppSlideReader(slide, path, None, base * ds, None)
        assert (reader.geometry.level, reader.geometry.scale) == (level, pytest.approx(ds))
        for top, left, height, width in WINDOWS:
            if top + height > pixels.shape[0] or left + width > pixels.shape[1]:
                continue
            got = reader.read(top, left, height, width)
            want = pixels[top : top + height, left : left + width]
            if name == "openslide":
                # OpenSlide takes level-0 locations only: a level pixel is addressed as round(x * ds), which it
                # paints at the sub-pixel offset left over (< 0.25 px here), interpolating. Aligned means: best
                # at shift (0, 0), a small mean difference; a one-pixel shift on this H&E costs 10+ grey levels.
                shift, mean = _best_shift(got, pixels, top, left)
                assert shift == (0, 0) and mean < 5, (level, top, left, shift, mean)
            else:
                diff = np.abs(got.astype(np.int16) - want)
                assert diff.max() <= tolerance, (level, top, left, diff.max(), _best_shift(got, pixels, top, left))


@pytest.mark.parametrize("name", ["tiffslide", "dicom"])
def test_region_origin_snaps_to_the_level_grid_and_maps_back_exactly(request: pytest.FixtureRequest,
                                                                     name: str) -> None:
    """A region that starts between level pixels: the grid starts at the nearest level pixel, and `to_level0`
    gives that pixel's exact level-0 position (the GeoJSON rule), level px * downsample."""
    path, reader_name, levels, tolerance = _cases(request, name)
    slide = open_slide(path, reader_name)
    ds = slide.level_downsamples[1]
    base = float(slide.properties.get("tiffslide.mpp-x") or slide.properties["dicom.mpp-x"])
    x, y = 301, 203  # level-0 px: 150.47 and 101.48 level-1 px at ds 2.0003 (150.35 / 101.40 at 2.002)
    reader = MppSlideReader(slide, path, (x, y, 400, 300), base * ds, None)
    lx, ly = round(x / ds), round(y / ds)
    scale, x0, y0 = reader.to_level0
    assert (x0, y0) == (lx * ds, ly * ds) and scale == pytest.approx(ds)
    got = reader.read(5, 7, 32, 32)
    want = levels[1][ly + 5 : ly + 37, lx + 7 : lx + 39]
    assert np.abs(got.astype(np.int16) - want).max() <= tolerance


def _area_reference(level: np.ndarray, ax: float, ay: float, step: float, rows: int, cols: int) -> np.ndarray:
    """Area average, worked out pixel by pixel in float64: output (i, j) is the mean of the level over the box
    [ax + j step, ax + (j+1) step) x [ay + i step, ay + (i+1) step), each level pixel weighted by its overlap."""
    out = np.zeros((rows, cols, 3))
    for i in range(rows):
        y_lo, y_hi = ay + i * step, ay + (i + 1) * step
        for j in range(cols):
            x_lo, x_hi = ax + j * step, ax + (j + 1) * step
            total = np.zeros(3)
            for py in range(math.floor(y_lo), math.ceil(y_hi)):
                wy = min(y_hi, py + 1) - max(y_lo, py)
                for px in range(math.floor(x_lo), math.ceil(x_hi)):
                    wx = min(x_hi, px + 1) - max(x_lo, px)
                    total += wy * wx * level[py, px]
            out[i, j] = total / (step * step)
    return out


def _bilinear_reference(level: np.ndarray, ax: float, ay: float, step: float, rows: int, cols: int) -> np.ndarray:
    """Bilinear samples at the grid's pixel centres: level coordinate a + (j + 0.5) step, pixel centres at +0.5."""
    out = np.zeros((rows, cols, 3))
    for i in range(rows):
        sy = ay + (i + 0.5) * step - 0.5
        y0, fy = math.floor(sy), sy - math.floor(sy)
        for j in range(cols):
            sx = ax + (j + 0.5) * step - 0.5
            x0, fx = math.floor(sx), sx - math.floor(sx)
            top = level[y0, x0] * (1 - fx) + level[y0, x0 + 1] * fx
            bottom = level[y0 + 1, x0] * (1 - fx) + level[y0 + 1, x0 + 1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_resampled_reads_use_the_exact_box_and_have_no_seams(shared_data: Path,
                                                            ome_levels: list[np.ndarray]) -> None:
    """Between levels (shrink) and finer than level 0 (enlarge), each grid pixel is computed from its exact
    fractional box on the level, so two neighbouring reads tile the same pixels as one read (no seam)."""
    path = shared_data / "wsi" / PYRAMID
    slide = open_slide(path, "tiffslide")
    for mpp, level, reference in ((0.499 * 1.37, 0, _area_reference), (0.499 * 2.9, 1, _area_reference),
                                  (0.499 * 0.6, 0, _bilinear_reference)):
        reader = MppSlideReader(slide, path, (113, 57, 900, 900), mpp, None)
        g = reader.geometry
        assert g.level == level
        step = g.scale / g.downsample  # level px per grid px
        origin_x, origin_y = g.x0 / g.downsample, g.y0 / g.downsample  # level px (whole numbers)
        top, left = 17, 29
        got = reader.read(top, left, 6, 7).astype(np.float64)
        want = reference(ome_levels[level].astype(np.float64), origin_x + left * step, origin_y + top * step,
                         step, 6, 7)
        assert np.abs(got - want).max() <= 0.51, (mpp, np.abs(got - want).max())
        whole = reader.read(top, left, 40, 64)
        halves = np.concatenate([reader.read(top, left, 40, 32), reader.read(top, left + 32, 40, 32)], axis=1)
        assert np.abs(whole.astype(np.int16) - halves).max() <= 1


@pytest.mark.parametrize("name", ["tiffslide", "openslide", "dicom"])
def test_tile_reads_level_pixels_too(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> None:
    """`pathssl tile` reads levels in their own coordinates already (LevelReader): a guard that each tile at level
    1 is the level's pixels at level px round(x / downsample), not one off (JPEG quality 100: ~1 grey level;
    OpenSlide's sub-pixel interpolation adds up to ~4 more)."""
    import io

    from PIL import Image

    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.store import iter_shard
    from pathssl_cli.tiling.tiler import run_tile

    path, reader_name, levels, _ = _cases(request, name)
    ds = open_slide(path, reader_name).level_downsamples[1]
    spec = tmp_path / "tile.toml"
    spec.write_text(f'kind = "tile"\n[input]\nslides = ["{path}"]\nreader = "{reader_name}"\n'
                    f'[tiles]\nmpp = [{0.499 * ds}]\nsize = 64\nmin_tissue = 0.3\n'
                    f'[output]\ndir = "{tmp_path / "store"}"\njpeg_quality = 100\n[run]\nworkers = 1\n')
    assert run_tile(load_spec(spec, (), kind="tile"))["tiles_written"] > 10
    checked = 0
    for shard in sorted((tmp_path / "store" / "shards").glob("*.tar")):
        for _key, jpeg, row in iter_shard(shard):
            assert row["level"] == 1
            tile = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            lx, ly = round(row["x"] / ds), round(row["y"] / ds)
            if lx == 0 or ly == 0 or ly + 65 > levels[1].shape[0] or lx + 65 > levels[1].shape[1]:
                continue
            shift, mean = _best_shift(tile, levels[1], ly, lx)
            assert shift == (0, 0) and mean < (8 if name == "openslide" else 3), (row, shift, mean)
            checked += 1
    assert checked > 10
