"""`model.weights` picks the teacher or the student of a DINO checkpoint (pathssl's or facebookresearch/dino's),
and the registry's stochastic depth acts on the trained network only (dino `main_dino.py`: the student is built
with `drop_path_rate`, the teacher without)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pathssl_cli.backbones import create_backbone
from pathssl_cli.errors import SpecError
from pathssl_cli.methods import DINOOptions, create_method
from pathssl_cli.methods.base import frozen_copy


def _distinct_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two different vit_tiny state dicts in timm keys: (teacher, student)."""
    torch.manual_seed(0)
    teacher = create_backbone("vit_tiny").timm_model.state_dict()
    student = {k: v + 1.0 if v.is_floating_point() else v for k, v in teacher.items()}
    return teacher, student


def _loaded(path: Path, network: str = "auto") -> dict[str, torch.Tensor]:
    return create_backbone("vit_tiny", path, network=network).timm_model.state_dict()  # type: ignore[arg-type]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pathssl_dino_checkpoint_gives_the_teacher_unless_asked_for_the_student(tmp_path: Path) -> None:
    torch.manual_seed(0)
    options = DINOOptions(out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=0)
    method = create_method(create_backbone("vit_tiny"), options, steps_per_epoch=1, total_steps=2)
    with torch.no_grad():
        for p in method.teacher_backbone.parameters():
            p.add_(0.5)  # as after training: the EMA teacher differs from the student
    path = tmp_path / "last.pt"
    torch.save({"method": method.state_dict(), "step": 2}, path)  # the layout pretrain.py's _save writes
    teacher = method.teacher_backbone.timm_model.state_dict()  # type: ignore[union-attr]
    student = method.backbone.timm_model.state_dict()
    assert _same(_loaded(path), teacher)
    assert _same(_loaded(path, "teacher"), teacher)
    assert _same(_loaded(path, "student"), student)


@pytest.mark.parametrize("teacher_prefix", ["backbone.", "module.backbone."])
def test_official_dino_checkpoint_loads_its_teacher_with_its_args(tmp_path: Path, teacher_prefix: str) -> None:
    # dino main_dino.py save_dict: the student is DDP-wrapped; the teacher only when it has BatchNorm
    teacher, student = _distinct_pair()
    checkpoint = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    "module.head.last_layer.weight_g": torch.ones(1, 4)},
        "teacher": {**{f"{teacher_prefix}{k}": v for k, v in teacher.items()},
                    "head.last_layer.weight_g": torch.ones(1, 4)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", drop_path_rate=0.1, local_crops_scale=(0.05, 0.4)),
        "dino_loss": {"center": torch.zeros(1, 4)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert _same(_loaded(path), teacher)
    assert _same(_loaded(path, "student"), student)


def test_one_network_files_refuse_a_named_network_clearly(tmp_path: Path) -> None:
    teacher, _ = _distinct_pair()
    path = tmp_path / "dino_vit_small_patch16_ep200.torch"  # Lunit's release: a plain backbone state dict
    torch.save(teacher, path)
    assert _same(_loaded(path), teacher)
    with pytest.raises(SpecError, match=r"weights_network = 'student'.*only one network"):
        _loaded(path, "student")


def test_drop_path_is_stochastic_in_the_student_only() -> None:
    torch.manual_seed(0)
    student = create_backbone("vit_tiny", drop_path_rate=0.1)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in student.timm_model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)  # timm: linear from 0 to the rate
    teacher = frozen_copy(student)
    x = torch.randn(4, 3, 32, 32)
    student.train()
    teacher.train()  # DINO's teacher runs in train mode too: only a zero rate keeps it deterministic
    with torch.no_grad():
        assert not torch.equal(student(x), student(x))
        torch.testing.assert_close(teacher(x), teacher(x), rtol=0, atol=0)
        student.eval()
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)
    with pytest.raises(SpecError, match="drop_path_rate"):
        create_backbone("vit_tiny", drop_path_rate=1.0)
