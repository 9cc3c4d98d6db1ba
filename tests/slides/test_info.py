"""`pathssl slides info`: metadata of files, folders and globs; unreadable slides listed; exit 1 if any failed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.synthetic_slide import write_synthetic_slide


def test_info_on_real_slides_and_a_missing_one(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    wsi = shared_data / "wsi"
    result = runner.invoke(cli, ["slides", "info", str(wsi), "--json"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    svs, ome = rows["CMU-1-Small-Region.svs"], rows["CMU-1-Small-Region-pyramid.ome.tif"]
    assert svs["format"] == "aperio" and svs["reader"] == "tiffslide"
    assert (svs["width"], svs["height"], svs["mpp"]) == (2220, 2967, 0.499)
    assert svs["objective_power"] == 20 and svs["compression"] == "JPEG"
    assert set(svs["associated_images"]) == {"thumbnail", "label", "macro"}
    assert svs["file_size_bytes"] == (wsi / "CMU-1-Small-Region.svs").stat().st_size
    assert ome["format"] == "ome-tiff" and [lv["width"] for lv in ome["levels"]] == [2220, 1110, 555]
    assert ome["levels"][1]["downsample"] > 1.99

    out_csv = tmp_path / "slides.csv"
    result = runner.invoke(cli, ["slides", "info", str(wsi / "*.svs"), str(tmp_path / "gone.svs"),
                                 "--csv", str(out_csv)])
    assert result.exit_code == 1
    assert "gone.svs" in result.output and "file not found" in result.output
    table = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [Path(r["path"]).name for r in table] == ["CMU-1-Small-Region.svs", "gone.svs"]
    assert table[0]["levels"] == "2220x2967@1" and table[1]["error"].startswith("file not found")


def test_missing_mpp_is_shown(tmp_path: Path) -> None:
    write_synthetic_slide(tmp_path / "nompp.tif", width=256, height=256, tile_size=128, n_levels=1,
                          write_mpp=False)
    result = CliRunner().invoke(cli, ["slides", "info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "MISSING" in result.output and "mpp_override" in result.output
    result = CliRunner().invoke(cli, ["slides", "info", str(tmp_path / "nothing*.svs")])
    assert result.exit_code == 1 and "no slides found" in result.output
