"""Cost of the pretraining stream at scale: memory per tile, start-up per million tiles, loader tiles/s.

The shared sample slides are tiled (real H&E JPEGs, 224 px at 0.5 and 1 µm/px); copies of those tiles make a
small store of `--small-tiles` tiles in shards of 2,000 (the tiler's default). A simulated store of `--tiles`
tiles replicates the small store's index over symlinked shards, so it costs seconds and no disk. Every
measurement runs in a fresh child process: a TileStream, a DataLoader with `--workers` workers, the first batch
(start-up), then `--batches` batches (tiles/s, and tiles per CPU-second of the rank and workers, which a loaded
machine distorts less); then the PSS of the rank and its workers (/proc/<pid>/smaps_rollup: shared pages count
once in total, so memory-mapped index pages are not counted once per worker). Memory and start-up are marginal:
(big store - small store) / (tiles added). Small-store runs of the two implementations alternate.

Shard opens per tile read (issue 20 §4: on Lustre each open is a metadata-server round trip): rank 0 of world
sizes 1, 8 and 64 iterates its whole epoch over a store of `--opens-tiles` tiles in shards of 2,000 with a
shuffle buffer of 10,000 (the pretrain default), JPEG decoding stubbed out, counting `os.open` of shards.

    python benchmarks/stream_scale.py                                   # this tree only
    python benchmarks/stream_scale.py --baseline-src /work/main         # and the code at that path (old index)
    python benchmarks/stream_scale.py --opens-only --baseline-src OLD --baseline-parts parquet

The baseline (the manifest-CSV index of earlier versions) gets the same stores with CSV parts, and, since it
needs ~1.7 KB per tile per process, a smaller big store (`--baseline-tiles`); per-tile figures compare.
`--baseline-parts parquet` compares against a checkout that already reads Parquet parts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "wsi"


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line for pid {pid}")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(c) for c in fh.read().split()]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """user + sys CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def child(store: str, workers: int, batches: int, batch: int) -> None:
    """One measurement (runs with the implementation under test first on sys.path)."""
    import torch

    from pathssl_cli.data.tiles import TileStream

    torch.set_num_threads(1)
    started, cpu = time.perf_counter(), time.process_time()
    stream = TileStream([Path(store)], image_size=224, seed=0, shuffle_buffer=1000, batch_size=batch)
    index_s, index_cpu = time.perf_counter() - started, time.process_time() - cpu
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    batches_iter = iter(loader)
    next(batches_iter)
    first_s = time.perf_counter() - started
    me = os.getpid()
    kids = children(me)
    first_cpu = cpu_seconds(kids) + time.process_time() - cpu
    timed, timed_cpu = time.perf_counter(), cpu_seconds(kids) + time.process_time()
    for _ in range(batches):
        next(batches_iter)
    tiles_per_s = batches * batch / (time.perf_counter() - timed)
    tiles_per_cpu_s = batches * batch / (cpu_seconds(kids) + time.process_time() - timed_cpu)
    workers_pss = [pss_bytes(p) for p in kids]
    print(json.dumps({"tiles": len(stream.refs), "index_s": index_s, "index_cpu_s": index_cpu,
                      "first_batch_s": first_s, "first_batch_cpu_s": first_cpu,
                      "tiles_per_s": tiles_per_s, "tiles_per_cpu_s": tiles_per_cpu_s, "pss_rank": pss_bytes(me),
                      "pss_workers": sum(workers_pss), "n_workers": len(workers_pss)}))


