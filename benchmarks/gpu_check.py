"""One prepared command for the first minutes on a GPU: everything measured goes into one JSON file.

    python benchmarks/gpu_check.py --out gpu.json          # < 8 min on one H200; < 1 min on a CPU (tiny shapes)

On a GPU (paper shapes):
- a real tile store: `run_tile` on a synthetic slide (40x and 20x tiles of 224 px), then the tiles are read back
  through `data.tiles.sample_images`, the reader pretraining uses;
- per method at its paper backbone (MoCo v2, SwAV, Barlow Twins on ResNet-50; DINO on ViT-S/16), input 224,
  batch 128 (halved until it fits): img/s of a training step in fp32 and bf16, the share of the step spent making
  the views (the batched augmentation, RandStainNA fitted on the store), and peak GPU memory;
- `run.compile`: `run_pretrain` with run.compile = true against false on the same spec (works? img/s?);
- one torchrun launch of `pathssl pretrain` over all visible GPUs (nccl);
- `segment predict` on a slide region: tiles/s (a tile = one model output window).
The order is tile store, training steps, segment predict, torchrun, compile (the riskiest last).
Without a GPU the same code runs at tiny shapes on the CPU (CI runs it so, tests/benchmarks/test_gpu_check.py);
compile and torchrun are recorded as skipped there, with the reason.

Every measurement is guarded: a failure (an out-of-memory, a compile error) is recorded with its error and the
rest still run. The JSON is rewritten after each measurement, so a run killed at the deadline keeps what it had.
Only public entry points are used: the run_<command> functions, the method and backbone registries, the
batched augmentation and the specs in specs/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pathssl_cli, wherever the command is run from

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pathssl_cli.augment.stain import fit_stain_stats  # noqa: E402
from pathssl_cli.augment.views import BatchViews  # noqa: E402
from pathssl_cli.backbones import create_backbone  # noqa: E402
from pathssl_cli.data.tiles import sample_images  # noqa: E402
from pathssl_cli.distributed import autocast  # noqa: E402
from pathssl_cli.fileio import write_json  # noqa: E402
from pathssl_cli.methods import create_method  # noqa: E402
from pathssl_cli.optim import apply_schedules, build_optimizer, build_schedules  # noqa: E402
from pathssl_cli.runs import save_checkpoint  # noqa: E402
from pathssl_cli.specs import load_spec  # noqa: E402
from pathssl_cli.specs.pretrain import view_counts  # noqa: E402

SPECS = ROOT / "specs"
PAPER = {"mocov2": "mocov2_resnet50_pathology", "swav": "swav_resnet50_pathology",
         "barlow_twins": "barlow_twins_resnet50_pathology", "dino": "dino_vit_small_patch16_pathology"}

# Shapes per mode: `gpu` is the paper's (224 px views, batch 128); `cpu` is small enough for CI (< 1 min).
SHAPES: dict[str, dict[str, Any]] = {
    "gpu": {"slide_px": 8192, "slide_mpp": 0.25, "tile_mpp": [0.25, 0.5], "tile_px": 224, "batch": 128,
            "steps": 8, "warmup": 3, "compile_steps": 12, "compile_batch": 64, "ddp_steps": 20, "ddp_batch": 32,
            "predict_px": 2048,
            "specs": PAPER, "segment": "consep_resnet50", "predict_batch": 64, "precisions": ["fp32", "bf16"]},
    "cpu": {"slide_px": 1024, "slide_mpp": 1.0, "tile_mpp": [2.0], "tile_px": 64, "batch": 8,
            "steps": 2, "warmup": 1, "compile_steps": 4, "compile_batch": 8, "ddp_steps": 3, "ddp_batch": 8,
            "predict_px": 128,
            "specs": {m: f"tiny_{m}" for m in PAPER}, "segment": "tiny", "predict_batch": 16,
            # bf16 autocast on a CPU without AMX is emulated (~4x slower than fp32 here): it says nothing of a GPU.
            "precisions": ["fp32"]},
}


class Check:
    """Runs guarded measurements into one dict and rewrites the JSON file after each."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.deadline, self.started = out, time.monotonic() + budget_s, time.monotonic()
        self.result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def run(self, name: str, func: Callable[[], Any], min_s: float = 0.0) -> Any:
        if time.monotonic() + min_s > self.deadline:
            self.result[name] = {"ok": False, "skipped": f"time budget: needs ~{min_s:.0f} s, "
                                 f"{max(self.deadline - time.monotonic(), 0):.0f} s left"}
            self.save()
            return None
        began = time.monotonic()
        try:
            value = func()
            entry = {"ok": True, **value} if isinstance(value, dict) else {"ok": True, "value": value}
        except Exception as exc:  # one failure is a finding, not the end of the check
            value = None
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc().splitlines()[-12:]}
        entry["seconds"] = round(time.monotonic() - began, 2)
        self.result[name] = entry
        self.save()
        print(f"[{time.monotonic() - self.started:6.1f} s] {name}: "
              f"{'ok' if entry['ok'] else entry.get('error')}", flush=True)
        return value

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_json(self.out, self.result)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync point: only for timing


