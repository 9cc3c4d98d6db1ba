"""TileStream: rank/worker split, determinism, exact resume, multi-FoV weights, image folders, sampling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathssl_cli.data.tiles import TileStream, sample_images
from pathssl_cli.tiling.store import SlideShardWriter, tile_key

SIDE = 8
STEP = 4  # levels per id digit: flat JPEG tiles decode within ±1-2, so ids survive compression


def _colour(tile_id: int) -> np.ndarray:
    """Tile id as a flat colour: red and green carry its two base-64 digits."""
    return np.array([tile_id % 64 * STEP, tile_id // 64 * STEP, 128], np.uint8)


def _jpeg(tile_id: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIDE, SIDE, 3), _colour(tile_id))).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _tile_id(tile: torch.Tensor | np.ndarray) -> int:
    tile = torch.as_tensor(np.asarray(tile))
    if tile.shape[-1] == 3:  # H×W×3 arrays from sample_images
        tile = tile.permute(2, 0, 1)
    red, green = tile[0].float().mean().item(), tile[1].float().mean().item()
    return round(red / STEP) + 64 * round(green / STEP)


def _make_store(
    root: Path, slides: int = 3, per_level: int = 6, mpps: tuple[float, ...] = (0.25, 0.5), first_id: int = 0
) -> dict[int, float]:
    """A store written through the tiling engineer's writer; tile i is a flat tile of grey i·STEP."""
    ids: dict[int, float] = {}
    next_id = first_id
    for s in range(slides):
        writer = SlideShardWriter(root, f"slide{s}", tiles_per_shard=4)
        for mpp in mpps:
            for i in range(per_level):
                key = tile_key(f"slide{s}", mpp, i, 0)
                row = dict(slide=f"slide{s}", mpp=mpp, level=0, x=i, y=0, size=SIDE, tissue=1.0, key=key)
                writer.add(_jpeg(next_id), row)
                ids[next_id] = mpp
                next_id += 1
        writer.commit()
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    root = tmp_path_factory.mktemp("store")
    return root, _make_store(root)


def _ids(stream) -> list[int]:
    return [_tile_id(tile) for tile in stream]


def test_one_epoch_yields_every_tile_once(store) -> None:
    root, ids = store
    stream = TileStream([root], image_size=SIDE, seed=0, shuffle_buffer=5)
    tiles = list(stream)
    assert all(t.dtype == torch.uint8 and t.shape == (3, SIDE, SIDE) for t in tiles)
    assert sorted(_tile_id(t) for t in tiles) == sorted(ids)


