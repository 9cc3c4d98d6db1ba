"""Checkpoints: plain dicts of tensors, saved atomically and loaded without running code from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pathssl_cli.errors import PathsslError
from pathssl_cli.fileio import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save a plain dict of tensors/state_dicts atomically; load it back with `load_checkpoint`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing code from the file (`weights_only=True`), onto the CPU."""
    import torch

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PathsslError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        raise PathsslError(f"{path}: cannot load as a checkpoint without running code from it ({exc}). "
                           "pathssl only loads plain tensors and dicts (torch.load weights_only=True).") from None
    if not isinstance(state, dict):
        raise PathsslError(f"{path}: expected a dict checkpoint, found {type(state).__name__}")
    return state
