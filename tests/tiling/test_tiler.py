"""End to end: `pathssl tile` on synthetic and real slides, bad input, resume after kill -9, sharding."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tiffslide

from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.specs import load_spec
from pathssl_cli.tiling.index import CSV_EXPORT, consolidate, read_slides, read_tiles
from pathssl_cli.tiling.store import iter_shard
from pathssl_cli.tiling.tiler import run_tile


def write_spec(folder: Path, slides: list[str], store: Path, **tables: dict) -> Path:
    sections = {
        "input": {"slides": slides},
        "tiles": {"mpp": [2.0], "size": 64, "min_tissue": 0.5},
        "output": {"dir": str(store), "tiles_per_shard": 7},
        "run": {"workers": 1},
    }
    for name, values in tables.items():
        sections[name] = {**sections.get(name, {}), **values}
    lines = ['kind = "tile"']
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = folder / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tile_keys(store: Path) -> list[str]:
    return sorted(
        key for shard in sorted((store / "shards").glob("*.tar")) for key, _, _ in iter_shard(shard)
    )


def check_store(store: Path) -> list[dict]:
    """Every manifest row has exactly one decodable tile in its shard and vice versa."""
    rows = read_tiles(store).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and all("." not in k for k in keys)
    found = {}
    for shard in sorted((store / "shards").glob("*.tar")):
        for key, jpeg, meta in iter_shard(shard):
            assert key not in found, f"duplicate tile {key}"
            found[key] = (shard, jpeg, meta)
    assert set(found) == set(keys)
    for row in rows:
        shard, jpeg, meta = found[row["key"]]
        assert row["shard"] == f"shards/{shard.name}"
        assert meta == {**{k: row[k] for k in meta}, "tissue": meta["tissue"]}
        assert meta["tissue"] == pytest.approx(row["tissue"])
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (row["size"], row["size"], 3)
    consolidate(store)  # the CSV export holds the same tiles
    with (store / CSV_EXPORT).open() as fh:
        assert sorted(r["key"] for r in csv.DictReader(fh)) == sorted(keys)
    return rows


def test_tiles_land_on_tissue_and_match_the_slide(tmp_path: Path, synthetic_slide, second_slide) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            [str(synthetic_slide.path), str(second_slide.path)],
            tmp_path / "store",
            tiles={"mpp": [1.0, 2.5], "size": 64},
        )
    )
    summary = run_tile(spec)
    assert summary["failed"] == 0 and summary["done"] == 2
    rows = check_store(tmp_path / "store")
    assert {r["mpp"] for r in rows} == {1.0, 2.5}
    assert {r["level"] for r in rows if r["mpp"] == 2.5} == {1}  # 2.0 µm/px level, shrunk by 1.25
    truths = {str(synthetic_slide.path): synthetic_slide, str(second_slide.path): second_slide}
    shards = {}
    on_tissue = []
    for row in rows:
        truth = truths[row["slide"]]
        extent = row["size"] * row["mpp"] / truth.mpp
        d = truth.mask_downsample
        window = truth.tissue_mask[
            int(row["y"] // d) : int((row["y"] + extent) // d),
            int(row["x"] // d) : int((row["x"] + extent) // d),
        ]
        on_tissue.append(window.mean())
    # Every tile touches true tissue; the detector's mask differs from the truth only along edges.
    assert min(on_tissue) > 0 and np.mean(on_tissue) >= 0.85
    # Pixels: each tile equals a naive read of the same place (level 0 region, area-resized).
    rng = np.random.default_rng(0)
    for row in rng.choice(rows, 6, replace=False):
        shard = shards.setdefault(
            row["shard"], {k: j for k, j, _ in iter_shard(tmp_path / "store" / row["shard"])}
        )
        tile = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(shard[row["key"]], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        ).astype(np.float32)
        extent = round(row["size"] * row["mpp"] / 1.0)
        region = tiffslide.TiffSlide(row["slide"]).read_region(
            (row["x"], row["y"]), 0, (extent, extent), as_array=True
        )[..., :3]
        naive = cv2.resize(region, (row["size"],) * 2, interpolation=cv2.INTER_AREA).astype(np.float32)
        assert (
            np.abs(tile - naive).mean() < 6.0
        )  # JPEG twice (slide and tile) and level-1 vs level-0 area mean
    qc = sorted((tmp_path / "store" / "qc").glob("*.png"))
    assert len(qc) == 2 and cv2.imread(str(qc[0])) is not None
    assert json.loads((tmp_path / "store" / "run.json").read_text())["status"] == "done"


def test_real_slides(tmp_path: Path, shared_data: Path) -> None:
    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    ome = shared_data / "wsi" / "CMU-1-Small-Region-pyramid.ome.tif"
    spec = load_spec(
        write_spec(
            tmp_path,
            [str(svs), str(ome)],
            tmp_path / "store",
            tiles={"mpp": [0.5, 2.0], "size": 128, "min_tissue": 0.5},
        )
    )
    summary = run_tile(spec)
    assert summary["failed"] == 0
    rows = check_store(tmp_path / "store")
    levels = {(Path(r["slide"]).name, r["mpp"]): r["level"] for r in rows}
    # SVS: one level at 0.499 (within 2% of 0.5), so 2.0 µm/px is read at level 0 and shrunk.
    assert levels[(svs.name, 0.5)] == 0 and levels[(svs.name, 2.0)] == 0
    # OME pyramid 0.499 / 0.998 / 1.997 µm/px: 2.0 comes straight from level 2.
    assert levels[(ome.name, 0.5)] == 0 and levels[(ome.name, 2.0)] == 2
    counts = {(Path(r["slide"]).name, r["mpp"]) for r in rows}
    assert len(counts) == 4
    per_slide = {Path(s["path"]).name: s["tiles"] for s in summary["per_slide"]}
    assert per_slide[svs.name]["0.5"] > 20


def test_bad_slides_are_reported_and_others_complete(
    tmp_path: Path, synthetic_slide, slide_without_mpp
) -> None:
    truncated = tmp_path / "truncated.tif"
    data = synthetic_slide.path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.tif"
    from pathssl_cli.synthetic_slide import write_synthetic_slide

    write_synthetic_slide(
        empty, width=256, height=256, mpp=1.0, tile_size=128, n_levels=1, tissue_fraction=0.0001
    )
    tiny = tmp_path / "tiny.tif"
    write_synthetic_slide(tiny, width=112, height=112, mpp=1.0, tile_size=16, n_levels=1, tissue_fraction=0.9)
    slides = [
        str(synthetic_slide.path),
        str(truncated),
        str(slide_without_mpp.path),
        str(empty),
        str(tmp_path / "missing.svs"),
        str(tiny),
    ]
    # 64 px at 2 µm/px: 128 µm > 112 µm. A missing literal path is a spec error (test_tile_spec.py); unchecked,
    # as a slide that vanished after validation, the run reports it per slide.
    spec = load_spec(write_spec(tmp_path, slides, tmp_path / "store"), check_inputs=False)
    with pytest.raises(WorkFailed, match="5 of 6 slide"):
        run_tile(spec)
    with (tmp_path / "store" / "errors.csv").open() as fh:
        errors = {Path(r["slide"]).name: r for r in csv.DictReader(fh)}
    assert set(errors) == {"truncated.tif", "nompp.tif", "empty.tif", "missing.svs", "tiny.tif"}
    assert "smaller than one 64 px tile at 2.0 µm/px" in errors["tiny.tif"]["error"]
    assert (
        "truncated" in errors["truncated.tif"]["error"] or "cannot open" in errors["truncated.tif"]["error"]
    )
    assert "no MPP" in errors["nompp.tif"]["error"] and "mpp_override" in errors["nompp.tif"]["fix"]
    assert errors["empty.tif"]["error"] == "no tissue found"
    rows = check_store(tmp_path / "store")
    assert {Path(r["slide"]).name for r in rows} == {"syn.tif"}
    # allow_failures: same outcome, exit 0; the no-MPP slide is tiled when the CSV gives its mpp.
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{slide_without_mpp.path},1.0\n{truncated},\n")
    spec = load_spec(write_spec(tmp_path, [str(listing)], tmp_path / "store", run={"allow_failures": True}))
    summary = run_tile(spec)
    assert summary["failed"] == 1 and summary["done"] == 1
    assert {Path(r["slide"]).name for r in check_store(tmp_path / "store")} == {"syn.tif", "nompp.tif"}


def test_invalid_spec_fails_before_work(tmp_path: Path, synthetic_slide) -> None:
    with pytest.raises(SpecError, match=r"tiles\.mpp"):
        load_spec(write_spec(tmp_path, [str(synthetic_slide.path)], tmp_path / "s", tiles={"mpp": [-1.0]}))
    with pytest.raises(SpecError, match="no slide matched"):
        load_spec(write_spec(tmp_path, [str(tmp_path / "*.nothing")], tmp_path / "s"))
    result = subprocess.run(
        [sys.executable, "-m", "pathssl_cli", "tile", str(tmp_path / "spec.toml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no slide matched" in result.stderr and not (tmp_path / "s").exists()
    # A store made with other settings is refused rather than mixed.
    run_tile(load_spec(write_spec(tmp_path, [str(synthetic_slide.path)], tmp_path / "s")))
    with pytest.raises(SpecError, match="other settings"):
        run_tile(
            load_spec(write_spec(tmp_path, [str(synthetic_slide.path)], tmp_path / "s", tiles={"size": 32}))
        )


def test_copy_through_when_output_tile_is_an_internal_tile(tmp_path: Path, second_slide) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            [str(second_slide.path)],
            tmp_path / "store",
            tiles={"mpp": [1.0], "size": 128, "min_tissue": 0.3},
        )
    )
    summary = run_tile(spec)
    assert summary["tiles_written"] > 0 and summary["tiles_copied_through"] == summary["tiles_written"]
    slide = tiffslide.TiffSlide(second_slide.path)
    for row in check_store(tmp_path / "store")[:5]:
        jpeg = {k: j for k, j, _ in iter_shard(tmp_path / "store" / row["shard"])}[row["key"]]
        tile = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        region = slide.read_region((row["x"], row["y"]), 0, (128, 128), as_array=True)[..., :3]
        assert np.abs(tile.astype(int) - region).mean() < 1.0


def test_disjoint_shard_indices_add_up(
    tmp_path: Path, synthetic_slide, second_slide, slide_without_mpp, monkeypatch: pytest.MonkeyPatch
) -> None:
    slides = [str(synthetic_slide.path), str(second_slide.path), str(slide_without_mpp.path)]
    full = load_spec(
        write_spec(tmp_path, slides, tmp_path / "full", input={"mpp_override": 1.0}, run={"workers": 2})
    )  # the process pool path
    assert run_tile(full)["done"] == 3
    parts = load_spec(write_spec(tmp_path, slides, tmp_path / "parts", input={"mpp_override": 1.0}))
    first = run_tile(parts, num_shards=2, shard_index=0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # the second part as torchrun would start it
    monkeypatch.setenv("RANK", "1")
    second = run_tile(parts)
    done = [{s["path"] for s in summary["per_slide"]} for summary in (first, second)]
    assert not done[0] & done[1] and done[0] | done[1] == {str(Path(s).resolve()) for s in slides}
    assert (tmp_path / "parts" / "errors-1-of-2.csv").exists()
    assert tile_keys(tmp_path / "parts") == tile_keys(tmp_path / "full")
    assert [r["key"] for r in read_tiles(tmp_path / "parts").to_pylist()] == [
        r["key"] for r in read_tiles(tmp_path / "full").to_pylist()
    ]


def test_resume_after_kill_gives_the_same_tiles(
    tmp_path: Path, synthetic_slide, second_slide, slide_without_mpp
) -> None:
    slides = [str(synthetic_slide.path), str(second_slide.path), str(slide_without_mpp.path)]
    spec = write_spec(
        tmp_path,
        slides,
        tmp_path / "store",
        input={"mpp_override": 1.0},
        tiles={"mpp": [1.0, 2.0], "size": 64, "min_tissue": 0.2},
        output={"tiles_per_shard": 3},
    )
    env = {**os.environ, "PATHSSL_PROGRESS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pathssl_cli", "tile", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = tmp_path / "store" / "shards"
    # Kill as soon as the first shard file exists (partial or published): mid-slide, mid-run.
    while not (shards.is_dir() and any(shards.iterdir())):
        try:
            process.wait(timeout=0.01)  # the poll interval; returns at once if the run already ended
            break
        except subprocess.TimeoutExpired:
            continue
    # Slides remain to tile after the first shard file appears: the run cannot have ended yet.
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # Whatever state it left, every published part is consistent.
    if (tmp_path / "store" / "parts").is_dir() and any((tmp_path / "store" / "parts").iterdir()):
        check_store(tmp_path / "store")
    rerun = subprocess.run(
        [sys.executable, "-m", "pathssl_cli", "tile", str(spec)], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    rows = check_store(tmp_path / "store")
    assert not list(shards.glob(".*"))  # no partial shards left behind
    clean = tmp_path / "clean"
    run_tile(load_spec(spec, [f"output.dir={clean}"]))
    assert [r["key"] for r in rows] == [r["key"] for r in read_tiles(clean).to_pylist()]
    assert tile_keys(tmp_path / "store") == tile_keys(clean)
    shutil.rmtree(clean)


@pytest.mark.parametrize("name", ["tiny.toml", "tcga_two_fov.toml"])
def test_shipped_specs_validate(shared_data: Path, name: str) -> None:
    spec = load_spec(Path(__file__).resolve().parents[2] / "specs" / "tile" / name)
    assert spec.kind == "tile" and spec.tiles.mpp_values()


def test_field_of_view_finer_than_the_slide_is_skipped_for_that_slide(tmp_path: Path, second_slide) -> None:
    spec = load_spec(
        write_spec(
            tmp_path, [str(second_slide.path)], tmp_path / "store", tiles={"mpp": ["40x", 2.0], "size": 64}
        )
    )  # the slide is 1 µm/px: no 0.25
    summary = run_tile(spec)
    (slide,) = summary["per_slide"]
    assert slide["status"] == "done" and set(slide["tiles"]) == {"2.0"} and slide["tiles"]["2.0"] > 0
    assert "finer than the slide's finest level" in slide["notes"][0]


def test_cli_shard_arguments(tmp_path: Path, second_slide, slide_without_mpp) -> None:
    from click.testing import CliRunner

    from pathssl_cli.cli import cli

    spec = write_spec(
        tmp_path,
        [str(second_slide.path), str(slide_without_mpp.path)],
        tmp_path / "store",
        input={"mpp_override": 1.0},
    )
    bad = CliRunner().invoke(cli, ["tile", str(spec), "--num-shards", "2", "--shard-index", "2"])
    assert bad.exit_code == 2 and not (tmp_path / "store").exists()
    ok = CliRunner().invoke(cli, ["tile", str(spec), "--num-shards", "2", "--shard-index", "1"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "store" / "summary-1-of-2.json").read_text())
    assert summary["slides"] == 1 and summary["part"] == {"index": 1, "count": 2, "source": "arguments"}


def test_every_opened_slide_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second_slide,
                                      slide_without_mpp) -> None:
    """A tiling worker goes through thousands of slides: each is closed when done, tiled or failed (the no-MPP
    slide fails after it was opened), instead of holding its file handle until garbage collection."""
    from pathssl_cli.tiling import slide_tiler

    real_open = slide_tiler.open_slide
    opened: list[str] = []
    closed: list[str] = []

    def recording_open(path: Path, reader: str = "auto") -> object:
        slide = real_open(path, reader)
        real_close = slide.close

        def close() -> None:
            closed.append(Path(path).name)
            real_close()

        slide.close = close
        opened.append(Path(path).name)
        return slide

    monkeypatch.setattr(slide_tiler, "open_slide", recording_open)
    slides = [str(second_slide.path), str(slide_without_mpp.path)]
    spec = load_spec(write_spec(tmp_path, slides, tmp_path / "store", run={"allow_failures": True}))
    summary = run_tile(spec)
    assert summary["done"] == 1 and summary["failed"] == 1
    assert sorted(opened) == ["nompp.tif", "syn2.tif"]
    assert sorted(closed) == sorted(opened)


def test_resuming_with_another_reader_is_refused_unless_forced(tmp_path: Path, synthetic_slide,
                                                               second_slide) -> None:
    """Issue 20 §5: the reader was not in the store's settings, so a resumed store could mix tiffslide and
    OpenSlide tiles (for the OME pyramid they even choose different levels). Another reader is exit 2 naming both
    unless --force-reader; a store whose tiling.json predates the field is judged by its slides' readers."""
    pytest.importorskip("openslide", reason="extra 'openslide' not installed: pip install -e '.[openslide]'")
    from click.testing import CliRunner

    from pathssl_cli.cli import cli

    store = tmp_path / "store"
    first = write_spec(tmp_path, [str(synthetic_slide.path)], store, input={"reader": "tiffslide"})
    assert run_tile(load_spec(first))["done"] == 1
    both = [str(synthetic_slide.path), str(second_slide.path)]
    spec = write_spec(tmp_path, both, store, input={"reader": "openslide"})
    result = CliRunner().invoke(cli, ["tile", str(spec)])
    assert result.exit_code == 2, result.output
    assert "'tiffslide'" in result.output and "'openslide'" in result.output and "--force-reader" in result.output
    assert len(list((store / "parts").glob("*.parquet"))) == 1  # nothing was added

    marker = json.loads((store / "tiling.json").read_text())
    assert marker["reader"] == "tiffslide"
    del marker["reader"]  # as a store written before the reader was recorded
    (store / "tiling.json").write_text(json.dumps(marker))
    result = CliRunner().invoke(cli, ["tile", str(spec)])
    assert result.exit_code == 2 and "tiffslide" in result.output, result.output

    result = CliRunner().invoke(cli, ["tile", str(spec), "--force-reader"])
    assert result.exit_code == 0, result.output
    readers = {row["reader"] for row in read_slides(store).to_pylist()}
    assert readers == {"tiffslide", "openslide"}
    assert json.loads((store / "run.json").read_text())["reader_forced"] == {"store": ["tiffslide"],
                                                                             "now": "openslide"}
