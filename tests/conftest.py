"""Shared fixtures. Tests are CPU-only, tiny, and never touch the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Keep each test process to one intra-op thread: pytest-xdist runs one process per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PATHSSL_PROGRESS", "0")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data in ../shared/data (see its README); skips when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (the ../shared folder beside the project)")
    return SHARED_DATA
