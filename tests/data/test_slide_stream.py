"""Pre-training straight from slides (issue 23): the coordinate index and its reuse, determinism across worker
counts, resume, disjoint ranks, magnification sampling and scale, JPEG 2000, and bad slides."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from pathssl_cli.data import slide_index
from pathssl_cli.data.slide_arrays import SlideArrays, open_slide_index
from pathssl_cli.data.slide_index import CoordSettings, coords_path
from pathssl_cli.data.slide_stream import MppSampling, SlideStream
from pathssl_cli.synthetic_slide import write_synthetic_slide

SIZE = 32  # px
EQUAL = MppSampling(values=(1.0, 2.0), weights=(1.0, 1.0))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, float | None]]:
    """Four 512 px synthetic slides at 1 µm/px with levels at 1, 2 and 4 µm/px; the last is JPEG 2000."""
    folder = tmp_path_factory.mktemp("slides")
    for i in range(4):
        truth = write_synthetic_slide(folder / f"s{i}.tif", width=512, height=512, mpp=1.0, tile_size=128,
                                      n_levels=3, seed=40 + i, tissue_fraction=0.5,
                                      compression="jpeg2000" if i == 3 else "jpeg")
        # the true tissue (16 px cells), one cell wider: the detector's closing reaches a little beyond it
        _TRUTH[str(truth.path.resolve())] = cv2.dilate(truth.tissue_mask.astype(np.uint8), np.ones((3, 3))) > 0
    return [(p.resolve(), None) for p in sorted(folder.glob("*.tif"))]


_TRUTH: dict[str, np.ndarray] = {}


@pytest.fixture(scope="module")
def index(slides, tmp_path_factory: pytest.TempPathFactory) -> SlideArrays:
    return open_slide_index(slides, tmp_path_factory.mktemp("coords"), CoordSettings())


def _stream(index, **kwargs) -> SlideStream:
    options = {"size": SIZE, "mpp": EQUAL, "seed": 0, "patches_per_visit": 4, "pool": 2, "batch_size": 4}
    return SlideStream(index, **{**options, **kwargs})


def _images(stream) -> list[torch.Tensor]:
    return list(stream)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------ the coordinate index
def test_the_index_is_computed_once_and_then_only_mapped(slides, tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    real = slide_index.compute_coords
    monkeypatch.setattr(slide_index, "compute_coords", lambda s, *a: (calls.append(s), real(s, *a))[1])
    first = open_slide_index(slides, tmp_path, CoordSettings())
    assert len(calls) == len(slides) and len(first) == len(slides) and not first.bad
    assert isinstance(first.cell, np.memmap) and first.cell.dtype == np.uint32
    calls.clear()
    again = open_slide_index(slides, tmp_path, CoordSettings())
    assert calls == [] and again.pins[0]["state"] == first.pins[0]["state"]
    os.utime(slides[1][0])  # the slide file changed: only its row is computed again
    changed = open_slide_index(slides, tmp_path, CoordSettings())
    assert calls == [slides[1][0]] and changed.pins[0]["state"] != first.pins[0]["state"]
    calls.clear()
    open_slide_index(slides, tmp_path, CoordSettings(mpp_override=0.5))  # other settings: every row again
    assert len(calls) == len(slides)


def test_tile_coords_only_writes_the_rows_pretraining_reuses(slides, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from pathssl_cli.cli import cli

    spec = tmp_path / "tile.toml"
    listed = ", ".join(f'"{s}"' for s, _ in slides[:2])
    spec.write_text(f'kind = "tile"\n[input]\nslides = [{listed}]\n[output]\ndir = "{tmp_path / "store"}"\n'
                    '[run]\nworkers = 1\n')
    result = CliRunner().invoke(cli, ["tile", str(spec), "--coords-only"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "store" / "shards").exists()  # no tile written
    monkeypatch.setattr(slide_index, "compute_coords", lambda *a: pytest.fail("a row was computed again"))
    index = open_slide_index(slides[:2], tmp_path / "store", CoordSettings())
    assert index.paths == [str(s) for s, _ in slides[:2]]

    # --consolidate: a first build at scale reads one file; a row changed since is read from its own file
    from pathssl_cli.data import slide_arrays

    result = CliRunner().invoke(cli, ["tile", str(spec), "--coords-only", "--consolidate"])
    assert result.exit_code == 0, result.output
    read: list[list[str]] = []
    real_dataset = slide_arrays.pa_ds.dataset
    monkeypatch.setattr(slide_arrays.pa_ds, "dataset", lambda files, **k: (read.append(files),
                                                                           real_dataset(files, **k))[1])
    shutil.rmtree(tmp_path / "store" / ".index")  # a node that has not built this state yet
    fresh = open_slide_index(slides[:2], tmp_path / "store", CoordSettings())
    assert read == [] and fresh.paths == index.paths and np.array_equal(fresh.cell, index.cell)
    changed = coords_path(tmp_path / "store", slides[1][0])
    changed.write_bytes(changed.read_bytes())  # rewritten: its consolidated copy is no longer current
    again = open_slide_index(slides[:2], tmp_path / "store", CoordSettings())
    assert read == [[str(changed)]] and np.array_equal(again.cell, index.cell)


def test_the_grid_is_where_the_tissue_is(index) -> None:
    """Sampled patch centres lie in the synthetic slide's true tissue (the detector is `pathssl tile`'s)."""
    stream = _stream(index, mpp=MppSampling(values=(1.0,), weights=(1.0,)), min_tissue=0.0)
    inside = []
    for where in stream.describe(list(range(0, len(stream), 3))):
        cx, cy = where["x"] + where["extent"] / 2, where["y"] + where["extent"] / 2
        inside.append(bool(_TRUTH[where["slide"]][int(cy // 16), int(cx // 16)]))
    assert len(inside) > 20 and np.mean(inside) > 0.9


# ---------------------------------------------------------------------------- determinism, resume, ranks
def test_the_sequence_is_the_same_for_any_worker_count_and_resumes_exactly(index) -> None:
    stream = _stream(index)
    stream.set_epoch(2)
    alone = _images(stream)
    assert len(alone) == len(stream) > 8
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    assert _same([t for batch in loader for t in batch], alone)
    stream.skip(8)  # two batches consumed before a kill -9
    resumed = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
    assert _same([t for batch in resumed for t in batch], alone[8:])
    stream.set_epoch(3)
    assert not _same(_images(stream)[:8], alone[:8])
    fresh = _stream(index)  # a new process with the same seed: the same epoch
    fresh.set_epoch(2)
    assert _same(_images(fresh), alone)


def test_ranks_read_disjoint_slides_of_equal_length(index) -> None:
    world = 2
    ranks = [_stream(index, rank=r, world_size=world) for r in range(world)]
    shares = [set(r.rank_slides().tolist()) for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(len(index)))
    assert len(ranks[0]) == len(ranks[1])
    for rank, share in zip(ranks, shares, strict=True):
        assert set(rank.visit_slides().tolist()) <= share
        assert {w["slide"] for w in rank.describe(list(range(len(rank))))} <= {index.paths[s] for s in share}
    # fewer slides than ranks: every rank reads every slide, at positions of its own
    many = [_stream(index, rank=r, world_size=6) for r in (0, 1)]
    assert len(many[0].rank_slides()) == len(index)
    assert not _same(_images(many[0]), _images(many[1]))


def test_visits_read_several_patches_of_one_slide_and_mix_the_pool(index) -> None:
    stream = _stream(index, patches_per_visit=4, pool=2)
    visits = stream.visit_slides()
    slides = [w["slide"] for w in stream.describe(list(range(len(stream))))]
    for v, slide in enumerate(visits.tolist()):
        assert set(slides[4 * v : 4 * v + 4]) <= {index.paths[slide]}
    assert (visits[1:] != visits[:-1]).mean() > 0.6  # consecutive visits alternate between the pool's slides


# ----------------------------------------------------------------------------------- fields of view
def test_weighted_fields_of_view_follow_their_weights(index) -> None:
    from pathssl_cli.data.slide_stream import _Plan

    mpp = MppSampling(values=(0.25, 1.0, 2.0, 4.0), weights=(5.0, 1.0, 2.0, 1.0))
    stream = _stream(index, mpp=mpp, patches_per_visit=50)
    plan = _Plan(stream, 0)
    drawn = np.concatenate([plan._visit_draws(v, 0, int(plan.visits[v % len(plan.visits)]))[1]
                            for v in range(400)])
    counts = {m: int(np.sum(drawn == m)) for m in mpp.values}
    assert counts[0.25] == 0  # finer than the slides' level 0: no upsampling, as `pathssl tile`
    n = len(drawn)
    for m, p in ((1.0, 0.25), (2.0, 0.5), (4.0, 0.25)):
        assert abs(counts[m] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (m, counts)


def test_log_uniform_fields_of_view_are_uniform_in_log(index) -> None:
    from pathssl_cli.data.slide_stream import _Plan

    stream = _stream(index, mpp=MppSampling(log_uniform=(0.5, 4.0)), patches_per_visit=50)
    plan = _Plan(stream, 0)
    drawn = np.concatenate([plan._visit_draws(v, 0, int(plan.visits[0]))[1] for v in range(200)])
    low = 1.0 / 1.02  # the slides' level 0 (1 µm/px) within pathssl tile's 2% tolerance
    u = np.log(drawn / low) / math.log(4.0 / low)
    assert drawn.min() >= low and drawn.max() <= 4.0
    # Kolmogorov-Smirnov against uniform: 1.63/sqrt(n) is the 1% critical value
    ks = np.max(np.abs(np.sort(u) - (np.arange(1, len(u) + 1) - 0.5) / len(u)))
    assert ks < 1.63 / math.sqrt(len(u))


@pytest.mark.parametrize("mpp", [1.0, 1.5, 2.0, 4.0])
def test_a_patch_is_the_region_of_its_field_of_view_read_at_the_best_level(slides, index, mpp: float) -> None:
    """Re-derived with tifffile: the level's own pixels at the patch's position, area-resized to SIZE."""
    stream = _stream(index, mpp=MppSampling(values=(mpp,), weights=(1.0,)), min_tissue=0.0)
    expected_level = {1.0: 0, 1.5: 0, 2.0: 1, 4.0: 2}[mpp]  # the coarsest level at least as fine
    images = _images(stream)[:6]
    for image, where in zip(images, stream.describe(list(range(6))), strict=True):
        assert where["level"] == expected_level and where["extent"] == pytest.approx(SIZE * mpp)
        with tifffile.TiffFile(where["slide"]) as tif:
            level = tif.series[0].levels[expected_level].asarray()
        ds = 2**expected_level
        n = round(SIZE * mpp / ds)
        x, y = int(where["x"] / ds + 0.5), int(where["y"] / ds + 0.5)
        region = level[y : y + n, x : x + n]
        if n != SIZE:
            region = cv2.resize(region, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), region)


def test_the_min_tissue_check_is_made_on_the_patch(index) -> None:
    from pathssl_cli.data.slide_stream import patch_tissue_fraction

    strict = _stream(index, min_tissue=0.9, max_tries=8)
    loose = _stream(index, min_tissue=0.0)
    assert np.mean([w["tissue"] for w in strict.describe(list(range(24)))]) > \
        np.mean([w["tissue"] for w in loose.describe(list(range(24)))])
    glass = np.full((SIZE, SIZE, 3), 245, np.uint8)
    stained = glass.copy()
    stained[:, : SIZE // 2] = (200, 100, 160)  # saturated pink on the left half
    assert patch_tissue_fraction(glass, 20) == 0 and patch_tissue_fraction(stained, 20) == 0.5


# ---------------------------------------------------------------------------------------------- bad slides
def test_unreadable_missing_and_vanishing_slides_are_skipped_and_listed(slides, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    good = []
    for slide, _ in slides[:3]:
        shutil.copy(slide, folder / slide.name)
        good.append((folder / slide.name, None))
    truncated = folder / "cut.tif"
    truncated.write_bytes(slides[0][0].read_bytes()[:3000])
    listed = [*good, (truncated, None), (folder / "gone.svs", None)]
    index = open_slide_index(listed, tmp_path / "coords", CoordSettings())
    assert len(index) == 3 and {Path(p).name for p, _ in index.bad} == {"cut.tif", "gone.svs"}
    log = tmp_path / "bad.tsv"
    stream = _stream(index, bad_slides_log=log)
    expected = len(stream)
    good[1][0].unlink()  # vanishes after indexing, as on a purged scratch file system mid-run
    images = _images(stream)
    assert len(images) == expected  # every sample is still made, from the other slides
    assert log.read_text().startswith(f"{good[1][0]}\t")
    again = _images(stream)
    assert _same(images, again)  # deterministic whatever was discovered earlier


def test_a_spawned_worker_reopens_the_pinned_index(index) -> None:
    import pickle

    stream = _stream(index)
    data = pickle.dumps(stream)
    assert len(data) < 4000  # no per-cell array travels
    assert _same(_images(pickle.loads(data)), _images(stream))


def test_slides_without_mpp_follow_the_tile_commands_rules(tmp_path: Path) -> None:
    """No MPP in the metadata: left out with the fix named, unless data.mpp_override or a CSV `mpp` gives one."""
    import pyarrow.parquet as pq

    from pathssl_cli.specs.tile import resolve_slide_items

    slide = write_synthetic_slide(tmp_path / "nompp.tif", width=512, height=512, mpp=1.0, tile_size=128, n_levels=1,
                                  seed=7, tissue_fraction=0.5, write_mpp=False).path.resolve()
    listed = [(slide, None)]
    left_out = open_slide_index(listed, tmp_path / "a", CoordSettings())
    assert len(left_out) == 0 and "no MPP" in left_out.bad[0][1] and "mpp_override" in left_out.bad[0][1]
    overridden = open_slide_index(listed, tmp_path / "b", CoordSettings(mpp_override=1.0))
    assert len(overridden) == 1 and overridden.base_mpp[0] == 1.0
    assert pq.read_table(coords_path(tmp_path / "b", slide)).column("mpp_source").to_pylist() == ["override"]
    (tmp_path / "list.csv").write_text(f"path,mpp\n{slide},0.5\n")
    from_csv = open_slide_index(resolve_slide_items([str(tmp_path / "list.csv")]), tmp_path / "c", CoordSettings())
    assert from_csv.base_mpp.tolist() == [0.5]


def _reference(where: dict, size: int) -> np.ndarray:
    """The patch decoded in full from level 0 with tifffile and averaged over r × r blocks (r = the decode scale):
    what libjpeg's scaled IDCT stands for, at the same pixel grid (positions on multiples of r)."""
    with tifffile.TiffFile(where["slide"]) as tif:
        level = tif.series[0].levels[0].asarray()
    r = where["reduce"]
    n = round(round(where["extent"]) / r)
    x, y = int(where["x"] / r + 0.5) * r, int(where["y"] / r + 0.5) * r
    block = level[y : y + n * r, x : x + n * r].reshape(n, r, n, r, 3).mean(axis=(1, 3))
    assert n == size
    return np.rint(block).astype(np.uint8)


