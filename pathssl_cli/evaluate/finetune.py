"""`pathssl evaluate finetune`: the whole backbone plus a new linear head, trained end to end.

Per seed: AdamW (or SGD) with linear warm-up and cosine decay per step (pathssl_cli.optim), optional
layer-wise lr decay for ViTs (BEiT/MAE: block i of L gets lr·decay^(L+1-i), embeddings decay^(L+1), head 1),
no weight decay on biases and norms, AMP on GPU (`run.precision`), DDP under torchrun, validation after every
epoch, early stopping after `patience` epochs without improvement, and the best checkpoint kept
(best_seed<N>.pt) and scored on the evaluation split. `last_seed<N>.pt` is written every epoch, so a killed
run resumes at the next epoch.

Augmentation runs on the batch, on the device, after the loader has resized the images to the input size:
horizontal and vertical flips and 90° rotations (the dihedral group: tissue has no orientation) and HED jitter
(`pathssl_cli.augment.stain.hed_jitter`, Tellez et al. 2019), then the backbone's normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from pathssl_cli.augment.stain import hed_jitter
from pathssl_cli.backbones import Backbone
from pathssl_cli.console import info, progress, warn
from pathssl_cli.data.benchmarks import eval_transform
from pathssl_cli.distributed import DistInfo, autocast, distributed_session
from pathssl_cli.evaluate.common import build_backbone, open_splits, write_outputs
from pathssl_cli.evaluate.features import make_loader
from pathssl_cli.evaluate.metrics import classification_metrics
from pathssl_cli.evaluate.probe import selection_metric
from pathssl_cli.optim import Schedules as OptimSchedules
from pathssl_cli.optim import apply_schedules, build_optimizer, cosine_schedule, is_bias_or_norm
from pathssl_cli.runs import RunDir, claim_run_dir, load_checkpoint, open_run, save_checkpoint
from pathssl_cli.specs.evaluate import FinetuneAugment, FinetuneSpec


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay: embeddings 0, block i → i + 1, the rest L + 1."""
    if name.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups(model: Classifier, layer_decay: float | None, head_lr_scale: float) -> list[dict[str, Any]]:
    """Groups with `lr_scale` (layer-wise decay, head scale) and `weight_decay_applies` (not biases/norms)."""
    timm_model: nn.Module = model.backbone.timm_model
    blocks = getattr(timm_model, "blocks", None)
    if layer_decay is not None and blocks is None:
        warn(
            "optim.layer_decay applies to ViTs only; this backbone has no transformer blocks, "
            "so it is ignored"
        )
        layer_decay = None
    num_blocks = len(blocks) if blocks is not None else 0
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in timm_model.named_parameters():
        scale = 1.0 if layer_decay is None else layer_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
        groups.setdefault((scale, not is_bias_or_norm(name, param)), []).append(param)
    for name, param in model.head.named_parameters():
        groups.setdefault((head_lr_scale, not is_bias_or_norm(name, param)), []).append(param)
    return [
        {"params": params, "lr_scale": scale, "weight_decay_applies": decays}
        for (scale, decays), params in groups.items()
    ]


