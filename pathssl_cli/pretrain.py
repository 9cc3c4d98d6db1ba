"""`pathssl pretrain`: the one SSL training loop (MoCo v2, SwAV, Barlow Twins, DINO), one process or torchrun.

Read top to bottom: setup (distributed, data, stain statistics, model, optimiser, schedules), resume, the
loop, outputs. The method plugs in through the contract of `pathssl_cli.methods.base`; views are made batched
on the training device by `pathssl_cli.augment.views.BatchViews` from uint8 tiles streamed by
`pathssl_cli.data.tiles`.

Exact resume: the view generator and torch's global RNG are re-seeded at every step from (seed, rank, step),
and the data position is a pure function of the step (step × per-rank batch samples), so a run killed at any
point and resumed from its last checkpoint replays exactly the steps an uninterrupted run would have made, on
every rank.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathssl_cli.augment.stain import StainStats, fit_stain_stats
from pathssl_cli.augment.views import BatchViews
from pathssl_cli.backbones import create_backbone, export_backbone
from pathssl_cli.console import info, progress, warn
from pathssl_cli.distributed import (
    DistInfo,
    all_reduce_sum,
    autocast,
    barrier,
    distributed_session,
)
from pathssl_cli.errors import SpecError, WorkFailed
from pathssl_cli.methods import create_method
from pathssl_cli.optim import apply_schedules, build_optimizer, build_schedules
from pathssl_cli.pretrain_data import PretrainStream, left_out_slides, open_stream, stain_images
from pathssl_cli.runs import RunDir, claim_run_dir, load_checkpoint, open_run, save_checkpoint
from pathssl_cli.specs.pretrain import PretrainSpec, view_counts

CHECKPOINT = Path("checkpoints") / "last.pt"
#: Test hook: at this step, print a marker line and block until killed (lets the resume test SIGKILL mid-run
#: at a known step without sleeping or racing the training loop).
STOP_HOOK = "PATHSSL_TEST_BLOCK_AT_STEP"


def run_pretrain(spec: PretrainSpec) -> dict[str, Any]:
    """Pre-train `spec.model.backbone` with `spec.method`; returns the summary written to metrics.json."""
    with distributed_session(spec.run.device) as dist_info:
        return _pretrain(spec, dist_info)


def resolve_precision(choice: str, device: torch.device) -> str:
    """'auto' = bf16 autocast on CUDA (tensor cores, no loss scaling), fp32 on CPU (exact, portable)."""
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return choice


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct 63-bit seed per (run seed, rank, step): views and dropout differ across ranks and steps."""
    return (seed * 1_000_003 + step * 65_537 + rank * 7_919 + 12_345) % (2**63 - 1)


