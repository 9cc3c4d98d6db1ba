"""Slide prediction at predict.mpp (tile's level rules), on tissue only, with level-0 output coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tiffslide
from test_train_predict import ThresholdModel, components  # tests/segment is on sys.path under pytest

from pathssl_cli.errors import SpecError
from pathssl_cli.segment.predict import segment_image
from pathssl_cli.segment.slide_scale import ChunkTissue, MppSlideReader
from pathssl_cli.synthetic_slide import write_synthetic_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=0.25, tile_size=128, n_levels=2, seed=2,
                          tissue_fraction=0.3)
    return path


def test_level_and_pixels_follow_the_tile_rules(slide_path: Path) -> None:
    """0.5 µm/px on a 0.25 µm/px slide with a 2x level: level 1 is read as is (no resampling); 0.6 µm/px
    reads level 1 and shrinks it by area averaging; 0.25 reads level 0."""
    slide = tiffslide.TiffSlide(str(slide_path))
    half = MppSlideReader(slide, slide_path, None, 0.5, None)
    assert (half.geometry.level, half.geometry.scale, half.width, half.height) == (1, 2.0, 512, 384)
    expected = np.asarray(slide.read_region((200, 100), 1, (64, 48), as_array=True))[..., :3]
    np.testing.assert_array_equal(half.read(50, 100, 48, 64), expected)
    coarse = MppSlideReader(slide, slide_path, (100, 50, 600, 600), 0.6, None)
    assert coarse.geometry.level == 1 and coarse.geometry.scale == pytest.approx(2.4)
    assert (coarse.width, coarse.height) == (250, 250)
    level1 = np.asarray(slide.read_region((100, 50), 1, (300, 300), as_array=True))[..., :3]
    # The box of 250 grid px is exactly 300 level px here, so OpenCV's area resize is an independent reference
    # (it rounds its float32 sums its own way: within one grey level).
    area = cv2.resize(level1, (250, 250), interpolation=cv2.INTER_AREA)
    assert np.abs(coarse.read(0, 0, 250, 250).astype(np.int16) - area).max() <= 1
    assert MppSlideReader(slide, slide_path, None, 0.25, None).geometry.level == 0


def test_slide_without_mpp_gets_a_clear_error_and_override(tmp_path: Path) -> None:
    path = tmp_path / "nompp.tif"
    write_synthetic_slide(path, width=256, height=256, tile_size=128, n_levels=1, write_mpp=False)
    slide = tiffslide.TiffSlide(str(path))
    with pytest.raises(SpecError, match=r"predict\.mpp_override"):
        MppSlideReader(slide, path, None, 0.25, None)
    reader = MppSlideReader(slide, path, None, 0.5, 0.25)
    assert reader.geometry.mpp_source == "override" and reader.width == 128


def test_glass_is_skipped_and_geometry_is_level0(slide_path: Path, tmp_path: Path) -> None:
    """At 0.5 µm/px (scale 2), chunks without tissue are not predicted, and every JSON/GeoJSON coordinate
    is the level-0 position of the nucleus: the instance-map centroid x 2."""
    slide = tiffslide.TiffSlide(str(slide_path))
    reader = MppSlideReader(slide, slide_path, None, 0.5, None)
    tissue = ChunkTissue(reader)
    assert 0 < tissue.area_mm2() < 1024 * 768 * 0.25**2 / 1e6
    out = segment_image(ThresholdModel(), reader, tmp_path / "pred", "slide", chunk_size=64, chunk_margin=64,
                        postprocess=components, to_level0=reader.to_level0, has_tissue=tissue.has_tissue)
    assert 0 < out.skipped < out.chunks
    everything = segment_image(ThresholdModel(), reader, tmp_path / "all", "slide", chunk_size=64,
                               chunk_margin=64, postprocess=components, to_level0=reader.to_level0)
    assert everything.skipped == 0 and out.count <= everything.count
    inst_map = np.load(out.inst_map)
    records = json.loads(out.instances.read_text())
    assert records and len(records) == out.count
    for rec in records[:20]:
        ys, xs = np.nonzero(inst_map == rec["id"])
        assert rec["centroid"][0] == pytest.approx(2 * xs.mean(), abs=2.0)
        assert rec["centroid"][1] == pytest.approx(2 * ys.mean(), abs=2.0)
        contour = np.array(rec["contour"])
        assert contour[:, 0].max() <= 1024 and contour[:, 1].max() <= 768
    features = json.loads(out.geojson.read_text())["features"]
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    first = next(r for r in records if str(r["id"]) == features[0]["id"])
    np.testing.assert_allclose(ring[:-1], np.array(first["contour"]))


def test_geojson_at_a_pyramid_level_is_in_exact_level0_coordinates(shared_data: Path, tmp_path: Path) -> None:
    """Issue 20 §2: at predict.mpp 1.0 on the OME pyramid (level 1, downsample 2.000337) the nuclei of the
    stand-in model are the dark components of level 1's own pixels, and each one's JSON centroid is its level-1
    centroid times the downsample. Reading level 1 one pixel off put every centroid ~2 level-0 px away."""
    import tifffile
    import torch
    from scipy import ndimage

    from pathssl_cli.slides.readers import open_slide

    path = shared_data / "wsi" / "CMU-1-Small-Region-pyramid.ome.tif"
    slide = open_slide(path, "tiffslide")
    reader = MppSlideReader(slide, path, (1001, 1203, 700, 500), 1.0, None)
    g = reader.geometry
    assert g.level == 1 and g.downsample == pytest.approx(2.000337, abs=1e-6)
    out = segment_image(ThresholdModel(), reader, tmp_path, "pyr", chunk_size=1024, chunk_margin=64,
                        postprocess=components, to_level0=reader.to_level0, overlay=False)
    # The reference: level 1 decoded by tifffile, cut at the level pixel nearest the region's corner.
    lx, ly = round(1001 / g.downsample), round(1203 / g.downsample)
    level1 = tifffile.imread(path, series=0, level=1)[ly : ly + reader.height, lx : lx + reader.width]
    dark = (torch.from_numpy(level1).permute(2, 0, 1).float().div(255.0).mean(0) < 0.5).numpy()
    labels, count = ndimage.label(dark)
    centres = np.array(ndimage.center_of_mass(dark, labels, range(1, count + 1)))[:, ::-1]  # (x, y) level 1
    want = (centres + np.array([lx, ly])) * g.downsample
    got = np.array([r["centroid"] for r in json.loads(out.instances.read_text())])
    want, got = (a[np.lexsort((a[:, 1], a[:, 0]))] for a in (want, got))
    assert count > 50 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