def environment(device: torch.device) -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "device": str(device), "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        found["bf16_supported"] = torch.cuda.is_bf16_supported()
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        version = torch.cuda.nccl.version()
        found["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return found


def make_store(work: Path, shape: dict[str, Any]) -> dict[str, Any]:
    """A real tile store from `run_tile` on a synthetic slide; returns where it is and what it holds."""
    from pathssl_cli.synthetic_slide import write_synthetic_slide
    from pathssl_cli.tiling.tiler import run_tile

    slide = work / "slide.tif"
    write_synthetic_slide(slide, width=shape["slide_px"], height=shape["slide_px"], mpp=shape["slide_mpp"],
                          tile_size=256, n_levels=3, seed=0)
    spec_path = work / "tile.toml"
    spec_path.write_text(f'kind = "tile"\n[input]\nslides = ["{slide}"]\n[tiles]\nmpp = {shape["tile_mpp"]}\n'
                         f'size = {shape["tile_px"]}\nmin_tissue = 0.3\n[output]\ndir = "{work / "store"}"\n'
                         "qc_thumbnails = false\n[run]\nworkers = 1\n")
    summary = run_tile(load_spec(spec_path, (), kind="tile"))  # type: ignore[arg-type]
    return {"store": str(work / "store"), "slide": str(slide), "tiles": summary["tiles_written"],
            "tiles_per_s": summary["tiles_per_s"], "tiles_by_mpp": summary["tiles_by_mpp"]}


def train_step(spec_name: str, store: Path, tiles: torch.Tensor, batch: int, device: torch.device,
               steps: int, warmup: int, precisions: list[str]) -> dict[str, Any]:
    """img/s of one method's training step, fp32 and bf16, with views from the batched augmentation."""
    spec: Any = load_spec(SPECS / "pretrain" / f"{spec_name}.toml",
                          [f'data.tiles=["{store}"]', f"data.batch_size={batch}"], kind="pretrain")
    n_global, n_local = view_counts(spec.method)
    recipe = spec.augment.recipe(spec.method.name, n_global, n_local)
    wanted = spec.augment.stain_options(spec.method.name)
    stain = None
    if wanted is not None:
        stain = fit_stain_stats([t.permute(1, 2, 0).numpy() for t in tiles[:64]], wanted.space, wanted.distribution,
                                gmm_components=wanted.gmm_components, seed=0)
    row: dict[str, Any] = {"spec": spec_name, "method": spec.method.name, "backbone": spec.model.backbone,
                           "global_size": recipe.global_size, "views": [n_global, n_local]}
    while True:
        try:
            for precision in precisions:
                row[precision] = _time_steps(spec, recipe, stain, tiles, batch, device, precision, steps, warmup)
            row["batch"] = batch
            if "bf16" in row and "fp32" in row:
                row["bf16_over_fp32"] = round(row["bf16"]["img_s"] / row["fp32"]["img_s"], 2)
            return row
        except torch.cuda.OutOfMemoryError:
            row.setdefault("out_of_memory_at_batch", []).append(batch)
            if batch <= 16:
                raise
            batch //= 2
        finally:  # the failed attempt's frames are gone once the except block ends: free their memory
            free_memory(device)


def _time_steps(spec: Any, recipe: Any, stain: Any, tiles: torch.Tensor, batch: int, device: torch.device,
                precision: str, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    total = warmup + steps
    backbone = create_backbone(spec.model.backbone, img_size=recipe.global_size)
    method = create_method(backbone, spec.method, steps_per_epoch=max(1, total // 2), total_steps=total).to(device)
    optimizer = build_optimizer(spec.optim.name, method.param_groups(), momentum=spec.optim.momentum,
                                betas=spec.optim.betas, eta=spec.optim.lars_eta,
                                no_decay_lr_scale=spec.optim.no_decay_lr_scale)
    schedules = build_schedules(peak_lr=spec.optim.peak_lr(batch), total_steps=total,
                                weight_decay=spec.optim.weight_decay)
    views = BatchViews(recipe, backbone.mean, backbone.std, stain=stain)
    generator = torch.Generator(device=device).manual_seed(0)
    pick = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, view_s = [], []
    for step in range(total):
        images = tiles[torch.randint(len(tiles), (batch,), generator=pick)].to(device, non_blocking=True)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            batch_views = views(images, generator)
        sync(device)
        made = time.perf_counter()
        apply_schedules(optimizer, schedules, step)
        with autocast(device, precision):  # type: ignore[arg-type]
            loss, _ = method(batch_views, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.on_before_optimizer_step(step)
        optimizer.step()
        method.on_after_optimizer_step(step)
        sync(device)
        if step >= warmup:
            step_s.append(time.perf_counter() - start)
            view_s.append(made - start)
    if not torch.isfinite(loss.detach()).item():
        raise FloatingPointError(f"loss {loss.item()} after {total} steps")
    median = statistics.median(step_s)
    found = {"img_s": round(batch / median, 1), "step_s": round(median, 4),
             "views_share": round(statistics.median(view_s) / median, 3), "loss": round(float(loss.detach()), 4)}
    if device.type == "cuda":
        found["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del method, optimizer
    return found


def compile_check(store: Path, work: Path, shape: dict[str, Any]) -> dict[str, Any]:
    """`run_pretrain` with run.compile on and off: does it run, and what does it change?"""
    from pathssl_cli.pretrain import run_pretrain

    found: dict[str, Any] = {}
    for flag in (False, True):
        out = work / f"compile_{flag}"
        spec: Any = load_spec(SPECS / "pretrain" / f"{PAPER['mocov2']}.toml", [
            # The paper spec counts ImageNet epochs (run.epochs + run.epoch_images): one "epoch" of N steps.
            f'data.tiles=["{store}"]', f"data.batch_size={shape['compile_batch']}",
            f"run.epoch_images={shape['compile_batch'] * shape['compile_steps']}",
            "run.epochs=1",
            f'run.output_dir="{out}"', f"run.compile={str(flag).lower()}", "run.log_every=1",
            "data.workers=2"], kind="pretrain")
        began = time.perf_counter()
        summary = run_pretrain(spec)
        rates = [r["img_per_s"] for r in _metrics(out)][2:]
        found["compiled" if flag else "eager"] = {
            "seconds": round(time.perf_counter() - began, 1), "final_loss": summary["final_loss"],
            "img_s_after_step_2": round(statistics.median(rates), 1) if rates else None}
    return found


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def torchrun_check(store: Path, work: Path, shape: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One `torchrun -m pathssl_cli pretrain` over every visible GPU (nccl), `ddp_batch` tiles per GPU."""
    gpus = torch.cuda.device_count()
    out = work / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "pathssl_cli", "pretrain", str(SPECS / "pretrain" / f"{PAPER['mocov2']}.toml"),
               "--set", f'data.tiles=["{store}"]', "--set", f"data.batch_size={shape['ddp_batch'] * gpus}",
               "--set", f"run.epoch_images={shape['ddp_batch'] * gpus * shape['ddp_steps']}", "--set", "run.epochs=1",
               "--set", f'run.output_dir="{out}"',
               "--set", "run.log_every=5", "--set", "data.workers=2"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PATHSSL_PROGRESS": "0"}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    found: dict[str, Any] = {"gpus": gpus, "backend": "nccl" if gpus > 1 else "none (one process)",
                             "returncode": done.returncode, "seconds": round(time.perf_counter() - began, 1),
                             "output_tail": (done.stdout + done.stderr)[-3000:]}
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    found.update(world_size=run.get("world_size"), status=run.get("status"))
    rates = [r["img_per_s"] for r in _metrics(out)][1:]
    found["img_s"] = round(statistics.median(rates), 1) if rates else None
    if done.returncode != 0:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
        raise RuntimeError(f"torchrun exited {done.returncode}: {' | '.join(errors) or found['output_tail'][-800:]}")
    return found


def predict_check(slide: Path, work: Path, shape: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`segment predict` tiles/s on a slide region, with an untrained HoVer-Net of the paper's shape."""
    from pathssl_cli.segment.hovernet import mode_sizes
    from pathssl_cli.segment.predict import run_segment_predict
    from pathssl_cli.segment.train import build_model, model_record

    side = shape["predict_px"]
    spec: Any = load_spec(SPECS / "segment" / f"{shape['segment']}.toml", [
        f'run.output_dir="{work / "segment"}"', f'run.device="{device.type}"', f'predict.inputs=["{slide}"]',
        f"predict.region=[0, 0, {side}, {side}]", "predict.overlay=false",
        f"predict.mpp={shape['slide_mpp']}",  # the synthetic slide's own resolution: no resampling is timed
        f"predict.batch_size={shape['predict_batch']}", "model.weights=\"random\""], kind="segment",
        check_inputs=False)
    model = build_model(spec)
    save_checkpoint({"hovernet": model_record(model), "model": model.state_dict()},
                    Path(spec.run.output_dir) / "model.pt")
    began = time.perf_counter()
    summary = run_segment_predict(spec)
    seconds = time.perf_counter() - began
    out_px = mode_sizes(spec.model.mode, spec.model.input_size)[1]
    tiles = int(np.ceil(side / out_px)) ** 2
    return {"region_px": side, "mode": spec.model.mode, "backbone": spec.model.backbone, "output_window_px": out_px,
            "windows": tiles, "tiles_per_s": round(tiles / seconds, 2),
            "megapixels_per_s": round(side * side / 1e6 / seconds, 3), "instances": summary["instances"],
            "precision": spec.run.precision if device.type == "cuda" else "fp32",
            "note": "includes model load and post-processing; untrained weights"}


def _out_of_time(signum: int, frame: Any) -> None:
    raise TimeoutError("hard time limit reached (budget + 50 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto",
                        help="auto: paper shapes on a GPU, tiny shapes on the CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting measurements after this long (default 420 on GPU, 50 on CPU)")
    parser.add_argument("--methods", nargs="+", default=list(PAPER), choices=list(PAPER))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    mode = ("gpu" if cuda else "cpu") if args.mode == "auto" else args.mode
    shape = SHAPES[mode]
    device = torch.device("cuda:0" if cuda else "cpu")
    budget = args.budget_s or (420.0 if mode == "gpu" else 50.0)
    check = Check(args.out, budget)
    if mode == "gpu":  # a hard stop inside the 8 minutes: the measurement under way is recorded as timed out
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(int(budget + 50))
    check.result.update(mode=mode, shapes={k: v for k, v in shape.items() if k != "specs"})
    check.run("environment", lambda: environment(device))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        store = check.run("tile_store", lambda: make_store(work, shape))
        if store is None:
            return
        store_dir = Path(store["store"])
        tiles = torch.from_numpy(np.stack(sample_images([store_dir], 512, seed=0))).permute(0, 3, 1, 2).contiguous()
        if cuda:
            tiles = tiles.pin_memory()
        for method in args.methods:
            check.run(f"train_step/{method}", lambda m=method: train_step(
                shape["specs"][m], store_dir, tiles, shape["batch"], device, shape["steps"], shape["warmup"],
                shape["precisions"]),
                min_s=30 if cuda else 3)
        check.run("segment_predict", lambda: predict_check(Path(store["slide"]), work, shape, device),
                  min_s=20 if cuda else 3)
        if cuda:  # the riskiest last: a slow compile then costs only itself
            check.run("torchrun", lambda: torchrun_check(store_dir, work, shape, device), min_s=60)
            check.run("compile", lambda: compile_check(store_dir, work, shape), min_s=120)
        else:
            reason = "no GPU: inductor compile and an nccl launch are what this check is for on a GPU"
            check.result["torchrun"] = {"ok": False, "skipped": reason}
            check.result["compile"] = {"ok": False, "skipped": reason}
    check.save()
    failed = [k for k, v in check.result.items() if isinstance(v, dict) and v.get("ok") is False
              and "skipped" not in v]
    print(f"wrote {args.out} ({check.result['elapsed_s']} s); failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