def child_opens(store: str, world: int, buffer: int) -> None:
    """Shard opens per tile of rank 0 at `world` ranks (runs with the implementation under test on sys.path)."""
    import numpy as np

    from pathssl_cli.data import tiles

    opened = [0]
    real_open = os.open

    def counting(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith(".tar"):
            opened[0] += 1
        return real_open(path, flags, *args, **kwargs)

    stub = np.zeros((1, 1, 3), np.uint8)
    tiles.decode = lambda data: stub  # the shard reads are what is measured, not JPEG decoding
    tiles._to_tensor = lambda image, size: image
    stream = tiles.TileStream([Path(store)], image_size=224, seed=0, shuffle_buffer=buffer, rank=0,
                              world_size=world)
    os.open = counting
    read = sum(1 for _ in stream)
    os.open = real_open
    print(json.dumps({"world": world, "tiles": read, "opens": opened[0], "opens_per_tile": opened[0] / read}))


def measure_opens(src: Path, store: Path, world: int, buffer: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "PATHSSL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child-opens", str(store), "--world", str(world),
                          "--buffer", str(buffer)], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"opens measurement failed ({src}, {store}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(src: Path, store: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "PATHSSL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(store), "--workers", str(args.workers),
                          "--batches", str(args.batches), "--batch", str(args.batch)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"measurement failed ({src}, {store}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["pss_total"] = result["pss_rank"] + result["pss_workers"]
    return result


def small_store(work: Path) -> Path:
    """A real store: the shared sample slides at 0.5 and 1 µm/px, 224 px."""
    sys.path.insert(0, str(ROOT))
    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.tiler import run_tile

    slides = sorted(str(p) for p in SLIDES.glob("*")) if SLIDES.is_dir() else []
    if not slides:
        from pathssl_cli.synthetic_slide import write_synthetic_slide

        for i in range(2):
            write_synthetic_slide(work / f"syn{i}.tif", width=2048, height=2048, mpp=0.5, tile_size=256, seed=i)
        slides = [str(work / f"syn{i}.tif") for i in range(2)]
    spec_path = work / "tile.toml"
    spec_path.write_text(f'kind = "tile"\n[input]\nslides = {json.dumps(slides)}\n[tiles]\nmpp = [0.5, 1.0]\n'
                         f'size = 224\nmin_tissue = 0.3\n[output]\ndir = "{work / "small"}"\ntiles_per_shard = 1000\n'
                         'qc_thumbnails = false\n[run]\nworkers = 1\n')
    run_tile(load_spec(spec_path))
    return work / "small"


def fat_store(base: Path, dest: Path, n_tiles: int) -> Path:
    """`n_tiles` copies of the base store's real JPEGs in shards of 2,000 (the tiler's default), two per slide."""
    from pathssl_cli.tiling.index import read_tiles
    from pathssl_cli.tiling.store import SlideShardWriter, tile_key

    rows = read_tiles(base).to_pylist()
    jpegs = []
    for row in rows:
        with open(base / row["shard"], "rb") as fh:
            fh.seek(row["offset"])
            jpegs.append(fh.read(row["nbytes"]))
    per_slide = 4000
    for s in range(math.ceil(n_tiles / per_slide)):
        writer = SlideShardWriter(dest, f"copy{s}", tiles_per_shard=2000)
        for i in range(min(per_slide, n_tiles - s * per_slide)):
            row = rows[i % len(rows)]
            key = tile_key(f"copy{s}", row["mpp"], row["x"] + 10**6 * (i // len(rows)), row["y"])
            writer.add(jpegs[i % len(rows)], {k: row[k] for k in ("slide", "mpp", "level", "x", "y", "size",
                                                                    "tissue")} | {"key": key})
        writer.commit()
    return dest


def replicate(base: Path, dest: Path, n_tiles: int, csv_parts: bool) -> int:
    """A store of about n_tiles tiles: the base index repeated, shards symlinked; returns its tile count."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    from pathssl_cli.tiling.index import read_tiles

    table = read_tiles(base)
    per_part = max(1, round(2000 / table.num_rows))
    replicas = max(1, math.ceil(n_tiles / table.num_rows))
    (dest / "shards").mkdir(parents=True)
    (dest / "parts").mkdir()
    shard_names = table.column("shard").to_pylist()
    for name in sorted(set(shard_names)):
        for r in range(replicas):
            os.symlink((base / name).resolve(), dest / "shards" / f"r{r:07d}-{Path(name).name}")
    for first in range(0, replicas, per_part):
        group = range(first, min(first + per_part, replicas))
        part = pa.concat_tables([table] * len(group))
        shards = [f"shards/r{r:07d}-{Path(s).name}" for r in group for s in shard_names]
        part = part.set_column(part.schema.get_field_index("shard"), "shard", pa.array(shards))
        if csv_parts:  # the earlier versions' format: the manifest's columns, no offsets
            old = part.select(["slide", "mpp", "level", "x", "y", "size", "tissue", "shard", "key"])
            pa_csv.write_csv(old, dest / "parts" / f"p{first:07d}.csv")
        else:
            pq.write_table(part, dest / "parts" / f"p{first:07d}.parquet")
    (dest / "tiling.json").write_text("{}")
    return replicas * table.num_rows


def opens_table(base: Path, work: Path, impls: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Shard opens per tile read by rank 0 at world sizes 1, 8 and 64, per implementation."""
    results: dict[str, list[dict]] = {}
    for name, (src, _, csv_parts) in impls.items():
        store = work / f"{name.replace(' ', '_')}-opens"
        replicate(base, store, args.opens_tiles, csv_parts)
        results[name] = [measure_opens(src, store, world, args.opens_buffer) for world in (1, 8, 64)]
        shutil.rmtree(store)
    print(f"shard opens per tile read (rank 0; {args.opens_tiles} tiles in shards of 2,000, shuffle buffer "
          f"{args.opens_buffer})")
    print(f"  {'world size':<12}" + "".join(f"{name:>14}" for name in results))
    for row in range(3):
        cells = "".join(f"{results[name][row]['opens_per_tile']:>14.4f}" for name in results)
        print(f"  {results[next(iter(results))][row]['world']:<12}{cells}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=int, default=1_000_000, help="tiles of the simulated big store")
    parser.add_argument("--baseline-src", type=Path, help="a checkout of an earlier pathssl to compare against")
    parser.add_argument("--baseline-tiles", type=int, default=200_000, help="big store size for the baseline")
    parser.add_argument("--small-tiles", type=int, default=4000, help="tiles of the small store (the reference)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20, help="batches timed after the first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per implementation (median)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--baseline-parts", choices=("csv", "parquet"), default="csv",
                        help="index format the baseline reads (csv: versions before the Parquet parts)")
    parser.add_argument("--opens-tiles", type=int, default=1_000_000,
                        help="tiles of the store for the shard-opens measurement")
    parser.add_argument("--opens-buffer", type=int, default=10_000, help="shuffle buffer for the opens measurement")
    parser.add_argument("--opens-only", action="store_true", help="only the shard-opens measurement")
    parser.add_argument("--child-opens", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--buffer", type=int, default=10_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workers, args.batches, args.batch)
        return
    if args.child_opens:
        child_opens(args.child_opens, args.world, args.buffer)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="stream_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = fat_store(small_store(work), work / "fat", args.small_tiles)
        impls = {"this tree": (ROOT, args.tiles, False)}
        if args.baseline_src:
            impls["baseline"] = (args.baseline_src.resolve(), args.baseline_tiles, args.baseline_parts == "csv")
        opens = opens_table(base, work, impls, args)
        if args.opens_only:
            return
        stores = {}
        for name, (_src, n_big, csv_parts) in impls.items():
            tag = name.replace(" ", "_")
            stores[name] = (replicate(base, work / f"{tag}-small", args.small_tiles, csv_parts),
                            replicate(base, work / f"{tag}-big", n_big, csv_parts))
        small_runs: dict[str, list[dict]] = {name: [] for name in impls}
        for _ in range(args.repeats):  # interleaved, so that the shared machine's load hits both alike
            for name, (src, _, _) in impls.items():
                small_runs[name].append(measure(src, work / f"{name.replace(' ', '_')}-small", args))
        report = {}
        for name, (src, _, _) in impls.items():
            big = work / f"{name.replace(' ', '_')}-big"
            n_small, n_big = stores[name]
            cold = measure(src, big, args)  # the first open builds this tree's index cache
            warm_big = measure(src, big, args)
            runs = small_runs[name]
            added = n_big - n_small

            def median(key: str, runs: list[dict] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            report[name] = {
                "tiles_small": n_small, "tiles_big": n_big,
                "bytes_per_tile": (warm_big["pss_total"] - median("pss_total")) / added,
                "rank_bytes_per_tile": (warm_big["pss_rank"] - median("pss_rank")) / added,
                "start_s_per_million_cold": (cold["first_batch_s"] - median("first_batch_s")) / added * 1e6,
                "start_s_per_million": (warm_big["first_batch_s"] - median("first_batch_s")) / added * 1e6,
                "start_cpu_s_per_million": (warm_big["first_batch_cpu_s"] - median("first_batch_cpu_s")) / added * 1e6,
                "tiles_per_s_small": median("tiles_per_s"),
                "tiles_per_cpu_s_small": median("tiles_per_cpu_s"),
                "tiles_per_s_runs": [round(r["tiles_per_s"], 1) for r in runs],
                "workers_seen": warm_big["n_workers"],
            }
            shutil.rmtree(big)
        for name, r in report.items():
            print(f"{name}: small store {r['tiles_small']} tiles, big {r['tiles_big']} tiles, "
                  f"{r['workers_seen']} workers")
            print(f"  memory      {r['bytes_per_tile']:8.1f} B/tile (rank + workers PSS, marginal); rank alone "
                  f"{r['rank_bytes_per_tile']:.1f} B/tile")
            print(f"  start-up    {r['start_s_per_million']:8.2f} s per million tiles to the first batch "
                  f"(first open, index build included: {r['start_s_per_million_cold']:.2f} s); CPU "
                  f"{r['start_cpu_s_per_million']:.2f} s per million (rank + workers)")
            print(f"  throughput  {r['tiles_per_s_small']:8.1f} tiles/s on the small store (runs "
                  f"{r['tiles_per_s_runs']}); {r['tiles_per_cpu_s_small']:.1f} tiles per CPU-second")
            print(f"  at 30M tiles: {r['bytes_per_tile'] * 30e6 / 2**30:.2f} GiB per rank with its workers, "
                  f"{r['start_s_per_million'] * 30:.0f} s to start ({r['start_s_per_million_cold'] * 30:.0f} s "
                  "on the first open)")
        if "baseline" in report:
            new, old = report["this tree"], report["baseline"]
            print(f"ratios this tree / baseline: memory {new['bytes_per_tile'] / old['bytes_per_tile']:.3f}, "
                  f"start-up {new['start_s_per_million'] / old['start_s_per_million']:.3f}, "
                  f"tiles/s {new['tiles_per_s_small'] / old['tiles_per_s_small']:.2f}, "
                  f"tiles per CPU-second {new['tiles_per_cpu_s_small'] / old['tiles_per_cpu_s_small']:.2f}")
        print(json.dumps({"report": report, "opens": opens}, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
