"""Tile store: tar members as the standard library writes them, keys, parts, offsets and the consolidated index."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pathssl_cli.tiling import index, store


@pytest.mark.parametrize(("name", "size"), [("a_250nm_0_0.jpg", 0), ("x" * 100, 1), ("k.json", 8**11 - 1)])
def test_ustar_header_is_byte_identical_to_tarfile(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    assert store._ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(ValueError):
        store._ustar_header("y" * 101, 1)


def test_slide_ids_are_unique_dot_free_and_short(tmp_path: Path) -> None:
    a = store.slide_id(tmp_path / "a" / "TCGA-AB.1234.svs")
    b = store.slide_id(tmp_path / "b" / "TCGA-AB.1234.svs")
    assert a != b and a.startswith("TCGA-AB-") and "." not in a
    long_key = store.tile_key(store.slide_id(tmp_path / ("s" * 300 + ".svs")), 0.25, 10**6, 10**6)
    assert len(long_key + ".json") <= 100 and "." not in long_key


def test_parts_commit_and_abort(tmp_path: Path) -> None:
    writer = store.SlideShardWriter(tmp_path, "s1-abc", tiles_per_shard=2)
    for i in range(5):
        row = {
            "slide": "s1",
            "mpp": 0.5,
            "level": 0,
            "x": i,
            "y": 0,
            "size": 8,
            "tissue": 1.0,
            "key": store.tile_key("s1-abc", 0.5, i, 0),
        }
        writer.add(b"jpeg%d" % i, row)
    assert not list((tmp_path / "shards").glob("*.tar"))  # nothing published before commit
    writer.commit()
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [
        f"s1-abc-{i:05d}.tar" for i in range(3)
    ]
    rows = index.read_tiles(tmp_path).to_pylist()
    assert [r["x"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["shard"] == "shards/s1-abc-00002.tar"
    items = [
        item for shard in sorted((tmp_path / "shards").glob("*.tar")) for item in store.iter_shard(shard)
    ]
    assert [(k, j) for k, j, _ in items] == [(r["key"], b"jpeg%d" % r["x"]) for r in rows]
    # The recorded offsets are where the standard library finds each member's data.
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        for r in rows:
            if r["shard"] == f"shards/{shard.name}":
                assert members[f"{r['key']}.jpg"] == (r["offset"], r["nbytes"])
                assert r["shard_bytes"] == shard.stat().st_size
    assert index.consolidate(tmp_path) == 5 and index.consolidated_is_current(tmp_path)
    aborted = store.SlideShardWriter(tmp_path, "s2-def", tiles_per_shard=2)
    aborted.add(b"x", {**rows[0], "key": "s2-def_500nm_0_0"})
    aborted.abort()
    assert not list((tmp_path / "shards").glob("*s2-def*")) and not store.slide_complete(tmp_path, "s2-def")
    # A store copied without its parts is read from the consolidated manifest.parquet.
    for part in (tmp_path / "parts").iterdir():
        part.unlink()
    (tmp_path / "parts").rmdir()
    assert [r["key"] for r in index.read_tiles(tmp_path).to_pylist()] == [r["key"] for r in rows]
