"""Tiled network inference shared by `segment predict` and `segment eval`.

Follows HoVer-Net's tiling (vqdang/hover_net `infer/tile.py`): input patches step by the output size (less
2 x `trim` for 'same'-size models, which need overlap for context), so every output pixel is predicted exactly
once, from a patch centred on it, on a grid anchored at the window origin; borders are reflect-padded by the
reader.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from pathssl_cli.distributed import autocast
from pathssl_cli.errors import SpecError
from pathssl_cli.segment.readers import ImageReader, SlideReader
from pathssl_cli.segment.slide_scale import MppSlideReader


class PatchModel(Protocol):
    """What tiled inference needs from a network: HoVer-Net, or any stand-in with the same contract."""

    input_size: int
    output_size: int

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


@torch.no_grad()
def predict_window(model: PatchModel, reader: ImageReader | SlideReader | MppSlideReader, top: int, left: int,
                   height: int, width: int, *, batch_size: int = 8, device: torch.device | str = "cpu",
                   precision: str = "fp32", trim: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Network outputs for the window [top, top+height) x [left, left+width) of `reader`.

    Each patch keeps its output minus `trim` px per side, so the tile grid steps by output - 2 trim; `top`
    and `left` must be multiples of that step. `trim` gives "same"-size models (input = output) the context
    the HoVer-Net modes have built in; without it their tile borders show as seams. Returns np_prob (h, w)
    float32, hv (2, h, w) float32 and type_prob (C, h, w) float32 or None.
    """
    in_size, out_size = model.input_size, tile_step(model, trim)
    margin = (in_size - model.output_size) // 2 + trim
    keep = slice(trim, trim + out_size)
    rows, cols = math.ceil(height / out_size), math.ceil(width / out_size)
    np_out = np.zeros((rows * out_size, cols * out_size), np.float32)
    hv_out = np.zeros((2, *np_out.shape), np.float32)
    tp_out: np.ndarray | None = None
    positions = [(r * out_size, c * out_size) for r in range(rows) for c in range(cols)]
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        patches = np.stack([reader.read(top + r - margin, left + c - margin, in_size, in_size)
                            for r, c in chunk])
        x = torch.from_numpy(patches).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        with autocast(device, precision):  # type: ignore[arg-type]
            out = model(x)
        np_prob = torch.softmax(out["np"].float(), dim=1)[:, 1, keep, keep].cpu().numpy()
        hv = out["hv"].float()[..., keep, keep].cpu().numpy()
        tp = torch.softmax(out["tp"].float(), dim=1)[..., keep, keep].cpu().numpy() if "tp" in out else None
        if tp is not None and tp_out is None:
            tp_out = np.zeros((tp.shape[1], *np_out.shape), np.float32)
        for k, (r, c) in enumerate(chunk):
            np_out[r : r + out_size, c : c + out_size] = np_prob[k]
            hv_out[:, r : r + out_size, c : c + out_size] = hv[k]
            if tp_out is not None and tp is not None:
                tp_out[:, r : r + out_size, c : c + out_size] = tp[k]
    crop = (slice(0, height), slice(0, width))
    tp_crop = None if tp_out is None else tp_out[(slice(None), *crop)]
    return np_out[crop], hv_out[(slice(None), *crop)], tp_crop


def tile_step(model: PatchModel, trim: int) -> int:
    step = model.output_size - 2 * trim
    if trim < 0 or step < 8:
        raise SpecError(f"predict.trim = {trim} leaves {step} px of each {model.output_size} px output; "
                        f"use 0 to {(model.output_size - 8) // 2}")
    return step


def default_trim(model: PatchModel) -> int:
    """Context to drop per side when the model has none of its own (mode 'same'): 1/8 of the output."""
    return model.output_size // 8 if model.input_size == model.output_size else 0