def augment_batch(images: torch.Tensor, aug: FinetuneAugment, generator: torch.Generator) -> torch.Tensor:
    """Per-sample flips, 90° rotations and HED jitter on RGB in [0, 1], (B, 3, H, W) with H == W."""
    b = images.shape[0]
    dev = images.device

    def coin() -> torch.Tensor:
        return (torch.rand(b, generator=generator) < 0.5).to(dev)[:, None, None, None]

    if aug.hflip:
        images = torch.where(coin(), images.flip(3), images)
    if aug.vflip:
        images = torch.where(coin(), images.flip(2), images)
    if aug.rotate90:
        images = torch.where(coin(), images.rot90(1, dims=(2, 3)), images)
    if aug.stain == "hed" and aug.hed_sigma > 0:
        sigma = aug.hed_sigma
        alpha = 1 + (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
        beta = (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma  # optical density, as hed_jitter
        images = hed_jitter(images.float(), alpha.to(dev), beta.to(dev)).clamp(0, 1)
    return images


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader[Any], device: torch.device, precision: str) -> torch.Tensor:
    model.eval()
    outs = []
    for images, _ in loader:
        with autocast(device, precision):  # type: ignore[arg-type]
            outs.append(model(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(outs)


def train_seed(
    spec: FinetuneSpec, splits: dict[str, Any], seed: int, dist: DistInfo, run: RunDir
) -> tuple[torch.Tensor, float]:
    """Fine-tune one seed; returns the best checkpoint's (N, C) logits on the evaluation split and its val
    score."""
    opt = spec.optim
    device = dist.device
    classes = splits["train"].classes
    backbone = build_backbone(spec.model, seed)
    torch.manual_seed(seed)
    model = Classifier(backbone, len(classes)).to(device)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)

    # The loader only resizes (to [0, 1] floats); augmentation and normalisation run batched on the device.
    train_ds = splits["train"].select(range(len(splits["train"])))
    train_ds.transform = eval_transform(backbone.img_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for name in ("val", "eval"):
        splits[name].transform = eval_transform(backbone.img_size, backbone.mean, backbone.std)
    sampler: Any = (
        DistributedSampler(train_ds, shuffle=True, seed=seed)
        if dist.enabled
        else RandomSampler(train_ds, generator=torch.Generator().manual_seed(seed))
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=opt.batch_size,
        sampler=sampler,
        num_workers=spec.run.workers,
        pin_memory=device.type == "cuda",
        drop_last=len(train_ds) > opt.batch_size,
    )
    val_loader = make_loader(splits["val"], spec.run.batch_size, spec.run.workers, device)

    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * opt.epochs
    schedules = OptimSchedules(
        lr=cosine_schedule(opt.lr, 0.0, total, round(opt.warmup_epochs * steps_per_epoch)),
        weight_decay=cosine_schedule(opt.weight_decay, opt.weight_decay, total),
    )
    optimizer = build_optimizer(opt.optimizer, param_groups(model, opt.layer_decay, opt.head_lr_scale))
    scaler = torch.amp.GradScaler(device.type, enabled=spec.run.precision == "fp16")
    ddp: nn.Module = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if dist.enabled
        else model
    )

    last_path, best_path = run.file(f"last_seed{seed}.pt"), run.file(f"best_seed{seed}.pt")
    start_epoch, best_score, bad_epochs = 0, -1.0, 0
    if last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, bad_epochs = state["epoch"], state["best_score"], state["bad_epochs"]
        info(f"finetune seed {seed}: resuming after epoch {start_epoch} from {last_path}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + dist.rank)

    for epoch in range(start_epoch, opt.epochs):
        if bad_epochs >= opt.patience:
            break
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        ddp.train()
        with progress(
            total=steps_per_epoch, desc=f"finetune seed {seed} epoch {epoch + 1}", unit="step"
        ) as bar:
            for i, (images, targets) in enumerate(train_loader):
                step = epoch * steps_per_epoch + i
                apply_schedules(optimizer, schedules, step)
                images = augment_batch(images.to(device, non_blocking=True), spec.augment, generator)
                images = (images - mean) / std
                with autocast(device, spec.run.precision):
                    loss = F.cross_entropy(
                        ddp(images), targets.to(device), label_smoothing=opt.label_smoothing
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")  # CPU-GPU sync, once per step for the bar
                bar.update(1)
        # Every rank scores the whole val split, so all ranks take the same early-stopping decision.
        val_logits = predict(model, val_loader, device, spec.run.precision)
        val_targets = torch.as_tensor(splits["val"].targets)
        score = float(selection_metric(val_logits[None], val_targets, len(classes), opt.select_by)[0])
        if dist.is_main:
            run.metrics.log(epoch + 1, seed=seed, train_loss=loss.item(), **{f"val_{opt.select_by}": score})
        if score > best_score:
            best_score, bad_epochs = score, 0
            if dist.is_main:
                save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "val": score}, best_path)
        else:
            bad_epochs += 1
        if dist.is_main:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "best_score": best_score,
                    "bad_epochs": bad_epochs,
                },
                last_path,
            )
        if dist.enabled:
            torch.distributed.barrier()

    model.load_state_dict(load_checkpoint(best_path)["model"])
    eval_loader = make_loader(splits["eval"], spec.run.batch_size, spec.run.workers, device)
    return predict(model, eval_loader, device, spec.run.precision), best_score


def run_finetune(spec: FinetuneSpec) -> dict[str, Any]:
    with distributed_session(spec.run.device) as dist:
        # Resumes only a run of this same spec begun from the same inputs (the training rule, runs.rule.Rule).
        claim_run_dir(spec, spec.run.output_dir, rule="resume", is_main=dist.is_main)
        resumed = any(Path(spec.run.output_dir).glob("last_seed*.pt"))
        splits, eval_split = open_splits(spec.data)
        num_classes = len(splits["train"].classes)
        targets = torch.as_tensor(splits["eval"].targets)
        with open_run(
            spec,
            spec.run.output_dir,
            seed=spec.run.seeds[0],
            world_size=dist.world_size,
            is_main=dist.is_main,
            resumed=resumed,
        ) as run:
            per_seed: list[dict[str, Any]] = []
            first_scores: torch.Tensor | None = None
            for seed in spec.run.seeds:
                scores, best_val = train_seed(spec, splits, seed, dist, run)
                metrics = classification_metrics(scores, targets, num_classes)
                per_seed.append({"seed": seed, f"val_{spec.optim.select_by}": best_val, **metrics})
                first_scores = scores if first_scores is None else first_scores
                info(f"finetune seed {seed}: top-1 {100 * metrics['top1']:.2f}")
            assert first_scores is not None
            settings = {
                **spec.optim.model_dump(),
                "augment": spec.augment.model_dump(),
                "seeds": spec.run.seeds,
                "world_size": dist.world_size,
                "precision": spec.run.precision,
            }
            record: dict[str, Any] = {}
            if dist.is_main:
                label = (
                    "finetune"
                    if spec.data.train_subset is None
                    else f"finetune[{spec.data.train_subset.stem}]"
                )
                record = write_outputs(
                    run,
                    spec,
                    protocol="finetune",
                    label=label,
                    splits=splits,
                    eval_split=eval_split,
                    per_seed=per_seed,
                    confusion_scores=first_scores,
                    variants=None,
                    settings=settings,
                )
        return record
