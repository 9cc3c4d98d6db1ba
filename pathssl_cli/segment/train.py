"""`pathssl segment train`: HoVer-Net's two-phase schedule on a registry encoder.

Schedule (vqdang/hover_net `models/hovernet/opt.py`): phase 1 trains the decoders with the encoder frozen,
phase 2 the whole network from the phase-1 weights; each phase has a fresh Adam (lr 1e-4, betas 0.9/0.999)
and a StepLR (step 25 epochs, gamma 0.1). Checkpoints hold the phase and epoch, so a killed run resumes at the
next epoch of the phase it was in. torchrun launches DDP; AMP runs on GPU only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from pathssl_cli.console import info, progress
from pathssl_cli.distributed import DistInfo, autocast, distributed_session
from pathssl_cli.errors import Problem, SpecError, WorkFailed
from pathssl_cli.runs import claim_run_dir, load_checkpoint, open_run, save_checkpoint, segment_model_path
from pathssl_cli.runs.fingerprints import SEGMENT_MODEL_FILE
from pathssl_cli.segment.datasets import NucleiSource, Subset, open_source, read_subset_ids
from pathssl_cli.segment.hovernet import HoVerNet, HoVerNetConfig, mode_sizes
from pathssl_cli.segment.losses import LossWeights, hovernet_loss
from pathssl_cli.segment.patches import AugmentConfig, HoVerNetPatches
from pathssl_cli.specs.segment import SegmentSpec


# ------------------------------------------------------------------------------------------ model files
def build_model(spec: SegmentSpec) -> HoVerNet:
    from pathssl_cli.backbones import create_backbone

    m = spec.model
    in_size, _ = mode_sizes(m.mode, m.input_size)
    encoder = create_backbone(
        m.backbone, weights=m.weights, img_size=math.ceil(in_size / 32) * 32, normalization=m.normalization
    )
    config = HoVerNetConfig(
        mode=m.mode, input_size=m.input_size, num_types=_num_classes(spec), decoder_width=m.decoder_width,
        encoder_stem=m.encoder_stem,
    )
    return HoVerNet(encoder, config)


def _num_classes(spec: SegmentSpec) -> int:
    """Classes of the type branch including background (0 = no branch)."""
    return spec.data.num_types + 1 if spec.data.num_types > 0 else 0


def model_record(model: HoVerNet) -> dict[str, Any]:
    """Everything needed to rebuild the network, as plain values (loadable with weights_only=True)."""
    c = model.config
    return {
        "backbone": model.encoder.name,
        "mode": c.mode,
        "input_size": c.input_size,
        "num_types": c.num_types,
        "decoder_width": c.decoder_width,
        "encoder_stem": c.encoder_stem,
        "mean": list(model.encoder.mean),
        "std": list(model.encoder.std),
    }


def load_model(path: Path, device: torch.device | str = "cpu", *, channels_last: bool = False) -> HoVerNet:
    """Rebuild a HoVer-Net saved by `segment train` (model.pt) and load its weights strictly, in NHWC layout
    when `channels_last` (see `HoVerNet.use_channels_last`)."""
    from pathssl_cli.backbones import create_backbone

    state = load_checkpoint(path)
    if "hovernet" not in state or "model" not in state:
        raise SpecError(f"{path}: not a `pathssl segment train` model file (no 'hovernet' record)")
    record = state["hovernet"]
    in_size, _ = mode_sizes(record["mode"], record["input_size"])
    encoder = create_backbone(
        record["backbone"],
        img_size=math.ceil(in_size / 32) * 32,
        normalization=(tuple(record["mean"]), tuple(record["std"])),
    )
    model = HoVerNet(
        encoder,
        HoVerNetConfig(
            mode=record["mode"],
            input_size=record["input_size"],
            num_types=record["num_types"],
            decoder_width=record["decoder_width"],
            # Files written before the stem choice existed were all trained with the stride-4 stem.
            encoder_stem=record.get("encoder_stem", "stride4"),
        ),
    )
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).use_channels_last(channels_last).eval()


def default_model_path(spec: SegmentSpec) -> Path:
    return segment_model_path(spec)  # one rule, also what `segment eval` fingerprints


# ------------------------------------------------------------------------------------------------ data
def open_split(spec: SegmentSpec, split: str) -> list[NucleiSource]:
    d = spec.data
    sources = [
        open_source(d.format, Path(root), merge_consep_types=d.merge_consep_types, num_types=d.num_types)
        for root in getattr(d, split)
    ]
    if split == "train" and d.subset is not None:
        keep = read_subset_ids(Path(d.subset))
        sources = [Subset(s, keep) for s in sources]
        if sum(len(s) for s in sources) == 0:
            raise SpecError(f"data.subset {d.subset}: none of its {len(keep)} ids names a training image")
    return sources


def type_range_problems(sources: list[NucleiSource], num_types: int, where: str) -> list[Problem]:
    """Sources whose type maps hold ids above `num_types`: the type branch has num_types + 1 outputs, so such
    a label would crash the loss mid-training. Reads every labelled image once (seconds for CoNSeP)."""
    problems = []
    for source in sources:
        largest, first = 0, ""
        for index in range(len(source)):
            types = source.load(index).type_map
            top = int(types.max()) if types is not None and types.size else 0
            if top > num_types:
                largest, first = max(largest, top), first or source.names[index]
        if largest:
            root = getattr(source, "root", getattr(getattr(source, "source", None), "root", ""))
            problems.append(Problem(where, f"{root}: type ids up to {largest} (first in image {first}), but "
                                           f"data.num_types = {num_types}. Set data.num_types = {largest}, or "
                                           "data.merge_consep_types = true for CoNSeP's 7 types."))
    return problems


def _patches(spec: SegmentSpec, split: str, train: bool) -> HoVerNetPatches:
    in_size, out_size = mode_sizes(spec.model.mode, spec.model.input_size)
    t = spec.train
    return HoVerNetPatches(
        open_split(spec, split),
        in_size,
        out_size,
        train=train,
        typed=spec.data.num_types > 0,
        augment=AugmentConfig(flips=t.flips, rotations=t.rotations, stain=t.stain,
                              hovernet=t.augment == "hovernet"),
        seed=spec.run.seed,
        target_context=t.target_context,
        cache_mb=t.image_cache_mb,
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ loop
def run_segment_train(spec: SegmentSpec) -> dict[str, Any]:
    """Train HoVer-Net as the spec says; returns {"loss": last epoch's mean loss, "model": path, ...}."""
    if not spec.data.train:
        raise SpecError("data.train is empty: give at least one training folder")
    if spec.data.num_types > 0 and spec.data.format != "pannuke":  # PanNuke's types are 1..5 by construction
        problems = [p for split in ("train", "val")
                    for p in type_range_problems(open_split(spec, split), spec.data.num_types, f"data.{split}")]
        if problems:
            raise SpecError(problems)
    with distributed_session(spec.run.device) as dist_info:
        return _train(spec, dist_info)


def _train(spec: SegmentSpec, dist_info: DistInfo) -> dict[str, Any]:
    device = dist_info.device
    torch.manual_seed(spec.run.seed + dist_info.rank)
    out_dir = Path(spec.run.output_dir)
    t = spec.train
    weights = LossWeights(**t.loss.model_dump())
    precision = spec.run.precision if device.type == "cuda" else "fp32"
    train_set = _patches(spec, "train", train=True)
    val_set = _patches(spec, "val", train=False) if spec.data.val else None
    model = build_model(spec).to(device).use_channels_last(spec.run.channels_last)

    ckpt_path = out_dir / "checkpoints" / "last.pt"
    start_phase, start_epoch, global_step, resumed = 1, 0, 0, None
    # The shared run-directory rule; run.resume = false starts over (a different run is moved aside).
    claim_run_dir(spec, out_dir, "segment train", rule="resume", force=True if not spec.run.resume else None,
                  is_main=dist_info.is_main)
    if spec.run.resume and ckpt_path.exists():
        resumed = load_checkpoint(ckpt_path)
        model.load_state_dict(resumed["model"], strict=True)
        start_phase, start_epoch, global_step = resumed["phase"], resumed["epoch"] + 1, resumed["step"]
        info(f"resuming from {ckpt_path}: phase {start_phase}, epoch {start_epoch}")

    summary: dict[str, Any] = {"epochs": 0}
    with open_run(
        spec, out_dir, command="segment train", seed=spec.run.seed, world_size=dist_info.world_size,
        is_main=dist_info.is_main, resumed=resumed is not None,
    ) as run:
        for phase, epochs, batch_size in (
            (1, t.phase1_epochs, t.batch_size),
            (2, t.phase2_epochs, t.phase2_batch_size),
        ):
            if phase < start_phase or epochs == 0:
                continue
            model.freeze_encoder(phase == 1)
            trainable = [p for p in model.parameters() if p.requires_grad]
            net: torch.nn.Module = model
            if dist_info.world_size > 1:
                net = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            optimizer = torch.optim.Adam(trainable, lr=t.lr, betas=(0.9, 0.999))
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=t.lr_step_epochs, gamma=t.lr_gamma
            )
            first_epoch = 0
            if resumed is not None and phase == start_phase:
                optimizer.load_state_dict(resumed["optimizer"])
                scheduler.load_state_dict(resumed["scheduler"])
                first_epoch = start_epoch
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            order = torch.Generator()
            sampler: DistributedSampler[dict[str, torch.Tensor]] | None = None
            if dist_info.world_size > 1:
                sampler = DistributedSampler(train_set, seed=spec.run.seed)
            loader = DataLoader(
                train_set,
                batch_size=batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                num_workers=t.workers,
                drop_last=len(train_set) >= batch_size * dist_info.world_size,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                generator=order,
            )
            steps = len(loader) if t.steps_per_epoch is None else min(len(loader), t.steps_per_epoch)
            for epoch in range(first_epoch, epochs):
                # Data order and augmentation depend only on (seed, phase, epoch): a resumed run sees the
                # batches an uninterrupted one would have.
                order.manual_seed(spec.run.seed * 100_003 + 1000 * phase + epoch)
                train_set.set_epoch(epoch + 1000 * phase)
                if sampler is not None:
                    sampler.set_epoch(epoch + 1000 * phase)
                net.train()
                if phase == 1 and t.frozen_bn_stats:
                    model.encoder.eval()
                totals: dict[str, float] = {}
                with progress(
                    total=steps, desc=f"phase {phase} epoch {epoch + 1}/{epochs}", unit="step"
                ) as bar:
                    for index, batch in enumerate(loader):
                        if index >= steps:
                            break
                        batch = _to(batch, device)
                        with autocast(device, precision):
                            outputs = net(batch["image"])
                        loss, terms = hovernet_loss(outputs, batch, weights)
                        if not torch.isfinite(loss):
                            raise WorkFailed(
                                f"loss became {loss.item()} at phase {phase} epoch {epoch + 1} step "
                                f"{index + 1}; lower train.lr or use run.precision = 'fp32'"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        global_step += 1
                        terms["loss"] = float(loss.detach())
                        for key, value in terms.items():
                            totals[key] = totals.get(key, 0.0) + value
                        if dist_info.is_main:
                            run.metrics.log(
                                global_step,
                                phase=phase,
                                epoch=epoch + 1,
                                lr=float(scheduler.get_last_lr()[0]),
                                **terms,
                            )
                        bar.update(1)
                        bar.set_postfix(loss=f"{terms['loss']:.3f}")
                scheduler.step()
                means = {f"train_{k}": v / max(steps, 1) for k, v in totals.items()}
                if val_set is not None:
                    means["val_loss"] = validation_loss(model, val_set, device, weights, batch_size)
                if dist_info.is_main:
                    run.metrics.log(global_step, phase=phase, epoch=epoch + 1, **means)
                    save_checkpoint(
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "phase": phase,
                            "epoch": epoch,
                            "step": global_step,
                            "hovernet": model_record(model),
                        },
                        ckpt_path,
                    )
                summary = {"epochs": summary["epochs"] + 1, **means}
            resumed = None
        model_path = out_dir / SEGMENT_MODEL_FILE
        if dist_info.is_main:
            save_checkpoint({"model": model.state_dict(), "hovernet": model_record(model)}, model_path)
            summary.update(model=str(model_path), steps=global_step)
            run.write_json("train_summary.json", summary)
    return summary


@torch.no_grad()
def validation_loss(
    model: HoVerNet, dataset: HoVerNetPatches, device: torch.device, weights: LossWeights, batch_size: int
) -> float:
    """Mean loss over the validation patches (no augmentation), to watch for over-fitting."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = _to(batch, device)
        loss, _ = hovernet_loss(model(batch["image"]), batch, weights)
        total += float(loss) * len(batch["image"])
        count += len(batch["image"])
    model.train(was_training)
    return total / max(count, 1)
