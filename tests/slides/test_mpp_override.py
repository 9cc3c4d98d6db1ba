"""Issue 20 §5: a wrong MPP in a file's metadata can be overridden, the same way in tile, segment predict and
slides info (`slides.readers.slide_mpp`). A TIFF written by libvips with its default resolution (1 px/mm) says
1000 µm/px; `predict` then planned a grid 4000x larger than level 0 each way even with `mpp_override = 0.25`, and
`tile` refused every field of view. An explicit override wins over metadata and is recorded as the MPP's source;
enlarging more than 2.5x is refused with the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.segment.slide_scale import MppSlideReader
from pathssl_cli.slides.readers import metadata_mpp, open_slide, slide_mpp
from pathssl_cli.synthetic_slide import write_synthetic_slide


@pytest.fixture(scope="module")
def vips_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """768 x 512 px of synthetic tissue scanned at 0.5 µm/px, written with libvips' default resolution tags:
    10 px/cm (vips' 1 px/mm), which readers report as 1000 µm/px."""
    folder = tmp_path_factory.mktemp("vips")
    truth = write_synthetic_slide(folder / "src.tif", width=768, height=512, mpp=0.5, tile_size=128, n_levels=1,
                                  seed=3, write_mpp=False, tissue_fraction=0.6)
    path = folder / "vips.tif"
    tifffile.imwrite(path, tifffile.imread(truth.path), tile=(128, 128), compression="jpeg", photometric="rgb",
                     resolution=(10, 10), resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("reader", ["tiffslide", "openslide"])
def test_the_override_wins_over_metadata(vips_tiff: Path, reader: str) -> None:
    if reader == "openslide":
        pytest.importorskip("openslide", reason="extra 'openslide' not installed: pip install -e '.[openslide]'")
    slide = open_slide(vips_tiff, reader)
    assert metadata_mpp(slide)[0] == pytest.approx(1000.0)
    assert slide_mpp(slide, None, vips_tiff) == (pytest.approx(1000.0), "metadata")
    assert slide_mpp(slide, 0.5, vips_tiff) == (0.5, "override")


def test_predict_refuses_a_4000x_enlargement_and_takes_the_override(vips_tiff: Path) -> None:
    slide = open_slide(vips_tiff, "tiffslide")
    with pytest.raises(SpecError) as err:
        MppSlideReader(slide, vips_tiff, None, 0.25, None)
    message = str(err.value)
    assert "1000" in message and "4000" in message and "2.5" in message and "predict.mpp_override" in message
    reader = MppSlideReader(slide, vips_tiff, None, 0.25, 0.5)
    g = reader.geometry
    assert (g.base_mpp, g.mpp_source, g.level) == (0.5, "override", 0)
    assert (reader.width, reader.height) == (1536, 1024)  # 2x enlargement of 768 x 512: allowed
    # A 20x slide for a 40x model is 2x; 3x is beyond what a model can be applied at.
    with pytest.raises(SpecError, match=r"3\.00x"):
        MppSlideReader(slide, vips_tiff, None, 0.5 / 3, 0.5)


def test_tile_takes_the_override_and_records_it(vips_tiff: Path, tmp_path: Path) -> None:
    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.index import read_slides
    from pathssl_cli.tiling.tiler import run_tile

    spec = tmp_path / "tile.toml"
    spec.write_text(f'kind = "tile"\n[input]\nslides = ["{vips_tiff}"]\nmpp_override = 0.5\n'
                    f'[tiles]\nmpp = [0.5, 1.0]\nsize = 64\nmin_tissue = 0.3\n'
                    f'[output]\ndir = "{tmp_path / "store"}"\n[run]\nworkers = 1\n')
    summary = run_tile(load_spec(spec, (), kind="tile"))
    assert summary["failed"] == 0 and set(summary["tiles_by_mpp"]) == {"0.5", "1.0"}
    (slide,) = summary["per_slide"]
    assert (slide["mpp"], slide["mpp_source"]) == (0.5, "override")
    row = read_slides(tmp_path / "store").to_pylist()[0]
    assert (row["base_mpp"], row["mpp_source"]) == (0.5, "override")


def test_slides_info_takes_the_override(vips_tiff: Path, shared_data: Path) -> None:
    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    result = CliRunner().invoke(cli, ["slides", "info", str(vips_tiff), str(svs), "--mpp-override", "0.25",
                                      "--json"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert (rows["vips.tif"]["mpp"], rows["vips.tif"]["mpp_source"]) == (0.25, "override")
    assert rows["vips.tif"]["metadata_mpp"] == pytest.approx(1000.0)
    assert (rows[svs.name]["mpp"], rows[svs.name]["metadata_mpp"]) == (0.25, 0.499)
    plain = json.loads(CliRunner().invoke(cli, ["slides", "info", str(svs), "--json"]).stdout)[0]
    assert (plain["mpp"], plain["mpp_source"], plain["metadata_mpp"]) == (0.499, "tiffslide.mpp-x", 0.499)
