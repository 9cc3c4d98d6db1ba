"""Training-step throughput of the tiny pre-training specs (img/s, medians), fp32 against bf16 autocast.

One step is what `pathssl_cli.pretrain` does per batch: batched views on the device, forward, backward, the
method's hooks and the optimiser step; the data stream is left out (a fixed uint8 batch) so that the figure is
the training step's own cost. bf16 is timed in the same run as fp32 (the baseline), so their ratio
is meaningful on a shared machine.

`--data`: feed the steps from a data stream instead (fp32), each batch waited for as `pathssl pretrain` does:
`tiles` (a tile store of the shared real slides at 0.5 and 1 µm/px, 224 px, as specs/tile/cpu_real.toml makes)
against `slides` (the same slides streamed directly at 0.5 and 1 µm/px, 224 px), alternating, medians of
`--repeats`; the step cost includes waiting for `--data-workers` DataLoader workers (issue 23's target: slides
within 10% of the tile store).

    python benchmarks/train_step_throughput.py [--methods mocov2 dino dinov2] [--steps 10] [--threads 2] [--json]
    python benchmarks/train_step_throughput.py --data --methods mocov2 --steps 30 --data-workers 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pathssl_cli.augment.views import BatchViews
from pathssl_cli.backbones import create_backbone
from pathssl_cli.distributed import autocast
from pathssl_cli.methods import create_method
from pathssl_cli.optim import apply_schedules, build_optimizer, build_schedules
from pathssl_cli.specs import load_spec
from pathssl_cli.specs.pretrain import PretrainSpec, view_counts
from pathssl_cli.synthetic import write_image_folder

SPECS = Path(__file__).resolve().parents[1] / "specs" / "pretrain"


def time_steps(spec: PretrainSpec, precision: str, steps: int, warmup: int,
               batches: Iterator[torch.Tensor] | None = None) -> list[float]:
    """Seconds per training step (after `warmup` untimed steps), for the spec's method at its batch size; with
    `batches`, each step first waits for its batch."""
    torch.manual_seed(0)
    n_global, n_local = view_counts(spec.method)
    recipe = spec.augment.recipe(spec.method.name, n_global, n_local)
    # RandStainNA needs fitted statistics; without them the recipe is timed without it (a few % of a step)
    recipe = recipe.model_copy(update={"stain": recipe.stain.model_copy(update={"p": 0.0})})
    backbone = create_backbone(spec.model.backbone, img_size=recipe.global_size)
    total = warmup + steps
    method = create_method(backbone, spec.method, steps_per_epoch=max(1, total // 2), total_steps=total)
    optimizer = build_optimizer(spec.optim.name, method.param_groups(), momentum=spec.optim.momentum,
                                eta=spec.optim.lars_eta, no_decay_lr_scale=spec.optim.no_decay_lr_scale)
    schedules = build_schedules(peak_lr=spec.optim.peak_lr(spec.data.batch_size), total_steps=total,
                                weight_decay=spec.optim.weight_decay)
    views = BatchViews(recipe, backbone.mean, backbone.std)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (spec.data.batch_size, 3, 64, 64), dtype=torch.uint8)
    device = torch.device("cpu")
    times = []
    for step in range(total):
        start = time.perf_counter()
        if batches is not None:
            images = next(batches)
        with torch.no_grad():
            batch_views = views(images, generator)
        apply_schedules(optimizer, schedules, step)
        with autocast(device, precision):  # type: ignore[arg-type]
            loss, _ = method(batch_views, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.on_before_optimizer_step(step)
        optimizer.step()
        method.on_after_optimizer_step(step)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _endless(stream, batch: int, workers: int) -> Iterator[torch.Tensor]:  # type: ignore[no-untyped-def]
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        yield from torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, drop_last=True)


def data_fed(args: argparse.Namespace, tmp: Path) -> list[dict[str, object]]:
    """Tile store against slides, fp32, alternating per repeat; the ratio is what issue 23 targets."""
    from pathssl_cli.data.slide_arrays import open_slide_index
    from pathssl_cli.data.slide_index import CoordSettings
    from pathssl_cli.data.slide_stream import MppSampling, SlideStream
    from pathssl_cli.data.tiles import TileStream
    from pathssl_cli.tiling.tiler import run_tile

    slides = sorted(str(p) for p in (SPECS.parents[2] / "shared" / "data" / "wsi").glob("*.svs"))
    if not slides:
        raise SystemExit("--data needs the real slides in ../shared/data/wsi")
    tile_spec = tmp / "tile.toml"
    tile_spec.write_text(f'kind = "tile"\n[input]\nslides = {json.dumps(slides)}\n[tiles]\nmpp = [0.5, 1.0]\n'
                         f'size = 224\n[output]\ndir = "{tmp / "store"}"\nqc_thumbnails = false\n[run]\nworkers = 1\n')
    run_tile(load_spec(tile_spec))  # type: ignore[arg-type]
    # the store is listed `--replicate` times so that its epochs outlast the timed steps (a DataLoader restarting
    # its workers every step would be measured instead of the data); the slides are not: each copy would be a slide
    # of its own, opened and cached apart. Their epoch is a batch; in-process (workers 0) they stay open across.
    index = open_slide_index([(Path(s), None) for s in slides], tmp / "coords", CoordSettings())
    folder = write_image_folder(tmp, 1, 64, seed=0, splits=("train",))
    rows = []
    for method in args.methods:
        spec = load_spec(SPECS / f"tiny_{method}.toml", [f'data.tiles=["{folder}"]'])
        assert isinstance(spec, PretrainSpec)
        batch = spec.data.batch_size
        streams = {
            "tiles": TileStream([tmp / "store"] * args.replicate, image_size=224, mpp_weights={0.5: 1.0, 1.0: 1.0},
                                shuffle_buffer=1000, batch_size=batch),
            "slides": SlideStream(index, size=224, mpp=MppSampling(values=(0.5, 1.0), weights=(1.0, 1.0)),
                                  batch_size=batch, min_tissue=0.4)}
        runs: dict[str, list[float]] = {name: [] for name in streams}
        for _ in range(args.repeats):
            for name, stream in streams.items():
                batches = _endless(stream, batch, args.data_workers)
                runs[name].append(statistics.median(time_steps(spec, "fp32", args.steps, args.warmup, batches)))
        row: dict[str, object] = {"method": method, "batch": batch, "threads": args.threads,
                                  "data_workers": args.data_workers}
        for name, seconds in runs.items():
            row[f"{name}_img_s"] = round(batch / statistics.median(seconds), 1)
            row[f"{name}_runs"] = [round(batch / s, 1) for s in seconds]
        row["slides_over_tiles"] = round(row["slides_img_s"] / row["tiles_img_s"], 3)  # type: ignore[operator]
        rows.append(row)
        if not args.json:
            print(f"{method:13s} batch {batch:3d}  tiles {row['tiles_img_s']:7.1f} img/s  slides "
                  f"{row['slides_img_s']:7.1f} img/s  slides/tiles {row['slides_over_tiles']:.3f}  "
                  f"(runs {row['tiles_runs']} / {row['slides_runs']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["mocov2", "swav", "barlow_twins", "dino", "dinov2"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, caches)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--data", action="store_true", help="feed the steps from a tile store, then from slides")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="DataLoader workers with --data (0: in-process, as the CPU recipes)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per stream with --data")
    parser.add_argument("--replicate", type=int, default=40, help="copies of the store with --data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    if args.data:
        with tempfile.TemporaryDirectory() as tmp:
            rows = data_fed(args, Path(tmp))
        if args.json:
            print(json.dumps(rows, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder(tmp, 1, 64, seed=0, splits=("train",))  # only so that the specs validate
        for method in args.methods:
            spec = load_spec(SPECS / f"tiny_{method}.toml", [f'data.tiles=["{folder}"]'])
            row: dict[str, object] = {"method": method, "backbone": spec.model.backbone,
                                      "batch": spec.data.batch_size, "threads": args.threads}
            for precision in ("fp32", "bf16"):
                seconds = statistics.median(time_steps(spec, precision, args.steps, args.warmup))  # type: ignore
                row[f"{precision}_img_s"] = round(spec.data.batch_size / seconds, 1)
            row["bf16_over_fp32"] = round(row["bf16_img_s"] / row["fp32_img_s"], 2)  # type: ignore[operator]
            rows.append(row)
            if not args.json:
                print(f"{method:13s} {row['backbone']:12s} batch {row['batch']:3d}  "
                      f"fp32 {row['fp32_img_s']:7.1f} "
                      f"img/s  bf16 {row['bf16_img_s']:7.1f} img/s  bf16/fp32 {row['bf16_over_fp32']:.2f}x",
                      flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
