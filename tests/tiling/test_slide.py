"""Level choice arithmetic, MPP handling and tile-aligned reads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tiffslide

from pathssl_cli.tiling.slide import (
    LevelReader,
    SlideError,
    choose_level,
    open_slide,
    slide_mpp,
    standalone_jpeg,
)


@pytest.mark.parametrize(
    ("base", "downsamples", "target", "level", "read_size", "resample"),
    [
        (0.25, (1, 2, 4), 0.25, 0, 224, False),  # exact at level 0
        (0.25, (1, 2, 4), 0.5, 1, 224, False),  # exact at level 1 (0.25 * 2)
        (0.25, (1, 2, 4), 2.0, 2, 448, True),  # coarsest level is 1.0 µm/px: read 2x, shrink
        (0.25, (1, 2, 4), 0.3, 0, 269, True),  # 224 * 0.3 / 0.25 = 268.8 → 269
        (0.25, (1, 2, 4), 0.7, 1, 314, True),  # 224 * 0.7 / 0.5 = 313.6 → 314
        (0.2527, (1, 4), 0.25, 0, 224, False),  # 1.1% coarser than asked: within the 2% tolerance
        (0.2527, (1, 4), 1.0, 1, 224, False),  # level 1 is 1.0108 µm/px: within 2% of 1.0, used as is
        (0.499, (1, 2.000337, 4.002024), 1.0, 1, 224, False),  # OME pyramid with uneven downsamples
    ],
)
def test_choose_level(base, downsamples, target, level, read_size, resample) -> None:
    choice = choose_level(base, downsamples, target, 224)
    assert (choice.level, choice.read_size, choice.resample) == (level, read_size, resample)
    assert choice.level_mpp == pytest.approx(base * downsamples[level])


def test_choose_level_refuses_upsampling() -> None:
    with pytest.raises(SlideError, match="finer than the slide's finest level"):
        choose_level(0.26, (1, 2), 0.25, 224)  # 4% coarser than the target: beyond the tolerance
    with pytest.raises(SlideError):
        choose_level(0.5, (1,), 0.25, 224)


def test_mpp_from_metadata_override_and_missing(synthetic_slide, slide_without_mpp) -> None:
    with_mpp = open_slide(synthetic_slide.path)
    assert slide_mpp(with_mpp, None, synthetic_slide.path) == (pytest.approx(1.0), "metadata")
    # An explicit override wins over metadata (issue 20 §5: metadata can be wrong, e.g. libvips' 1000 µm/px).
    assert slide_mpp(with_mpp, 0.3, synthetic_slide.path) == (0.3, "override")
    without = open_slide(slide_without_mpp.path)
    assert slide_mpp(without, 0.3, slide_without_mpp.path) == (0.3, "override")
    with pytest.raises(SlideError, match=r"nompp\.tif has no MPP") as info:
        slide_mpp(without, None, slide_without_mpp.path)
    assert "mpp_override" in info.value.fix


def test_open_slide_errors(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "junk.svs").write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="cannot open as a slide"):
        open_slide(tmp_path / "junk.svs")


def _reference(slide: tiffslide.TiffSlide, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    # Independent path: tiffslide's zarr view, padded with white outside the level.
    width, height = slide.level_dimensions[level]
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    out[y0 - y : y1 - y, x0 - x : x1 - x] = np.asarray(slide.zarr_group[str(level)][y0:y1, x0:x1])[..., :3]
    return out


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.ome.tif"])
def test_reader_matches_zarr_on_real_slides(shared_data: Path, name: str) -> None:
    path = shared_data / "wsi" / name
    slide = open_slide(path)
    rng = np.random.default_rng(0)
    for level in range(slide.level_count):
        reader = LevelReader(slide, level)
        assert reader.page is not None  # both are tiled: the fast path is taken
        width, height = slide.level_dimensions[level]
        for _ in range(4):
            x, y = int(rng.integers(-50, width - 50)), int(rng.integers(-50, height - 50))
            np.testing.assert_array_equal(
                reader.read(x, y, 301, 177), _reference(slide, level, x, y, 301, 177)
            )


def test_each_internal_tile_is_decoded_once(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.path)
    reader = LevelReader(slide, 0)
    step = 224  # not a divisor of the 256 px internal tiles: reads straddle tile borders
    for y in range(0, reader.height - step + 1, step):
        for x in range(0, reader.width - step + 1, step):
            reader.read(x, y, step, step)
        reader.forget_above(y + step)
    rows = (reader.height // step) * step
    cols = (reader.width // step) * step
    touched = -(-rows // 256) * -(-cols // 256)
    assert reader.decoded == touched
    assert len(reader._cache) <= -(-cols // 256) * 2  # only a band of tiles is held


def test_fallback_reader_on_untiled_page(tmp_path: Path) -> None:
    import tifffile

    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", image, photometric="rgb", rowsperstrip=16)
    slide = open_slide(tmp_path / "strips.tif")
    reader = LevelReader(slide, 0)
    assert reader.page is None
    np.testing.assert_array_equal(reader.read(10, 250, 600, 100)[:50, :390], image[250:300, 10:400])
    assert (reader.read(10, 250, 600, 100)[50:] == 255).all()


def test_standalone_jpeg_is_the_same_tile(synthetic_slide, shared_data: Path) -> None:
    reader = LevelReader(open_slide(synthetic_slide.path), 0)
    data = standalone_jpeg(reader, 1, 2)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(int) - reader.tile(1, 2)).mean() < 1.0  # decoder rounding only
    # Aperio stores RGB-coded JPEG that a plain decoder would show in false colours: not copied.
    svs = LevelReader(open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs"), 0)
    assert standalone_jpeg(svs, 0, 0) is None


def test_jpeg2000_tiles_are_read(tmp_path: Path) -> None:
    # Many SVS files hold JPEG2000 tiles (decoded by imagecodecs); tiffslide reads this TIFF the same way.
    import tifffile

    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "j2k.tif",
        image,
        photometric="rgb",
        tile=(128, 128),
        compression="jpeg2000",
        compressionargs={"level": 100},
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    slide = open_slide(tmp_path / "j2k.tif")
    reader = LevelReader(slide, 0)
    assert reader.page is not None and slide_mpp(slide, None, tmp_path / "j2k.tif")[0] == pytest.approx(0.5)
    np.testing.assert_array_equal(reader.read(10, 20, 300, 200), _reference(slide, 0, 10, 20, 300, 200))