@pytest.mark.parametrize("mpp", [2.0, 4.0])
def test_coarser_patches_of_a_jpeg_level_are_decoded_at_scale(tmp_path: Path, mpp: float) -> None:
    """A single-level slide read 2 or 4 times coarser: libjpeg's scaled decode, within a grey level on average of
    decoding in full and area-resizing (YCbCr JPEG tiles here; Aperio's RGB-coded ones in the next test)."""
    slide = write_synthetic_slide(tmp_path / "one.tif", width=768, height=768, mpp=1.0, tile_size=128, n_levels=1,
                                  seed=9, tissue_fraction=0.6).path.resolve()
    index = open_slide_index([(slide, None)], tmp_path / "coords", CoordSettings())
    stream = _stream(index, mpp=MppSampling(values=(mpp,), weights=(1.0,)), min_tissue=0.0)
    images = _images(stream)[:4]
    for image, where in zip(images, stream.describe(list(range(4))), strict=True):
        assert where["reduce"] == int(mpp)
        diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - _reference(where, SIZE).astype(int))
        assert diff.mean() < 1.5, diff.mean()


def test_aperio_rgb_coded_jpeg_tiles_keep_their_colours_at_scale(shared_data: Path, tmp_path: Path) -> None:
    svs = (shared_data / "wsi" / "CMU-1-Small-Region.svs").resolve()
    index = open_slide_index([(svs, None)], tmp_path / "coords", CoordSettings())
    stream = SlideStream(index, size=224, mpp=MppSampling(values=(1.0,), weights=(1.0,)), patches_per_visit=4,
                         min_tissue=0.0)
    for image, where in zip(_images(stream)[:3], stream.describe([0, 1, 2]), strict=True):
        assert where["reduce"] == 2  # 1 µm/px from the 0.499 µm/px level: half-scale decode
        reference = _reference(where, 224)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference.astype(int)).mean() < 2.0
