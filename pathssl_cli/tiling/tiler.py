"""`pathssl tile`: the command. Splits the slide list (array tasks, torchrun), runs `slide_tiler.tile_slide` on
each slide in worker processes, guards the store's settings, and writes the summary and errors.csv.

One slide is one unit of work (and of resume): a worker process tiles it completely into its own
shards and then writes its part file. Rerunning skips slides with a part file and redoes the rest.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import multiprocessing
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pathssl_cli.console import info, progress
from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.fileio import atomic_write
from pathssl_cli.runs import open_run
from pathssl_cli.sharding import resolve_shard
from pathssl_cli.slides.readers import slide_readers
from pathssl_cli.specs.tile import TileSpec, resolve_slides
from pathssl_cli.tiling import index
from pathssl_cli.tiling.slide_tiler import SlideResult, TileSettings, tile_slide


def _check_store_settings(settings: TileSettings, force_reader: bool = False) -> dict[str, Any] | None:
    """Refuse (exit 2) a store made with settings that change the tiles; returns the reader change that
    `force_reader` let through, for run.json. Settings a store's tiling.json predates are recorded now; the reader
    of such a store is judged by the readers its slides were tiled with."""
    marker = settings.store_dir / "tiling.json"
    wanted = settings.fingerprint()
    if not marker.exists():
        atomic_write(marker, json.dumps(wanted, indent=2) + "\n")
        return None
    found = json.loads(marker.read_text())
    changed = {k: (found[k], v) for k, v in wanted.items() if k in found and found[k] != v}
    if "reader" not in found:
        used = sorted({r for r in index.read_slides(settings.store_dir).column("reader").to_pylist() if r})
        if settings.reader != "auto" and any(r != settings.reader for r in used):
            changed["reader"] = (used, settings.reader)
    forced = None
    if "reader" in changed and force_reader:
        before = changed.pop("reader")[0]
        forced = {"store": before if isinstance(before, list) else [before], "now": settings.reader}
        info(f"{settings.store_dir}: tiled with reader {before!r}, now {settings.reader!r} (--force-reader): the "
             "store mixes readers; each slide's is in slides/<slide_id>.parquet")
    if "reader" in changed:
        before = changed["reader"][0]
        raise SpecError(
            f"{settings.store_dir} was tiled with reader {before!r} and this run asks for {settings.reader!r}: "
            "readers decode differently and may choose other pyramid levels, so the store would mix them. Set "
            f"input.reader back, use a new output.dir, or pass --force-reader to mix them knowingly.",
            "input.reader",
        )
    if changed:
        described = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise SpecError(
            f"{settings.store_dir} already holds tiles made with other settings ({described}). "
            "Use a new output.dir, or delete the old store to re-tile.",
            "output.dir",
        )
    missing = {k: v for k, v in wanted.items() if k not in found and not (k == "reader" and forced)}
    if missing:  # a store from before these were recorded: record them, so later runs are compared
        atomic_write(marker, json.dumps({**found, **missing}, indent=2) + "\n")
    return forced


def _run_jobs(
    jobs: list[tuple[Path, float | None]], settings: TileSettings, workers: int
) -> list[SlideResult]:
    results: list[SlideResult] = []
    bar = progress(total=len(jobs), desc="slides", unit="slide")
    started = time.perf_counter()

    def done(result: SlideResult) -> None:
        results.append(result)
        tiles = sum(sum(r.tiles.values()) for r in results if r.status == "done")
        bar.set_postfix(
            tiles=tiles,
            tiles_per_s=f"{tiles / max(time.perf_counter() - started, 1e-9):.0f}",
            failed=sum(r.status == "failed" for r in results),
        )
        bar.update(1)

    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for path, mpp in jobs:
                done(tile_slide(path, mpp, settings))
        else:
            # spawn: a fresh interpreter per worker, safe whatever threads the parent runs.
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
                futures = [pool.submit(tile_slide, path, mpp, settings) for path, mpp in jobs]
                for future in cf.as_completed(futures):
                    done(future.result())
    order = {str(path): i for i, (path, _) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.path])


def _errors_csv(results: list[SlideResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide", "error", "fix"])
    for r in results:
        if r.status == "failed":
            writer.writerow([r.path, r.error, r.fix])
    return buffer.getvalue()


def run_coords(spec: TileSpec, *, num_shards: int | None = None, shard_index: int | None = None,
               consolidate: bool = False, split_array: bool = False) -> dict[str, Any]:
    """`pathssl tile --coords-only`: the coordinate index rows of this process's part of the slides, written into
    `<output.dir>/coords/` for `pathssl pretrain` to stream patches from (`data.coords_dir = output.dir`). Same
    slide list, split, reader, MPP rules and tissue detector as tiling; no tile is written. Rows that recorded an
    unusable slide are computed again. `consolidate` (once, after the array): also write every row into
    `<output.dir>/coords.parquet`, so that a first pre-training start reads one file, not one per slide."""
    from pathssl_cli.data.slide_arrays import CONSOLIDATED_COORDS, consolidate_coords
    from pathssl_cli.data.slide_index import CoordSettings, coords_path, ensure_coords

    part = resolve_shard(num_shards, shard_index, array=split_array)
    if consolidate and part.count > 1:
        raise SpecError(f"--consolidate reads every slide's row, so it runs once, after all {part.count} parts: run "
                        "`pathssl tile SPEC --coords-only --consolidate` without a split")
    jobs = part.take(resolve_slides(spec))
    store_dir = Path(spec.output.dir)
    settings = CoordSettings(reader=spec.input.reader, mpp_override=spec.input.mpp_override)
    started = time.perf_counter()
    info(f"coordinate index of {len(jobs)} slide(s) into {store_dir / 'coords'}"
         + (f" (part {part.index + 1} of {part.count}, from {part.source})" if part.count > 1 else ""))
    counts = ensure_coords(jobs, store_dir, settings, spec.run.workers, recompute_errors=True)
    failed = []
    for slide, _ in jobs:
        row = pq.read_table(coords_path(store_dir, slide), columns=["error", "fix"]).to_pylist()[0]
        if row["error"]:
            failed.append({"slide": str(slide), "error": row["error"], "fix": row["fix"]})
    summary = {"slides": len(jobs), "computed": counts["computed"], "failed": len(failed),
               "seconds": round(time.perf_counter() - started, 3), "part": {"index": part.index, "count": part.count},
               "errors": failed}
    if consolidate:
        summary["consolidated"] = consolidate_coords(store_dir, jobs)
        info(f"{summary['consolidated']} rows consolidated into {store_dir / CONSOLIDATED_COORDS}")
    atomic_write(store_dir / "coords" / f"summary{part.suffix}.json", json.dumps(summary, indent=2) + "\n")
    info(f"{len(jobs) - len(failed)} slide(s) indexed ({counts['computed']} computed now), {len(failed)} unusable, "
         f"in {summary['seconds']:.1f} s")
    if failed and not spec.run.allow_failures:
        listed = store_dir / "coords" / f"summary{part.suffix}.json"
        raise WorkFailed(f"{len(failed)} of {len(jobs)} slide(s) cannot be used, e.g. {failed[0]['slide']}: "
                         f"{failed[0]['error']}. All are listed in {listed} (set run.allow_failures = true to exit 0 "
                         "anyway; pre-training leaves them out)")
    return summary


def run_tile(
    spec: TileSpec, *, num_shards: int | None = None, shard_index: int | None = None, consolidate: bool = False,
    split_array: bool = False, force_reader: bool = False,
) -> dict[str, Any]:
    """Tile the spec's slides (this process's part of them, see `pathssl_cli.sharding`; `split_array`: the SLURM
    array task's part; `force_reader`: continue a store made with another slide reader) into the store.

    `consolidate`: afterwards write manifest.parquet and its CSV export from all parts; only for a process
    that covers the whole slide list (run it once after the array tasks: it skips every complete slide).
    Returns the summary.
    """
    part = resolve_shard(num_shards, shard_index, array=split_array)
    if consolidate and part.count > 1:
        raise SpecError(
            f"--consolidate reads every part of the store, so it runs once, after all {part.count} parts "
            f"(this process is part {part.index + 1} of {part.count}, from {part.source}): run "
            "`pathssl tile SPEC --consolidate` without a split, e.g. in a job that depends on the array"
        )
    slides = resolve_slides(spec)
    jobs = part.take(slides)  # round-robin over the sorted list: disjoint slices that cover it all
    parts, index_ = part.count, part.index
    store_dir = Path(spec.output.dir)
    settings = TileSettings(
        store_dir=store_dir,
        mpps=spec.tiles.mpp_values(),
        size=spec.tiles.size,
        min_tissue=spec.tiles.min_tissue,
        max_white=spec.tiles.max_white,
        max_black=spec.tiles.max_black,
        jpeg_quality=spec.output.jpeg_quality,
        tiles_per_shard=spec.output.tiles_per_shard,
        qc=spec.output.qc_thumbnails,
        mpp_override=spec.input.mpp_override,
        reader=spec.input.reader,
    )
    store_dir.mkdir(parents=True, exist_ok=True)
    forced = _check_store_settings(settings, force_reader)
    suffix = part.suffix
    with open_run(spec, store_dir, world_size=parts, is_main=index_ == 0) as run:
        started = time.perf_counter()
        info(
            f"tiling {len(jobs)} slide(s) at {settings.mpps} µm/px into {store_dir}"
            + (f" (part {index_ + 1} of {parts}, from {part.source})" if parts > 1 else "")
        )
        if "array_ignored" in part.origin:
            info(part.origin["array_ignored"])
        run.record["shard"] = part.record()
        if forced:
            run.record["reader_forced"] = forced
        results = _run_jobs(jobs, settings, spec.run.workers)
        run.record["slide_readers"] = slide_readers(spec.input.reader, [r.reader for r in results])
        seconds = time.perf_counter() - started
        # Only a process that covers the whole list looks at the other parts: N array tasks each reading
        # every part would make the total work grow with N x slides.
        total_tiles = (index.consolidate(store_dir) if consolidate else index.tiles_in_store(store_dir)) \
            if parts == 1 else None
        new_tiles = sum(sum(r.tiles.values()) for r in results if r.status == "done")
        by_fov: dict[str, int] = {}
        for r in results:
            for fov, count in r.tiles.items():
                by_fov[fov] = by_fov.get(fov, 0) + count
        failed = [r for r in results if r.status == "failed"]
        summary = {
            "slides": len(jobs),
            "done": sum(r.status == "done" for r in results),
            "skipped": sum(r.status == "skipped" for r in results),
            "busy": sum(r.status == "busy" for r in results),
            "failed": len(failed),
            "tiles_written": new_tiles,
            "tiles_copied_through": sum(r.copied for r in results),
            "tiles_in_store": total_tiles,
            "tiles_by_mpp": by_fov,
            "seconds": round(seconds, 3),
            "tiles_per_s": round(new_tiles / seconds, 1) if seconds > 0 else None,
            "part": part.record(),
            "per_slide": [asdict(r) for r in results],
        }
        atomic_write(store_dir / f"errors{suffix}.csv", _errors_csv(results))
        atomic_write(store_dir / f"summary{suffix}.json", json.dumps(summary, indent=2) + "\n")
        busy = f", {summary['busy']} being tiled by another process" if summary["busy"] else ""
        held = f"; store holds {total_tiles}" if total_tiles is not None else ""
        info(
            f"{summary['done']} slide(s) tiled, {summary['skipped']} already complete{busy}, {len(failed)} "
            f"failed; {new_tiles} tiles in {seconds:.1f} s ({summary['tiles_per_s']} tiles/s){held}"
            + (f"; consolidated into {store_dir / index.CONSOLIDATED} and {index.CSV_EXPORT}" if consolidate
               else "")
        )
        if failed and not spec.run.allow_failures:
            first = failed[0]
            raise WorkFailed(
                f"{len(failed)} of {len(jobs)} slide(s) failed, e.g. {first.path}: {first.error}. "
                f"All are listed in {store_dir / f'errors{suffix}.csv'} (set run.allow_failures = "
                "true to exit 0 anyway)"
            )
    return summary
