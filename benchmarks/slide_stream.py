"""Patches per second straight from slides against a tile store and `wsistream`, and the coordinate index at scale.

Throughput (`throughput`, the default): three data paths side by side in one run, over the same slides, 224 px
patches at 0.5 µm/px and at a mixed 0.25 / 0.5 / 1.0 µm/px set, for 1 and 4 DataLoader workers:
- `slides`: pathssl's slide source (`SlideStream`: 16 patches per visit, 8 open slides, min_tissue 0.4) with its
  decoded-tile cache (64 MB per worker), and `slides-nocache` with the cache off (every patch decodes all its
  internal tiles: what slides too large to revisit cost);
- `tiles`: pathssl's tile-store stream over a store of the same slides (`pathssl tile` at the same fields of view,
  224 px, its defaults), fields of view mixed equally;
- `wsistream` (PyPI, in its own virtual environment: `--wsistream-python`), configured as close as it allows: the
  same reader (tiffslide), CLAM's HSV-saturation tissue detector with Otsu, median 5 and pathssl's minimum
  region of 20,000 µm², an HSV filter keeping patches with >= 40% pixels of saturation >= 20 (pathssl's
  min_tissue rule), pool 8, 16 patches per visit, uint8 output, tissue masks cached. It reads the pyramid level
  closest to the target and does not resize, so where a slide lacks a level (the real 20x SVS at 1 µm/px) it
  reads fewer pixels than the others.
Slide sets: `jpeg` and `j2k`: synthetic 0.25 µm/px slides with levels at 0.25, 0.5, 1 µm/px (JPEG and JPEG 2000,
`pathssl_cli.synthetic_slide`); `real`: the two real JPEG slides in ../shared/data/wsi (0.499 µm/px).
Every path gets its slides (or store) `--replicate` times, so that an epoch outlasts the timed batches. Each
measurement is a fresh process: the first `workers` batches of an epoch (start-up) are not timed, then
`--batches` batches; patches/s, CPU-seconds per patch (the process and its workers, /proc) and peak RSS per worker
(VmHWM). Runs of the paths alternate (the machine is shared); medians over `--repeats`.

Start-up (`startup`): the coordinate index of N slides, built from replicated rows (hard links to one real slide
with a tissue grid of `--cells` tissue cells each, as `stream_scale.py` replicates tile indexes): seconds to the
first open (rows read from the per-slide files and the flat arrays built), to a later open (mapped), and to a first
open from `coords.parquet` (`--consolidate`), and the process's memory per tissue cell, at two sizes, so per-slide
and per-cell costs separate and extrapolate to 30,000 slides.

    python benchmarks/slide_stream.py --wsistream-python /work/wsistream-venv/bin/python
    python benchmarks/slide_stream.py startup --slides 30000 --cells 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "wsi"
MIXED = (0.25, 0.5, 1.0)
PATHS = ("slides", "slides-nocache", "tiles", "wsistream")


# -------------------------------------------------------------------------------------------- measuring
def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(c) for c in fh.read().split()]
    return found


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _dataset(config: dict):  # type: ignore[no-untyped-def]
    """The dataset of one measurement; runs in the child (wsistream's child runs in its own venv)."""
    mpps = config["mpps"]
    if config["path"] == "wsistream":
        from wsistream.backends import TiffSlideBackend
        from wsistream.filters import HSVPatchFilter
        from wsistream.sampling import MultiMagnificationSampler, RandomSampler
        from wsistream.tissue import CLAMTissueDetector
        from wsistream.torch import WsiStreamDataset

        if len(mpps) == 1:
            sampler = RandomSampler(patch_size=224, target_mpp=mpps[0], tissue_threshold=0.4)
        else:
            sampler = MultiMagnificationSampler(target_mpps=list(mpps), patch_size=224, tissue_threshold=0.4)
        # CLAM's minimum tissue area is a_t reference patches of ref_patch_size² level-0 px: set to pathssl's
        # 20,000 µm² (its default, 100 patches of 512², drops every region of these slides and then loops forever)
        detector = CLAMTissueDetector(use_otsu=True, mthresh=5, a_t=1, a_h=10**6,
                                      ref_patch_size=round(20_000**0.5 / config["base_mpp"]))
        return WsiStreamDataset(
            config["slides"] * config["replicate"], backend=TiffSlideBackend(), tissue_detector=detector,
            sampler=sampler,
            patch_filter=HSVPatchFilter(hue_range=(0, 180), sat_range=(20, 255), val_range=(0, 255),
                                        min_pixel_fraction=0.4),
            pool_size=8, patches_per_slide=10**9, patches_per_visit=16, cycle=True, seed=0,
            tissue_mask_cache_size=len(config["slides"]), output_dtype="uint8")
    if config["path"] == "tiles":
        from pathssl_cli.data.tiles import TileStream

        return TileStream([Path(config["store"])] * config["replicate"], image_size=224, seed=0, shuffle_buffer=1000,
                          mpp_weights={m: 1.0 for m in config["store_mpps"]}, batch_size=config["batch"])
    from pathssl_cli.data.slide_arrays import open_slide_index
    from pathssl_cli.data.slide_index import CoordSettings
    from pathssl_cli.data.slide_stream import MppSampling, SlideStream

    slides = [(Path(s), None) for s in config["slides"]] * config["replicate"]
    index = open_slide_index(slides, Path(config["coords"]), CoordSettings())
    return SlideStream(index, size=224, mpp=MppSampling(values=tuple(mpps), weights=(1.0,) * len(mpps)), seed=0,
                       batch_size=config["batch"], patches_per_visit=16, pool=8, min_tissue=0.4,
                       cache_mb=0 if config["path"] == "slides-nocache" else 64)


def child(config: dict) -> None:
    """Times `batches` batches, leaving out the first `workers` batches of each epoch (worker start-up): a small
    set's epochs end and the loader starts again, while wsistream streams endlessly."""
    import torch

    torch.set_num_threads(1)
    dataset = _dataset(config)
    batch, workers = config["batch"], config["workers"]
    me = os.getpid()
    timed = cpu = 0.0
    seen, epoch, kids, rss = 0, 0, [], []
    while seen < config["batches"]:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True)
        batches = iter(loader)
        for _ in range(workers):  # every worker's first batch: start-up, not timed
            next(batches)
        kids = _children(me)
        while seen < config["batches"]:
            cpu0, t0 = _cpu_s([me, *kids]), time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                break
            timed += time.perf_counter() - t0
            cpu += _cpu_s([me, *kids]) - cpu0
            seen += 1
            image = item["image"] if isinstance(item, dict) else item
            assert image.shape[1:] == (3, 224, 224) and image.dtype == torch.uint8, image.shape
            peaks = [_status_kb(p, "VmHWM") / 1024 for p in kids if os.path.exists(f"/proc/{p}")]
            rss = peaks if peaks else rss
        epoch += 1
    patches = seen * batch
    print(json.dumps({"patches_per_s": patches / timed, "cpu_s_per_patch": cpu / patches,
                      "peak_rss_mb_per_worker": statistics.median(rss) if rss else None, "epochs": epoch}))