def _pretrain(spec: PretrainSpec, dist_info: DistInfo) -> dict[str, Any]:
    run_cfg, device, world, rank = spec.run, dist_info.device, dist_info.world_size, dist_info.rank
    precision = resolve_precision(run_cfg.precision, device)
    if spec.data.batch_size % world:
        raise SpecError(f"data.batch_size = {spec.data.batch_size} cannot be split evenly over {world} "
                        f"processes; use a multiple of {world}")
    local_batch = spec.data.batch_size // world
    out = Path(run_cfg.output_dir)
    checkpoint_path = out / CHECKPOINT
    # A different run there, or one begun from other inputs, is refused (or moved aside); training resumes by
    # the narrower rule (runs.rule.Rule): a run begun before fingerprints existed still resumes.
    claim_run_dir(spec, out, rule="resume", is_main=dist_info.is_main)
    if checkpoint_path.exists() and not run_cfg.resume:
        raise SpecError(f"{out} already holds a run ({checkpoint_path}). Set run.resume = true to continue "
                        "it, or choose another run.output_dir.")
    resumed = load_checkpoint(checkpoint_path) if run_cfg.resume and checkpoint_path.exists() else None
    n_global, n_local = view_counts(spec.method)
    recipe = spec.augment.recipe(spec.method.name, n_global, n_local)

    # ---------------------------------------------------------------------------------------- data
    # (before the run directory is made: a problem with the tiles is a spec error, nothing started)
    stream = open_stream(spec, rank, world, local_batch, recipe.global_size)
    data_steps_per_epoch = len(stream) // local_batch  # every rank streams len(stream) tiles a pass
    if data_steps_per_epoch == 0:
        raise SpecError(f"data holds {stream.epoch_length()} usable tiles or slide patches per epoch, fewer "
                        f"than one batch (data.batch_size = {spec.data.batch_size}); add data or lower the batch "
                        "size")
    # The epoch of schedules and methods: a pass over the tiles, or run.epoch_images (ImageNet epochs).
    steps_per_epoch = (max(1, run_cfg.epoch_images // spec.data.batch_size) if run_cfg.epoch_images
                       else data_steps_per_epoch)
    total_steps = run_cfg.steps or max(1, math.ceil(run_cfg.epochs * steps_per_epoch))  # type: ignore[operator]
    if resumed is not None:
        _check_resumable(resumed, world, data_steps_per_epoch, total_steps, checkpoint_path)

    with open_run(spec, out, seed=run_cfg.seed, world_size=world, is_main=dist_info.is_main,
                  resumed=resumed is not None) as run:
        # -------------------------------------------------------------------------- stain statistics
        stain = _stain_statistics(spec, run, resumed, dist_info, stream)

        # ------------------------------------------------------------------------------------ model
        torch.manual_seed(run_cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        backbone = create_backbone(spec.model.backbone, spec.model.weights,
                                   img_size=spec.model.img_size or recipe.global_size,
                                   network=spec.model.weights_network, drop_path_rate=spec.model.drop_path_rate)
        method = create_method(backbone, spec.method, steps_per_epoch=steps_per_epoch,
                               total_steps=total_steps)
        method.to(device)
        if world > 1 and device.type == "cuda" and not getattr(spec.method, "shuffle_bn", False):
            # Barlow Twins, SwAV and DINO (with BN) use SyncBN in their official code; MoCo
            # shuffles BN instead.
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        memory_format = torch.channels_last if run_cfg.channels_last else torch.contiguous_format
        if run_cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(spec.optim.name, method.param_groups(), momentum=spec.optim.momentum,
                                    betas=spec.optim.betas, eta=spec.optim.lars_eta,
                                    no_decay_lr_scale=spec.optim.no_decay_lr_scale)
        schedules = build_schedules(
            peak_lr=spec.optim.peak_lr(spec.data.batch_size), total_steps=total_steps,
            warmup_steps=round(spec.optim.warmup_epochs * steps_per_epoch),
            final_lr_fraction=spec.optim.final_lr_fraction,
            warmup_start_fraction=spec.optim.warmup_start_fraction,
            weight_decay=spec.optim.weight_decay, weight_decay_end=spec.optim.weight_decay_end)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        start_step = 0
        if resumed is not None:
            method.load_state_dict(resumed["method"])
            optimizer.load_state_dict(resumed["optimizer"])
            scaler.load_state_dict(resumed["scaler"])
            _set_rng_states(resumed["rng"])
            start_step = int(resumed["step"])
            info(f"resuming {out} at step {start_step}/{total_steps}")
        if dist_info.is_main:  # records of steps after the checkpoint (or of a run that never made one) go
            _truncate_metrics(run, start_step)

        model: nn.Module = method
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None)
        if run_cfg.compile:
            method.backbone.compile()  # in place: state_dict keys (and so checkpoints) stay the same
        make_views = BatchViews(recipe, backbone.mean, backbone.std, stain=stain)
        generator = torch.Generator(device=device)
        batches = _batches(stream, local_batch, spec.data.workers, data_steps_per_epoch, start_step,
                           pin_memory=device.type == "cuda")

        # ------------------------------------------------------------------------------------- loop
        losses: list[tuple[int, float]] = []
        images_per_step = local_batch * world
        block_at = int(os.environ.get(STOP_HOOK, "-1"))
        bar = progress(total=total_steps, desc=f"pretrain {spec.method.name}", unit="step",
                       initial=start_step)
        window_start, window_steps = time.perf_counter(), 0
        step = start_step
        method.train()
        for step in range(start_step, total_steps):
            images = next(batches).to(device, non_blocking=True)
            seed = step_seed(run_cfg.seed, rank, step)
            generator.manual_seed(seed)
            torch.manual_seed(seed)  # dropout / drop-path; re-seeded per step so resume needs no RNG replay
            with torch.no_grad():
                views = [v.contiguous(memory_format=memory_format) for v in make_views(images, generator)]
            lr = apply_schedules(optimizer, schedules, step)
            with autocast(device, precision):  # type: ignore[arg-type]
                loss, logs = model(views, step)
            # CPU-GPU sync point: needed every step so that a NaN never reaches the weights or a checkpoint.
            global_loss = float(all_reduce_sum(loss.detach().float()).item()) / world
            if not math.isfinite(global_loss):
                _fail_non_finite(global_loss, step, steps_per_epoch, checkpoint_path)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the method's clipping / freezing sees true gradients
            method.on_before_optimizer_step(step)
            scaler.step(optimizer)
            scaler.update()
            method.on_after_optimizer_step(step)

            losses.append((step, global_loss))
            window_steps += 1
            done = step + 1
            if done % run_cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - window_start
                img_per_s = images_per_step * window_steps / max(elapsed, 1e-9)
                if dist_info.is_main:
                    record = {k: float(v) for k, v in logs.items()}
                    record.update(loss=global_loss, lr=lr, img_per_s=img_per_s, epoch=step / steps_per_epoch,
                                  weight_decay=float(schedules.weight_decay[min(step, total_steps - 1)]))
                    run.metrics.log(step, **record)
                bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{img_per_s:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if done % run_cfg.checkpoint_every == 0 or done == total_steps:
                if not all(bool(torch.isfinite(p).all()) for p in method.parameters()):
                    # a finite loss can still give an overflowing update: never checkpoint such weights
                    _fail_non_finite(float("nan"), step, steps_per_epoch, checkpoint_path, what="weights")
                _save(checkpoint_path, dist_info, method, optimizer, scaler, done, data_steps_per_epoch,
                      total_steps, world, local_batch, stain, spec)
            if done == block_at:
                print(f"{STOP_HOOK} {done}", flush=True)
                sys.stdin.read()  # blocks until the test kills this process
        bar.close()

        # ---------------------------------------------------------------------------------- outputs
        summary: dict[str, Any] = {"method": spec.method.name, "backbone": spec.model.backbone,
                                   "steps": total_steps,
                                   "steps_per_epoch": steps_per_epoch, "global_batch": spec.data.batch_size,
                                   "final_loss": losses[-1][1] if losses else None,
                                   "checkpoint": str(checkpoint_path)}
        left_out = left_out_slides(stream, out)
        if left_out:
            run.record["slides_left_out"] = [{"slide": path, "reason": why} for path, why in left_out]
            warn(f"{len(left_out)} slide(s) were left out of pre-training (their patches came from the other "
                 "slides): " + "; ".join(f"{path}: {why}" for path, why in left_out[:20])
                 + (f" (and {len(left_out) - 20} more, listed in run.json)" if len(left_out) > 20 else ""))
        if dist_info.is_main:
            # the network the method's official evaluation uses: DINO's teacher (unless method.export), else
            # the student / query encoder
            exported = method.exported_backbone()
            summary["exported_network"] = method.exported_network
            summary["backbone_file"] = str(export_backbone(exported, out / "backbone.safetensors"))
            _plot_losses(run, out / "loss_curve.png", spec.method.name)
            run.write_json("metrics.json", summary)
            info(f"pre-trained backbone: {summary['backbone_file']} (full checkpoint: {checkpoint_path})")
        barrier()
        return summary


# ------------------------------------------------------------------------------------------------- helpers
def _batches(stream: PretrainStream, local_batch: int, workers: int, steps_per_epoch: int, start_step: int,
             pin_memory: bool) -> Iterator[torch.Tensor]:
    """Endless uint8 batches; epoch e is steps [e·S, (e+1)·S), so any step's data position is known."""
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    while True:
        stream.set_epoch(epoch)
        stream.skip(step_in_epoch * local_batch)
        loader = torch.utils.data.DataLoader(stream, batch_size=local_batch, num_workers=workers,
                                             drop_last=True, pin_memory=pin_memory)
        for _, batch in zip(range(steps_per_epoch - step_in_epoch), loader, strict=False):
            yield batch
        epoch, step_in_epoch = epoch + 1, 0


def _fail_non_finite(value: float, step: int, steps_per_epoch: int, checkpoint_path: Path,
                     what: str = "loss") -> None:
    kept = (f"the last good checkpoint is kept at {checkpoint_path}" if checkpoint_path.exists()
            else "no checkpoint had been written yet")
    became = (f"the loss became {value}" if what == "loss" else
              "the weights became NaN or infinite (an overflowing update)")
    raise WorkFailed(f"{became} at step {step} (epoch {step // steps_per_epoch}); training stopped before "
                     f"saving anything from this step, and {kept}. Lower optim.lr or lengthen "
                     "optim.warmup_epochs, or use run.precision = 'fp32'/'bf16' instead of fp16, then rerun "
                     "(run.resume = true continues from the checkpoint).")


def _check_resumable(state: dict[str, Any], world: int, steps_per_epoch: int, total_steps: int,
                     path: Path) -> None:
    problems = []
    if state["world_size"] != world:
        problems.append(f"it was written by {state['world_size']} processes, this run has {world} (the data "
                        "position is per process)")
    if state["data_steps_per_epoch"] != steps_per_epoch:
        problems.append(f"a pass over its tiles took {state['data_steps_per_epoch']} steps, the tiles now "
                        f"give {steps_per_epoch}")
    if state["total_steps"] != total_steps:
        problems.append(f"it planned {state['total_steps']} steps, the spec now gives {total_steps}")
    if problems:
        raise SpecError(f"{path}: cannot resume exactly: " + "; ".join(problems) +
                        ". Restore the original settings or start a new run.output_dir.")


def _stain_statistics(spec: PretrainSpec, run: RunDir, resumed: dict[str, Any] | None,
                      dist_info: DistInfo, stream: PretrainStream) -> StainStats | None:
    """The RandStainNA statistics: from the checkpoint, the given file, or fitted on a sample of the data."""
    wanted = spec.augment.stain_options(spec.method.name)
    if wanted is None:
        return None
    target = run.file("stain_statistics.json")
    if resumed is not None and resumed.get("stain") is not None:
        return StainStats.from_dict(resumed["stain"])
    if spec.augment.stain_statistics is not None:
        stats = StainStats.load(spec.augment.stain_statistics)
        given = {"space": stats.space, "distribution": stats.distribution}
        asked = {"space": wanted.space, "distribution": wanted.distribution}
        if given != asked:
            differ = ", ".join(f"{k} {given[k]!r} (the recipe asks for {asked[k]!r})" for k in given
                               if given[k] != asked[k])
            raise SpecError(f"{spec.augment.stain_statistics}: the statistics have {differ}; refit them (leave "
                            "augment.stain_statistics unset) or set augment.overrides.stain to match the file")
    elif dist_info.is_main:
        info(f"fitting stain statistics ({wanted.space}, {wanted.distribution}) on {spec.augment.stain_fit_tiles} "
             "tiles")
        sample = stain_images(stream, spec, spec.augment.stain_fit_tiles)
        stats = fit_stain_stats(sample, wanted.space, wanted.distribution, gmm_components=wanted.gmm_components,
                                seed=spec.run.seed)
    if dist_info.is_main:
        stats.save(target)
    barrier()  # the other ranks read what rank 0 fitted, so every rank samples from the same distribution
    return StainStats.load(target)


def _rng_states() -> dict[str, Any]:
    _, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuples(states["python"]))
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _save(path: Path, dist_info: DistInfo, method: nn.Module, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, step: int, data_steps_per_epoch: int, total_steps: int, world: int,
          local_batch: int, stain: StainStats | None, spec: PretrainSpec) -> None:
    """The full checkpoint: method (heads, teacher, queues, centre), optimiser, scaler, RNG, data position."""
    if not dist_info.is_main:
        return
    save_checkpoint({
        "method": method.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "step": step, "data_steps_per_epoch": data_steps_per_epoch, "total_steps": total_steps,
        "world_size": world, "data": {"epoch": step // data_steps_per_epoch,
                                      "samples_into_epoch": step % data_steps_per_epoch * local_batch},
        "rng": _rng_states(), "stain": stain.to_dict() if stain is not None else None,
        "method_name": spec.method.name, "backbone": spec.model.backbone}, path)


def _truncate_metrics(run: RunDir, start_step: int) -> None:
    """Drop records of steps the killed run made after its checkpoint: they are about to be redone."""
    kept = [r for r in run.metrics.read() if r.get("step", -1) < start_step]
    write_json_lines(run.metrics.path, kept)


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    import json

    from pathssl_cli.fileio import atomic_write

    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def _plot_losses(run: RunDir, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in run.metrics.read() if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set(xlabel="step", ylabel="loss", title=f"{title} pre-training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from pathssl_cli.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