def test_rank_split_is_disjoint_and_complete(store) -> None:
    root, ids = store
    per_rank = [_ids(TileStream([root], image_size=SIDE, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # 36 tiles / 3 ranks: equal and no padding
    assert sorted(t for rank in per_rank for t in rank) == sorted(ids)
    # 36 tiles over 5 ranks: 8 each, the 4 extra places wrap around to the start of the epoch
    uneven = [_ids(TileStream([root], image_size=SIDE, seed=1, rank=r, world_size=5)) for r in range(5)]
    assert [len(p) for p in uneven] == [8] * 5
    flat = [t for rank in uneven for t in rank]
    assert set(flat) == set(ids) and len(flat) - len(set(flat)) == 4


def test_order_is_deterministic_per_seed_and_epoch(store) -> None:
    root, _ = store

    def order(seed: int, epoch: int) -> list[int]:
        stream = TileStream([root], image_size=SIDE, seed=seed, shuffle_buffer=8)
        stream.set_epoch(epoch)
        return _ids(stream)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_workers_reproduce_the_rank_stream_and_skip_resumes_exactly(store) -> None:
    root, _ = store
    stream = TileStream([root], image_size=SIDE, seed=2, shuffle_buffer=6, batch_size=4)
    stream.set_epoch(3)
    single = _ids(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    assert [_tile_id(t) for batch in loader for t in batch] == single
    stream.skip(12)  # three batches already consumed before a kill
    resumed = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    assert [_tile_id(t) for batch in resumed for t in batch] == single[12:]
    stream.set_epoch(3)  # set_epoch clears the skip
    assert _ids(stream) == single


def test_mpp_weights_mix_fields_of_view(tmp_path: Path) -> None:
    ids = _make_store(tmp_path, slides=4, per_level=20)  # 80 tiles per level
    stream = TileStream([tmp_path], image_size=SIDE, seed=0, mpp_weights={0.25: 3.0, 0.5: 1.0})
    fractions = []
    for epoch in range(5):
        stream.set_epoch(epoch)
        order = stream.global_order()
        assert len(order) == 160  # an epoch holds as many tiles as the weighted levels
        fractions.append(np.mean([stream.refs[i].mpp == 0.25 for i in order]))
        # the rarer level is never repeated within an epoch before all its tiles were used
        rare = [i for i in order if stream.refs[i].mpp == 0.5]
        assert len(set(rare)) == len(rare)
    assert abs(np.mean(fractions) - 0.75) < 0.04
    only_coarse = TileStream([tmp_path], image_size=SIDE, seed=0, mpp_weights={0.25: 0.0, 0.5: 1.0})
    assert {ids[_tile_id(t)] for t in only_coarse} == {0.5}
    with pytest.raises(ValueError, match="levels present"):
        TileStream([tmp_path], image_size=SIDE, mpp_weights={1.0: 1.0})


def test_image_folders_mix_with_stores_and_are_resized(store, tmp_path: Path) -> None:
    root, ids = store
    folder = tmp_path / "folder" / "class_a"
    folder.mkdir(parents=True)
    for i in range(5):  # PNG is lossless: ids continue after the store's
        Image.fromarray(np.full((12, 12, 3), _colour(100 + i))).save(folder / f"t{i}.png")
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = _colour(105)  # the central square carries the id, the sides are black
    Image.fromarray(wide).save(folder / "wide.png")
    stream = TileStream([root, tmp_path / "folder"], image_size=SIDE, seed=0)
    seen = _ids(stream)
    assert sorted(seen) == sorted([*ids, *range(100, 106)])
    with pytest.raises(FileNotFoundError, match="not found"):
        TileStream([tmp_path / "folder" / "missing"], image_size=SIDE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images"):
        TileStream([tmp_path / "empty"], image_size=SIDE)


def test_an_image_folder_with_its_own_manifest_csv_is_an_image_folder(tmp_path: Path) -> None:
    # Datasets ship a manifest.csv of labels (the shared Kather 2016 sample does); only a store's index, or an
    # older store's manifest.csv beside its shards/, makes a folder a tile store.
    folder = tmp_path / "dataset"
    (folder / "class_a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), _colour(200 + i))).save(folder / "class_a" / f"t{i}.png")
    (folder / "manifest.csv").write_text("path,label\nclass_a/t0.png,class_a\n")
    assert sorted(_ids(TileStream([folder], image_size=SIDE, seed=0))) == [200, 201, 202]
    (folder / "shards").mkdir()  # now it looks like a store of an older pathssl: refused with the fix
    from pathssl_cli.tiling.index import StoreError

    with pytest.raises(StoreError, match="older pathssl"):
        TileStream([folder], image_size=SIDE)


def test_sample_images_is_seeded_and_without_replacement(store) -> None:
    root, ids = store
    first = sample_images([root], 10, seed=0)
    assert len(first) == 10 and all(a.shape == (SIDE, SIDE, 3) and a.dtype == np.uint8 for a in first)
    chosen = [_tile_id(a) for a in first]
    assert len(set(chosen)) == 10 and set(chosen) <= set(ids)
    assert [_tile_id(a) for a in sample_images([root], 10, seed=0)] == chosen
    assert len(sample_images([root], 1000, seed=0)) == len(ids)


def test_real_tiff_tiles_stream_and_fit_stain_statistics(shared_data: Path) -> None:
    from pathssl_cli.augment.stain import fit_stain_stats

    folder = shared_data / "patches" / "nct-crc-he-100k"
    stream = TileStream([folder], image_size=112, seed=0)
    tiles = list(stream)
    assert len(tiles) == 9 and all(t.shape == (3, 112, 112) for t in tiles)
    sample = sample_images([folder], 9, seed=0)
    assert all(a.shape == (224, 224, 3) for a in sample)
    stats = fit_stain_stats(sample, "lab", "normal")
    # H&E tiles are light and pink: high lightness, positive a* (red), small b*
    lightness, red_green, _ = stats.params["mean_loc"]
    assert 40 < lightness < 95 and red_green > 5


# ------------------------------------------------------------------------------------ the index behind it
def _reference_shard_ordered(indices: np.ndarray, shards: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The original formulation: sort by (random shard rank, index)."""
    unique = np.unique(shards[indices])
    shard_rank = np.zeros(int(unique.max()) + 1, dtype=np.int64)
    shard_rank[unique] = rng.permutation(len(unique))
    return indices[np.lexsort((indices, shard_rank[shards[indices]]))]


def test_block_shard_order_equals_the_sorting_reference() -> None:
    from pathssl_cli.data.tiles import _shard_ordered

    rng = np.random.default_rng(0)
    shards = np.repeat(np.arange(40, dtype=np.int32), rng.integers(1, 9, size=40))
    for seed in range(5):
        subset = np.sort(rng.choice(len(shards), size=len(shards) // 2, replace=False)).astype(np.int32)
        for indices in (np.arange(len(shards), dtype=np.int32), subset):
            got = _shard_ordered(indices, shards, np.random.default_rng(seed))
            assert np.array_equal(got, _reference_shard_ordered(indices, shards, np.random.default_rng(seed)))


def test_index_is_cached_by_the_parts_state_and_memory_mapped(tmp_path: Path) -> None:
    from pathssl_cli.data import tile_index

    _make_store(tmp_path, slides=2, per_level=3)
    first = tile_index.open_store(tmp_path)
    assert isinstance(first.offset, np.memmap) and len(first) == 12
    assert tile_index.open_store(tmp_path) is first  # once per process
    (cache,) = (p for p in (tmp_path / ".index").iterdir() if not p.name.startswith("."))
    _make_store(tmp_path, slides=3, per_level=3, first_id=100)  # a third slide joins the store
    second = tile_index.open_store(tmp_path)
    states = [p.name for p in (tmp_path / ".index").iterdir() if not p.name.startswith(".")]
    assert len(second) == 18 and len(states) == 2 and cache.name in states  # a job may still map the old one
    stream = TileStream([tmp_path], image_size=SIDE)
    assert stream.index is second and len(list(stream)) == 18


def test_read_only_store_gets_a_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathssl_cli.data import tile_index

    ids = _make_store(tmp_path / "store", slides=2, per_level=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tile_index.os, "access", lambda path, mode: False)  # as on a read-only share
    assert sorted(_ids(TileStream([tmp_path / "store"], image_size=SIDE, seed=5))) == sorted(ids)
    assert list((tmp_path / "cache" / "pathssl" / "index").rglob("meta.json"))


def _broken(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "store"
    _make_store(root, slides=2, per_level=3)
    return root, sorted((root / "shards").glob("slide1-*.tar"))[0]


@pytest.mark.parametrize("damage", ["missing", "truncated", "stale"])
def test_damaged_store_is_refused_before_work_naming_shard_and_fix(tmp_path: Path, damage: str) -> None:
    from pathssl_cli.tiling.index import StoreError

    root, shard = _broken(tmp_path)
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(data + bytes(1024))
    with pytest.raises(StoreError, match={"missing": "missing", "truncated": "truncated", "stale": "stale"}[damage]) \
            as caught:
        TileStream([root], image_size=SIDE)
    message = str(caught.value)
    assert str(root) in message and shard.name in message and "pathssl tile" in message
    assert caught.value.exit_code == 2


def test_stores_of_an_older_pathssl_get_a_clear_error(tmp_path: Path) -> None:
    from pathssl_cli.tiling.index import StoreError

    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "slide0.csv").write_text("slide,mpp,level,x,y,size,tissue,shard,key\n")
    with pytest.raises(StoreError, match="older pathssl"):
        TileStream([tmp_path], image_size=SIDE)


def test_shard_damaged_mid_stream_names_it_without_a_traceback(tmp_path: Path) -> None:
    from pathssl_cli.data.tile_index import DamagedTile

    root, shard = _broken(tmp_path)
    stream = TileStream([root], image_size=SIDE, seed=0, batch_size=2)  # index checked and opened: all fine
    shard.write_bytes(shard.read_bytes()[:700])  # then the shard is cut short under the running job
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2)
    with pytest.raises(DamagedTile) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert shard.name in message and "pathssl tile" in message and "slide1.parquet" in message
    assert "Traceback" not in message and "checkpoint is kept" in message


def test_a_pickled_stream_reopens_its_index_instead_of_copying_it(store) -> None:
    import pickle

    root, _ = store
    stream = TileStream([root], image_size=SIDE, seed=3, shuffle_buffer=4, mpp_weights={0.25: 1.0, 0.5: 2.0})
    stream.set_epoch(2)
    stream.skip(5)
    data = pickle.dumps(stream)  # what a spawned DataLoader worker receives
    assert len(data) < 2000  # no per-tile array travels
    copy = pickle.loads(data)
    assert np.array_equal(copy.rank_order(), stream.rank_order()) and _ids(copy) == _ids(stream)


def test_a_damaged_part_is_named(tmp_path: Path) -> None:
    from pathssl_cli.tiling.index import StoreError

    _make_store(tmp_path, slides=2, per_level=2)
    (tmp_path / "parts" / "slide1.parquet").write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(StoreError, match=r"slide1\.parquet is damaged"):
        TileStream([tmp_path], image_size=SIDE)