def measure(config: dict, python: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATHSSL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([python, __file__, "--child", json.dumps(config)], env=env, capture_output=True,
                         text=True, check=False, timeout=1800)
    if out.returncode:
        raise SystemExit(f"measurement failed ({config['path']}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- inputs
def synthetic_slides(folder: Path, compression: str, count: int, side: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from pathssl_cli.synthetic_slide import write_synthetic_slide

    paths = []
    for i in range(count):
        path = folder / f"{compression}{i}.tif"
        if not path.exists():
            write_synthetic_slide(path, width=side, height=side, mpp=0.25, tile_size=256, n_levels=3, seed=i,
                                  tissue_fraction=0.5, compression=compression)
        paths.append(str(path))
    return paths


def tile_store(slides: list[str], mpps: tuple[float, ...], dest: Path) -> list[float]:
    """`pathssl tile` at `mpps`, 224 px, its defaults; returns the fields of view the store holds."""
    sys.path.insert(0, str(ROOT))
    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.index import read_tiles
    from pathssl_cli.tiling.tiler import run_tile

    spec = dest.with_suffix(".toml")
    spec.write_text(f'kind = "tile"\n[input]\nslides = {json.dumps(slides)}\n[tiles]\nmpp = {list(mpps)}\nsize = 224\n'
                    f'[output]\ndir = "{dest}"\nqc_thumbnails = false\n[run]\nworkers = 2\nallow_failures = true\n')
    run_tile(load_spec(spec))  # type: ignore[arg-type]
    return sorted(set(read_tiles(dest, ["mpp"]).column("mpp").to_pylist()))


def throughput(args: argparse.Namespace, work: Path) -> None:
    sets = {"jpeg": synthetic_slides(work, "jpeg", args.synthetic, args.side),
            "j2k": synthetic_slides(work, "jpeg2000", args.synthetic, args.side),
            "real": sorted(str(p) for p in REAL.glob("*")) if REAL.is_dir() else []}
    rows = []
    for name in args.sets:
        slides = sets[name]
        if not slides:
            print(f"{name}: no slides (../shared/data missing), skipped")
            continue
        for mpps in ((0.5,), MIXED) if args.mixed else ((0.5,),):
            store = work / f"store-{name}-{len(mpps)}"
            present = tile_store(slides, mpps, store)  # a second call skips the slides already tiled
            for workers in args.workers:
                runs: dict[str, list[dict]] = {p: [] for p in args.paths}
                for _ in range(args.repeats):
                    for path in args.paths:
                        config = {"path": path, "slides": slides, "mpps": list(mpps), "store": str(store),
                                  "base_mpp": 0.5 if name == "real" else 0.25, "replicate": args.replicate,
                                  "store_mpps": present, "coords": str(work / "coords"), "workers": workers,
                                  "batch": args.batch, "batches": args.batches}
                        python = args.wsistream_python if path == "wsistream" else sys.executable
                        if path == "wsistream" and not python:
                            continue
                        runs[path].append(measure(config, python))
                row = {"set": name, "mpp": "/".join(f"{m:g}" for m in mpps), "workers": workers}
                for path, found in runs.items():
                    if found:
                        row[path] = {key: statistics.median(r[key] for r in found) for key in found[0]}
                        row[path]["runs"] = [round(r["patches_per_s"], 1) for r in found]
                rows.append(row)
                _print_row(row)
    with os.popen("uptime") as fh:
        load = fh.read().strip()
    print(f"load while measuring (end): {load}")
    print(json.dumps(rows, indent=1))


def _print_row(row: dict) -> None:
    line = f"{row['set']:5s} {row['mpp']:12s} {row['workers']} worker(s):"
    for path in PATHS:
        if path in row:
            r = row[path]
            line += (f"  {path} {r['patches_per_s']:6.1f}/s {r['cpu_s_per_patch'] * 1000:5.1f} ms-CPU "
                     f"{r['peak_rss_mb_per_worker'] or 0:4.0f} MB")
    if "slides" in row and "wsistream" in row:
        line += f"  slides/wsistream {row['slides']['patches_per_s'] / row['wsistream']['patches_per_s']:.2f}"
    if "slides" in row and "tiles" in row:
        line += f"  slides/tiles {row['slides']['patches_per_s'] / row['tiles']['patches_per_s']:.2f}"
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------- start-up
def startup_child(slides_file: str, coords: str) -> None:
    """Open the index of the listed slides twice (build, then map); memory per tissue cell."""
    from pathssl_cli.data.slide_arrays import open_slide_index
    from pathssl_cli.data.slide_index import CoordSettings
    from pathssl_cli.data.slide_stream import MppSampling, SlideStream

    slides = [(Path(line), None) for line in Path(slides_file).read_text().split()]
    rss0 = _status_kb(os.getpid(), "VmRSS")
    t0 = time.perf_counter()
    index = open_slide_index(slides, Path(coords), CoordSettings())
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = SlideStream(index, size=224, mpp=MppSampling(values=(0.25, 0.5), weights=(1.0, 1.0)), rank=0,
                         world_size=8, batch_size=32)
    visits = stream.visit_slides()
    plan_s = time.perf_counter() - t0
    cells = len(index.cell)
    print(json.dumps({"slides": len(index), "cells": cells, "first_open_s": first_s, "plan_s": plan_s,
                      "visits": len(visits), "rss_mb": (_status_kb(os.getpid(), "VmRSS") - rss0) / 1024,
                      "peak_rss_mb": (_status_kb(os.getpid(), "VmHWM") - rss0) / 1024}))


def startup_open(slides_file: Path, coords: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATHSSL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--startup-child", str(slides_file), str(coords)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"start-up measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def replicated_rows(work: Path, n_slides: int, cells: int) -> tuple[Path, Path]:
    """n_slides hard links to one real slide, each with a coordinate row whose grid holds `cells` tissue cells."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from pathssl_cli.data.slide_index import COORDS_SCHEMA, CoordSettings, compute_coords, coords_path

    source = next(iter(sorted(REAL.glob("*.svs"))), None) if REAL.is_dir() else None
    if source is None:
        from pathssl_cli.synthetic_slide import write_synthetic_slide

        source = write_synthetic_slide(work / "one.tif", width=2048, height=2048, mpp=0.5, seed=0).path
    base = compute_coords(Path(source).resolve(), None, CoordSettings())
    side = int(np.ceil(np.sqrt(cells / 0.3)))  # a grid 30% tissue, as a TCGA slide's
    rng = np.random.default_rng(0)
    grid = np.zeros(side * side, np.uint8)
    grid[rng.choice(side * side, size=cells, replace=False)] = rng.integers(1, 256, size=cells)
    folder, coords = work / f"links-{n_slides}-{cells}", work / f"coords-{n_slides}-{cells}"
    folder.mkdir()
    listed = []
    for i in range(n_slides):
        link = folder / f"slide{i:06d}.svs"
        os.link(source, link)
        row = {**base, "slide": str(link), "grid_rows": side, "grid_cols": side, "tissue": grid.tobytes()}
        path = coords_path(coords, link)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([row], schema=COORDS_SCHEMA), path, compression="zstd")
        listed.append(str(link))
    slides_file = work / f"slides-{n_slides}-{cells}.txt"
    slides_file.write_text("\n".join(listed))
    return slides_file, coords


def startup(args: argparse.Namespace, work: Path) -> None:
    results = []
    for n_slides, cells in ((args.slides, args.cells), (args.slides // 10, args.cells * 10)):
        slides_file, coords = replicated_rows(work, n_slides, cells)
        cold = startup_open(slides_file, coords)
        warm = startup_open(slides_file, coords)
        # the same first build from coords.parquet (`pathssl tile --coords-only --consolidate`): one file to read
        sys.path.insert(0, str(ROOT))
        from pathssl_cli.data.slide_arrays import consolidate_coords

        consolidate_coords(coords, [(Path(line), None) for line in slides_file.read_text().split()])
        shutil.rmtree(coords / ".index")
        consolidated = startup_open(slides_file, coords)
        results.append({"slides": n_slides, "cells_per_slide": cells, "cold": cold, "warm": warm,
                        "consolidated": consolidated})
        print(f"{n_slides} slides x {cells} tissue cells: first open {cold['first_open_s']:.1f} s, later open "
              f"{warm['first_open_s']:.2f} s, epoch plan (rank 0 of 8) {warm['plan_s']:.2f} s; memory "
              f"{warm['rss_mb'] * 2**20 / warm['cells']:.1f} B per tissue cell after a later open and the plan "
              f"(peak {cold['peak_rss_mb'] * 2**20 / cold['cells']:.1f} B while building; the mapped index: 8 B); "
              f"first open from coords.parquet {consolidated['first_open_s']:.1f} s", flush=True)
        shutil.rmtree(coords)
        shutil.rmtree(slides_file.with_name(f"links-{n_slides}-{cells}"))
    # seconds = per_slide * slides + per_cell * cells, from the two sizes
    import numpy as np

    for key in ("cold", "warm", "consolidated"):
        matrix = np.array([[r["slides"], r["slides"] * r["cells_per_slide"]] for r in results], float)
        per_slide, per_cell = np.linalg.solve(matrix, [r[key]["first_open_s"] for r in results])
        at_scale = per_slide * 30_000 + per_cell * 30_000 * 30_000
        print(f"{key}: {per_slide * 1e3:.2f} ms per slide + {per_cell * 1e9:.2f} ns per tissue cell -> 30,000 "
              f"slides x 30,000 tissue cells: {at_scale:.0f} s")
    with os.popen("uptime") as fh:
        print(f"load: {fh.read().strip()}")
    print(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("throughput", "startup"), default="throughput")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--startup-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--wsistream-python", help="python of a virtual environment with wsistream installed")
    parser.add_argument("--sets", nargs="+", default=["jpeg", "j2k", "real"], choices=("jpeg", "j2k", "real"))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--no-mixed", dest="mixed", action="store_false", help="only 0.5 µm/px")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic slides per codec")
    parser.add_argument("--side", type=int, default=4096, help="synthetic slide side (px at 0.25 µm/px)")
    parser.add_argument("--replicate", type=int, default=8,
                        help="every path gets its slides (or store) this many times: epochs long enough to time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=32, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slides", type=int, default=30_000, help="startup: slides at the first size")
    parser.add_argument("--cells", type=int, default=2_000, help="startup: tissue cells per slide at that size")
    parser.add_argument("--work", type=Path, help="work folder (kept; default: a temporary one, removed)")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.startup_child:
        startup_child(*args.startup_child)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="slide_stream-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (throughput if args.what == "throughput" else startup)(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
