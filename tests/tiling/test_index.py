"""The store's Parquet index: concurrent array tasks, the per-slide table, pandas queries, consolidation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq
import pytest
import tiffslide
from test_tiler import check_store, tile_keys, write_spec

from pathssl_cli.specs import load_spec
from pathssl_cli.synthetic_slide import write_synthetic_slide
from pathssl_cli.tiling import index
from pathssl_cli.tiling.tiler import run_tile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("six")
    for i in range(6):
        write_synthetic_slide(folder / f"s{i}.tif", width=384, height=320, mpp=1.0, tile_size=128, n_levels=1,
                              seed=20 + i, tissue_fraction=0.6)
    return sorted(str(p) for p in folder.glob("*.tif"))


@pytest.mark.slow  # reason: four interpreters tile at once on the shared cores (~15 s)
def test_concurrent_array_tasks_lose_and_duplicate_nothing(tmp_path: Path, six_slides: list[str]) -> None:
    """Four processes at once into one store: parts 0 and 1 of 3, part 0 again (a resubmitted task), and an
    unsplit run over every slide. Each slide is tiled by exactly one of them; the store equals a clean run's."""
    spec = write_spec(tmp_path, six_slides, tmp_path / "store", output={"tiles_per_shard": 5})
    env = {**os.environ, "PATHSSL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    splits = [["--num-shards", "3", "--shard-index", "0"], ["--num-shards", "3", "--shard-index", "1"],
              ["--num-shards", "3", "--shard-index", "0"], []]
    processes = [subprocess.Popen([sys.executable, "-m", "pathssl_cli", "tile", str(spec), *split], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for split in splits]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read() if process.stderr else ""
    # Every slide is complete once, and tiled ("done") by exactly one process: the others skipped it
    # (complete before they looked) or left it to the process holding its lock ("busy").
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "store").glob("summary*.json"))]
    assert len(list((tmp_path / "store" / "parts").glob("*.parquet"))) == len(six_slides)
    done = [s["path"] for summary in summaries for s in summary["per_slide"] if s["status"] == "done"]
    assert len(summaries) == 3  # parts 0 and 1 of 3 (the resubmitted part 0 overwrote its twin) + the unsplit run
    assert len(done) <= len(six_slides) and len(done) == len(set(done))
    rows = check_store(tmp_path / "store")  # no duplicate member, every row's bytes where the index says
    clean = tmp_path / "clean"
    run_tile(load_spec(spec, [f"output.dir={clean}"]))
    assert tile_keys(tmp_path / "store") == tile_keys(clean)
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in index.read_tiles(clean).to_pylist())
    assert not list((tmp_path / "store" / "shards").glob(".*"))


def test_index_is_queryable_and_records_the_reader(tmp_path: Path, six_slides: list[str]) -> None:
    spec = load_spec(write_spec(tmp_path, six_slides[:2], tmp_path / "store", tiles={"mpp": [1.0, 2.0]}))
    run_tile(spec)
    store = tmp_path / "store"
    summary = json.loads((store / "summary.json").read_text())
    expected = {s["path"]: s["tiles"]["2.0"] for s in summary["per_slide"]}
    # tiles per slide at 2 µm/px, as any Parquet reader of the field sees the parts folder
    tiles = pa_ds.dataset(store / "parts").to_table()
    at_two = tiles.filter(pa_ds.field("mpp") == 2.0).group_by("slide").aggregate([("key", "count")])
    assert dict(zip(at_two["slide"].to_pylist(), at_two["key_count"].to_pylist(), strict=True)) == expected
    try:  # the one line of pandas from the README, where pandas is installed
        import pandas as pd
    except ImportError:
        pass
    else:
        assert pd.read_parquet(store / "parts").query("mpp == 2.0").groupby("slide").size().to_dict() == expected
    slides = pa_ds.dataset(store / "slides").to_table().to_pydict()
    assert sorted(slides["slide"]) == sorted(str(Path(s).resolve()) for s in six_slides[:2])
    assert set(slides["reader"]) == {"tiffslide"} and set(slides["reader_version"]) == {tiffslide.__version__}
    assert set(slides["base_mpp"]) == {1.0} and set(slides["width"]) == {384}
    assert dict(zip(slides["slide"], slides["tiles"], strict=True)) == {
        s["path"]: sum(s["tiles"].values()) for s in summary["per_slide"]}
    assert summary["tiles_in_store"] == tiles.num_rows
    assert not (store / index.CSV_EXPORT).exists()  # the export is written on request only


def test_consolidate_is_on_request_and_tracks_the_parts(tmp_path: Path, six_slides: list[str]) -> None:
    spec = write_spec(tmp_path, six_slides[:3], tmp_path / "store")
    with pytest.raises(Exception, match="once, after all"):
        run_tile(load_spec(spec), num_shards=2, shard_index=0, consolidate=True)
    first = run_tile(load_spec(spec), num_shards=2, shard_index=0)
    assert first["tiles_in_store"] is None  # a part never reads the other parts
    summary = run_tile(load_spec(spec), consolidate=True)  # after the array: tiles what is left, consolidates
    store = tmp_path / "store"
    assert summary["skipped"] == 2 and summary["done"] == 1
    assert index.consolidated_is_current(store)
    consolidated = pq.read_table(store / index.CONSOLIDATED)
    exported = pa_csv.read_csv(store / index.CSV_EXPORT)
    assert consolidated.num_rows == summary["tiles_in_store"] == exported.num_rows
    assert consolidated["key"].to_pylist() == [r["key"] for r in index.read_tiles(store).to_pylist()]
    assert exported["key"].to_pylist() == consolidated["key"].to_pylist()
    run_tile(load_spec(write_spec(tmp_path, six_slides[:4], store)))  # one more slide: the export is now stale
    assert not index.consolidated_is_current(store)


def test_a_split_run_reads_no_other_part(tmp_path: Path, six_slides: list[str], monkeypatch) -> None:
    """N array tasks do index work linear in their own tiles: none reads the store's other parts."""
    spec = load_spec(write_spec(tmp_path, six_slides[:4], tmp_path / "store"))
    run_tile(spec, num_shards=2, shard_index=0)
    mine = {p.name for p in (tmp_path / "store" / "parts").iterdir()}
    opened: list[str] = []
    for name in ("read_table", "read_metadata", "ParquetFile"):
        real = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda path, *a, _real=real, **k: (opened.append(Path(path).name),
                                                                          _real(path, *a, **k))[1])
    monkeypatch.setattr(pa_ds, "dataset", lambda *a, **k: pytest.fail("a split run scanned the index"))
    summary = run_tile(spec, num_shards=2, shard_index=1)
    assert summary["done"] == 2 and not set(opened) & mine
