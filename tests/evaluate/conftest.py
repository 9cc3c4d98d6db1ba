"""A tiny labelled ImageFolder (synthetic H&E textures) and an exported tiny backbone, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pathssl_cli.synthetic import write_image_folder

    # 6 textures × 5 images per split at 32 px: enough for kNN and a probe to beat chance, fast on one core.
    return write_image_folder(tmp_path_factory.mktemp("folder") / "data", n_per_class=5, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from pathssl_cli.backbones import create_backbone, export_backbone

    torch.manual_seed(123)
    return export_backbone(
        create_backbone("resnet_tiny", img_size=32),
        tmp_path_factory.mktemp("weights") / "backbone.safetensors",
    )
