"""Exporting the same backbone again leaves the file as it was: its fingerprint is what evaluations record."""

from __future__ import annotations

from pathlib import Path

import torch

from pathssl_cli.backbones import create_backbone, export_backbone
from pathssl_cli.runs import file_sha256


def test_re_exporting_the_same_weights_keeps_the_file_and_other_weights_replace_it(tmp_path: Path) -> None:
    """A resumed pre-training re-exports its final weights: safetensors writes its metadata in a random order,
    so the rewritten file had another sha256 and every evaluation of it was rerun as stale."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny", img_size=32)
    path = export_backbone(backbone, tmp_path / "backbone.safetensors")
    before, digest = path.stat(), file_sha256(path)
    export_backbone(backbone, path)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert file_sha256(path) == digest
    torch.manual_seed(1)
    export_backbone(create_backbone("resnet_tiny", img_size=32), path)
    assert file_sha256(path) != digest
    reloaded = create_backbone("resnet_tiny", weights=path, img_size=32)
    assert not torch.equal(next(iter(reloaded.timm_model.state_dict().values())),
                           next(iter(backbone.timm_model.state_dict().values())))
