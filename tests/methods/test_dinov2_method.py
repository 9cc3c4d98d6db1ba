"""The DINOv2 method around its pure losses: block masking's properties, the step's loss against a float64
re-derivation from the teacher's and student's outputs (both centrings, two steps), the official parameter
groups, per-module clipping, the EMA teacher, and tokens that are never masked (CLS, registers)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from _dinov2_reference import dinov2_loss_np, sinkhorn_np, softmax_np

from pathssl_cli.backbones import create_backbone
from pathssl_cli.methods import DINOv2Options, create_method
from pathssl_cli.methods.masking import MaskingGenerator, batch_masks, mask_weights
from pathssl_cli.optim import apply_schedules, build_optimizer, build_schedules

BATCH = 4
HEAD = {"head_n_prototypes": 24, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


def make(steps_per_epoch: int = 2, backbone: str = "vit_tiny_reg4", **changes: Any) -> Any:
    torch.manual_seed(0)
    options = DINOv2Options(dino=HEAD, ibot=HEAD, n_local_crops=2, clip_grad=0.0,
                            teacher={"warmup_teacher_temp_epochs": 1}).model_copy(update=changes)
    return create_method(create_backbone(backbone), options, steps_per_epoch=steps_per_epoch, total_steps=8)


def views(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, s, s, generator=generator) for s in (32, 32, 16, 16)]


# ---------------------------------------------------------------------------------------------------- masking
def test_batch_masks_share_buckets_and_totals() -> None:
    grid, n = (8, 8), 64
    bounds = np.linspace(0.1, 0.5, 11)
    sorted_counts = []
    for seed in range(30):
        masks = batch_masks(20, grid, (0.1, 0.5), 0.5, np.random.default_rng(seed))
        assert masks.shape == (20, n) and masks.dtype == torch.bool
        counts = masks.sum(1).numpy()
        assert (counts > 0).sum() == 10  # int(20 · 0.5) crops masked; on an 8 × 8 grid every target fits
        # crop i of the masked ones aims at int(N · u), u in bucket i: sorted, each is at most its bucket's top
        masked = np.sort(counts[counts > 0])
        assert all(masked[i] <= int(n * bounds[i + 1]) for i in range(10))
        sorted_counts.append(masked)
    spread = np.array(sorted_counts)
    assert spread[:, 0].max() <= 0.15 * n and spread[:, -1].max() >= 0.4 * n  # the buckets span the range
    assert 0.2 < spread.mean() / n < 0.3  # mean target ratio 0.3, a little short where no block fits
    order = [batch_masks(20, grid, (0.1, 0.5), 0.5, np.random.default_rng(s)).sum(1) for s in range(2)]
    assert not torch.equal(*order)  # shuffled: which crops are masked changes with the seed
    assert batch_masks(7, grid, (0.1, 0.5), 0.5, np.random.default_rng(0)).any(1).sum() == 3  # int(3.5)


def test_masking_generator_blocks_are_rectangles_within_bounds() -> None:
    generator = MaskingGenerator((10, 12))
    assert generator.max_num_patches == 60  # dinov2 train.py: half the grid
    for seed in range(50):
        mask = np.zeros((10, 12), dtype=bool)
        added = generator._add_block(mask, 30, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == mask.sum() == h * w  # one filled rectangle
        assert 1 <= added <= 30 and h < 10 and w < 12
        assert 0.2 <= h / w <= 5  # log-uniform aspect in [0.3, 1/0.3], then rounded to whole patches
    for target in (0, 5, 17, 40):
        got = generator(target, np.random.default_rng(target)).sum()
        assert got <= target and (target == 0 or got >= 4)


def test_mask_weights_are_one_over_each_crops_count() -> None:
    masks = torch.tensor([[True, True, False, True], [False] * 4, [False, True, False, False]])
    assert mask_weights(masks).tolist() == pytest.approx([1 / 3] * 3 + [1.0])


def test_cls_and_register_tokens_are_never_masked() -> None:
    backbone = create_backbone("vit_tiny_reg4").eval()
    seen: list[torch.Tensor] = []
    hook = backbone.timm_model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(2, 3, 64, 64)  # the 8 × 8 grid the position embedding was made for
    token = torch.randn(1, backbone.feature_dim)
    with torch.no_grad():
        backbone.forward_tokens(x)
        backbone.forward_tokens(x, torch.ones(2, 64, dtype=torch.bool), token)
    hook.remove()
    plain, masked = seen
    prefix = backbone.timm_model.num_prefix_tokens
    assert prefix == 5  # CLS + 4 registers
    torch.testing.assert_close(masked[:, :prefix], plain[:, :prefix], rtol=0, atol=0)
    expected = token + backbone.timm_model.pos_embed  # every patch: the mask token at its position
    torch.testing.assert_close(masked[:, prefix:], expected.expand(2, -1, -1))


# ------------------------------------------------------------------------------------------ the step's loss
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_two_steps_equal_the_float64_objective(centering: str) -> None:
    method = make(centering=centering)
    tau_s, temps = 0.1, method.teacher_temp
    center, patch_center = np.zeros((1, 24)), np.zeros((1, 1, 24))
    for step in range(2):
        crops = views(step)
        masks = batch_masks(2 * BATCH, (4, 4), (0.1, 0.5), 0.5, np.random.default_rng(step))
        method._masks = lambda *_, m=masks: m
        with torch.no_grad():  # the networks' outputs, by hand
            t_cls, t_patch = method.teacher_backbone.forward_tokens(torch.cat(crops[:2]))
            t_cls_out = method.teacher_dino_head(t_cls).double().numpy()
            t_masked_out = method.teacher_dino_head(t_patch[masks]).double().numpy()
            s_cls, s_patch = method.backbone.forward_tokens(torch.cat(crops[:2]), masks, method.mask_token)
            s_local = method.dino_head(method.backbone.forward_tokens(torch.cat(crops[2:]))[0]).double().numpy()
            s_global = method.dino_head(s_cls).double().numpy()
            s_masked = method.dino_head(s_patch[masks]).double().numpy()
        temp = temps[step]
        if centering == "centering":
            t_probs = softmax_np((t_cls_out - center) / temp)
            t_masked_probs = softmax_np((t_masked_out - patch_center[0]) / temp)
            center = 0.9 * center + 0.1 * t_cls_out.mean(0, keepdims=True)
            patch_center = 0.9 * patch_center + 0.1 * t_masked_out.mean(0)
        else:
            t_probs = sinkhorn_np(t_cls_out, temp, 3, len(t_cls_out))
            t_masked_probs = sinkhorn_np(t_masked_out, temp, 3, len(t_masked_out))
        expected = dinov2_loss_np(s_local, s_global, t_probs.reshape(2, BATCH, -1), s_cls.double().numpy(),
                                  s_masked, t_masked_probs, masks.numpy(), 2, tau_s)
        loss, logs = method(crops, step)
        assert loss.item() == pytest.approx(expected, rel=1e-5), step
        np.testing.assert_allclose(method.dino_center.numpy(), center, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(method.ibot_center.numpy(), patch_center, rtol=1e-5, atol=1e-7)
        assert logs["masked_share"] == pytest.approx(masks.float().mean().item())
        assert 0 < logs["teacher_entropy"] <= logs["teacher_batch_entropy"] <= math.log(24) + 1e-6  # concavity
        # step 1 differs by its crops, masks, teacher temperature and (centring) both centres; the student is
        # not moved: one plain SGD step can bring a tiny ViT's CLS tokens (one direction within 0.5% at init)
        # together, where KoLeo's log of float32 distances of ~1e-7 is all rounding


# ------------------------------------------------------------------------------- optimiser, clipping, EMA
def test_param_groups_are_dinov2s() -> None:
    method = make(steps_per_epoch=3, backbone="vit_small_patch16_reg4_dinov2")  # LayerScale, registers
    groups = method.param_groups()
    lr_of, wd_of, frozen_of = {}, {}, {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in lr_of, "a parameter in two groups"
            lr_of[id(p)], wd_of[id(p)], frozen_of[id(p)] = (group["lr_scale"], group["weight_decay_applies"],
                                                            group["frozen_until_step"])
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert set(lr_of) == trainable and not any(p.requires_grad for p in method.teacher_backbone.parameters())
    # 12 blocks: embeddings are layer 0 (0.9^13), block i layer i + 1 (0.9^(12 - i)), the rest 12 + 1 (1)
    named = dict(method.backbone.timm_model.named_parameters())
    expected_lr = {"cls_token": 0.9 ** 13, "pos_embed": 0.9 ** 13, "patch_embed.proj.weight": 0.9 ** 13 * 0.2,
                   "patch_embed.proj.bias": 0.9 ** 13 * 0.2, "reg_token": 1.0, "norm.weight": 1.0,
                   "blocks.0.attn.qkv.weight": 0.9 ** 12, "blocks.11.mlp.fc2.bias": 0.9,
                   "blocks.3.ls1.gamma": 0.9 ** 9}
    for name, lr in expected_lr.items():
        assert lr_of[id(named[name])] == pytest.approx(lr), name
    assert lr_of[id(method.mask_token)] == pytest.approx(0.9 ** 13)
    no_decay = ["norm.weight", "blocks.11.mlp.fc2.bias", "blocks.3.ls1.gamma", "blocks.0.norm1.weight"]
    assert not any(wd_of[id(named[n])] for n in no_decay)
    assert all(wd_of[id(named[n])] for n in ("cls_token", "pos_embed", "reg_token", "blocks.0.attn.qkv.weight"))
    head = dict(method.dino_head.named_parameters())
    assert all(lr_of[id(p)] == 1.0 for p in head.values())
    assert frozen_of[id(head["last_layer.weight_v"])] == frozen_of[id(head["last_layer.weight_g"])] == 3
    assert frozen_of[id(head["mlp.layers.0.weight"])] == 0
    # the last layer gets lr 0 during the first epoch (3 steps), then the scheduled lr
    optimizer = build_optimizer("adamw", groups)
    schedules = build_schedules(peak_lr=1.0, total_steps=8, weight_decay=0.04)
    last = next(g for g in optimizer.param_groups if any(p is head["last_layer.weight_v"] for p in g["params"]))
    apply_schedules(optimizer, schedules, 2)
    assert last["lr"] == 0.0
    apply_schedules(optimizer, schedules, 3)
    assert last["lr"] == pytest.approx(schedules.lr[3])


def test_clips_each_student_module_on_its_own_and_ema_follows() -> None:
    method = make(clip_grad=0.01)
    loss, _ = method(views(0), 0)
    loss.backward()
    method.on_before_optimizer_step(0)
    backbone = [*method.backbone.parameters(), method.mask_token]
    for params in (backbone, list(method.dino_head.parameters())):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        assert norm.item() == pytest.approx(0.01, rel=1e-3)  # clipped to the bound (it was far above)
    before = {k: v.clone() for k, v in method.teacher_backbone.state_dict().items()}
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.on_after_optimizer_step(0)
    m = method.teacher_momentum[0]
    assert m == pytest.approx(0.992)
    student = method.backbone.state_dict()
    for key, value in method.teacher_backbone.state_dict().items():
        torch.testing.assert_close(value, m * before[key] + (1 - m) * student[key])


# ------------------------------------------------------------------------------------------ short-run warning
@pytest.mark.parametrize(("warmup_epochs", "warmup_temp", "warned"), [
    (10, 0.04, True),    # 20 warm-up steps in an 8-step run: the teacher never reaches 0.07
    (10, 0.07, False),   # held temperature: nothing to reach
    (4, 0.04, False),    # the warm-up fits the run
])
def test_a_warmup_longer_than_the_run_is_warned_about(warmup_epochs: int, warmup_temp: float, warned: bool,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    options = DINOv2Options(dino=HEAD, ibot=HEAD, n_local_crops=2, teacher={
        "warmup_teacher_temp_epochs": warmup_epochs, "warmup_teacher_temp": warmup_temp, "teacher_temp": 0.07})
    method = create_method(create_backbone("vit_tiny_reg4"), options, steps_per_epoch=2, total_steps=8)
    err = capsys.readouterr().err
    assert ("never reaches 0.07" in err) == warned, err
    assert ("method.teacher.warmup_teacher_temp_epochs spans 20 steps" in err) == warned
    last_step = method.teacher_temp[7]  # total_steps = 8
    assert last_step == pytest.approx(0.04 + 0.03 * 7 / 19 if warned else 0.07)
