"""Tiling throughput: `pathssl tile` against the naive read_region-per-tile baseline, in the same run.

    python benchmarks/tile_throughput.py                # 30000 px synthetic 40x slide (cached in --workdir)
    python benchmarks/tile_throughput.py --size 12288   # smaller, when time is short
    python benchmarks/tile_throughput.py --slide my.svs # a user-given slide

Everything runs in one process on one core (workers = 1, one decode thread), so tiles/s are per core.
Printed: pathssl tile; naive baseline (tissue mask, then one `read_region` per output tile at level 0,
then one JPEG file per tile) with tile origins aligned to the slide's internal tiles and not; the
machine's JPEG decode+encode limit (decode just the internal tiles the output needs, encode the
output tiles); and peak memory (ru_maxrss of a child process) of `pathssl tile` at two slide sizes.
Rates are tiles per CPU second of the benchmark process (per core, and unaffected by other load on
the machine) and tiles per wall second; medians of --repeats runs. The pathssl figure includes its
fixed costs (tissue detection, run directory, manifest); the naive one excludes its tissue mask.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TIFFSLIDE_NUM_DECODE_THREADS", "1")  # one core for every contender
os.environ.setdefault("PATHSSL_PROGRESS", "0")

import cv2
import numpy as np

cv2.setNumThreads(1)


def make_slide(workdir: Path, size: int) -> Path:
    from pathssl_cli.synthetic_slide import write_synthetic_slide

    path = workdir / f"synthetic_{size}.tif"
    if not path.exists():
        started = time.perf_counter()
        write_synthetic_slide(path, width=size, height=size, mpp=0.25, tile_size=256, n_levels=4, seed=0)
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def write_spec(folder: Path, slide: Path, out: Path, size: int) -> Path:
    spec = folder / "spec.toml"
    spec.write_text(
        f'kind = "tile"\n[input]\nslides = ["{slide}"]\nmpp_override = 0.25\n'
        f"[tiles]\nmpp = [0.25]\nsize = {size}\nmin_tissue = 0.5\n"
        f'[output]\ndir = "{out}"\nqc_thumbnails = false\n[run]\nworkers = 1\n'
    )
    return spec


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rates(count: int, start: tuple[float, float]) -> tuple[float, float]:
    """(tiles per wall second, tiles per CPU second of this process: per core, immune to other load)."""
    wall, cpu = _clock()
    return count / (wall - start[0]), count / max(cpu - start[1], 1e-9)


def bench_pathssl(slide: Path, size: int, workdir: Path) -> tuple[tuple[float, float], int]:
    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.tiler import run_tile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        spec = load_spec(write_spec(Path(tmp), slide, Path(tmp) / "store", size))
        started = _clock()
        summary = run_tile(spec)
        rates = _rates(summary["tiles_written"], started)
    return rates, summary["tiles_written"]


def tissue_positions(
    slide_path: Path, size: int, step: int, offset: int, limit: int
) -> list[tuple[int, int]]:
    from pathssl_cli.tiling.slide import open_slide, slide_mpp
    from pathssl_cli.tiling.tissue import tissue_mask

    slide = open_slide(slide_path)
    mask = tissue_mask(slide, slide_mpp(slide, 0.25, slide_path)[0])
    width, height = slide.dimensions
    found = [
        (x, y)
        for y in range(offset, height - size + 1, step)
        for x in range(offset, width - size + 1, step)
        if mask.fraction(x, y, size, size) >= 0.5
    ]
    rng = np.random.default_rng(0)
    if len(found) > limit:  # a spread-out sample, visited in row order like a tiling script would
        found = sorted(
            map(tuple, rng.permutation(np.array(found))[:limit].tolist()), key=lambda p: (p[1], p[0])
        )
    return found


def bench_naive(
    slide_path: Path, positions: list[tuple[int, int]], size: int, workdir: Path
) -> tuple[float, float]:
    import tiffslide

    slide = tiffslide.TiffSlide(slide_path)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        started = _clock()
        for x, y in positions:
            rgb = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
            cv2.imwrite(
                f"{tmp}/{x}_{y}.jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
            )
        return _rates(len(positions), started)


def bench_codec_limit(slide_path: Path, positions: list[tuple[int, int]], size: int) -> tuple[float, float]:
    """Decode each internal tile the output tiles touch once, and encode every output tile.

    `positions` is the dense grid `pathssl tile` itself produces, so neighbouring output tiles share
    internal tiles exactly as in the real run.
    """
    from pathssl_cli.tiling.slide import LevelReader, open_slide

    reader = LevelReader(open_slide(slide_path), 0)
    needed = sorted(
        {
            (r, c)
            for x, y in positions
            for r in range(y // reader.tile_h, (y + size - 1) // reader.tile_h + 1)
            for c in range(x // reader.tile_w, (x + size - 1) // reader.tile_w + 1)
        }
    )
    raw = {(r, c): reader.raw_tile(r, c) for r, c in needed}  # file reads are not part of the limit
    page = reader.page
    decoded: dict[tuple[int, int], np.ndarray] = {}
    started = _clock()
    for x, y in positions:  # row order: decode each needed tile once, encode each output tile
        row, col = y // reader.tile_h, x // reader.tile_w
        for key in [k for k in decoded if k[0] < row]:
            del decoded[key]
        for r in range(row, (y + size - 1) // reader.tile_h + 1):
            for c in range(col, (x + size - 1) // reader.tile_w + 1):
                if (r, c) not in decoded:
                    index = r * reader.tiles_across + c
                    tile = page.decode(raw[(r, c)], index, jpegtables=page.jpegtables)[0]
                    decoded[(r, c)] = np.asarray(tile).reshape(reader.tile_h, reader.tile_w, -1)
        # Encode real content of this place (the top-left internal tile's crop), not one tile over and over.
        crop = np.ascontiguousarray(decoded[(row, col)][:size, :size, :3])
        cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return _rates(len(positions), started)


def peak_memory_mb(slide: Path, size: int, workdir: Path) -> float:
    """Peak resident memory (VmHWM) of a fresh child process running `pathssl tile` on `slide`.

    Not ru_maxrss: Linux carries it across exec, so the child would report the parent's peak.
    """
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        spec = write_spec(Path(tmp), slide, Path(tmp) / "store", size)
        code = (
            "import resource,sys; from pathssl_cli.specs import load_spec; "
            "from pathssl_cli.tiling.tiler import run_tile; run_tile(load_spec(sys.argv[1])); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(spec)], capture_output=True, text=True, check=True
        )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, help="a slide to use instead of the synthetic one")
    parser.add_argument("--size", type=int, default=30000, help="side of the synthetic 40x slide in px")
    parser.add_argument("--small-size", type=int, default=4096, help="second slide size for the memory check")
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument(
        "--naive-tiles", type=int, default=1500, help="tiles read by each naive run (a sample)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pathssl_bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.slide or make_slide(args.workdir, args.size)
    size = args.tile

    aligned = tissue_positions(slide, size, 256, 0, args.naive_tiles)  # origins on the 256 px internal grid
    unaligned = tissue_positions(slide, size, size, 100, args.naive_tiles)  # straddle 2-4 internal tiles
    dense = tissue_positions(slide, size, size, 0, 10**9)  # all tiles of the grid pathssl tile uses
    results: dict[str, list[tuple[float, float]]] = {
        "pathssl": [],
        "naive_aligned": [],
        "naive_unaligned": [],
        "codec_limit": [],
    }
    tiles = 0
    for _ in range(args.repeats):
        rates, tiles = bench_pathssl(slide, size, args.workdir)
        results["pathssl"].append(rates)
        results["naive_aligned"].append(bench_naive(slide, aligned, size, args.workdir))
        results["naive_unaligned"].append(bench_naive(slide, unaligned, size, args.workdir))
        results["codec_limit"].append(bench_codec_limit(slide, dense, size))
    wall = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    median = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    print(
        f"slide {slide} ({args.size if not args.slide else 'user'} px), {size} px tiles at 0.25 µm/px, "
        f"{tiles} tiles per pathssl run ({len(aligned)}/{len(unaligned)} per naive run), median of "
        f"{args.repeats}, one process"
    )
    print(f"  {'':16s} {'tiles/CPU-s':>12s} {'tiles/wall-s':>13s}")
    for name, value in median.items():
        print(f"  {name:16s} {value:12.0f} {wall[name]:13.0f}")
    print("  ratios per core (CPU time):")
    print(
        f"  pathssl / naive aligned     {median['pathssl'] / median['naive_aligned']:.2f}x  (target >= 2.5x)"
    )
    print(
        f"  pathssl / naive unaligned   {median['pathssl'] / median['naive_unaligned']:.2f}x  (target >= 5x)"
    )
    print(f"  pathssl / codec limit       {median['pathssl'] / median['codec_limit']:.0%}  (target >= 70%)")
    memory = {}
    if not args.slide:
        small = make_slide(args.workdir, args.small_size)
        for name, path in ((f"{args.small_size} px", small), (f"{args.size} px", slide)):
            memory[name] = peak_memory_mb(path, size, args.workdir)
            print(f"  peak RSS of pathssl tile on the {name} slide: {memory[name]:.0f} MB")
    print(
        json.dumps(
            {
                "median_tiles_per_cpu_s": median,
                "median_tiles_per_wall_s": wall,
                "peak_rss_mb": memory,
                "bench_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
