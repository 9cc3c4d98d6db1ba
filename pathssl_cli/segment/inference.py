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
from pathssl_cli.specs.segment import TTAChoice

#: Test-time poses as (quarter turns, mirror first): 'flips' = identity, left-right and up-down mirror, and
#: both (a half turn); 'dihedral' = all 8 symmetries of the square.
POSES: dict[TTAChoice, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),
    "dihedral": tuple((k, m) for k in range(4) for m in (False, True)),
}


class PatchModel(Protocol):
    """What tiled inference needs from a network: HoVer-Net, or any stand-in with the same contract."""

    input_size: int
    output_size: int

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


@torch.no_grad()
def predict_window(model: PatchModel, reader: ImageReader | SlideReader | MppSlideReader, top: int, left: int,
                   height: int, width: int, *, batch_size: int = 8, device: torch.device | str = "cpu",
                   precision: str = "fp32", trim: int = 0, tta: TTAChoice = "none",
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Network outputs for the window [top, top+height) x [left, left+width) of `reader`.

    Each patch keeps its output minus `trim` px per side, so the tile grid steps by output - 2 trim; `top`
    and `left` must be multiples of that step. `trim` gives "same"-size models (input = output) the context
    the HoVer-Net modes have built in; without it their tile borders show as seams. `tta` averages the outputs
    over test-time poses (`pose_averaged_outputs`). Returns np_prob (h, w) float32, hv (2, h, w) float32 and
    type_prob (C, h, w) float32 or None.
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
        out = pose_averaged_outputs(model, x, tta, device, precision)
        np_prob = out["np"][:, 1, keep, keep].cpu().numpy()
        hv = out["hv"][..., keep, keep].cpu().numpy()
        tp = out["tp"][..., keep, keep].cpu().numpy() if "tp" in out else None
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


def pose_averaged_outputs(model: PatchModel, x: torch.Tensor, tta: TTAChoice = "none",
                          device: torch.device | str = "cpu", precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The network's outputs for images x (B, 3, in, in), averaged over the test-time poses of `tta`.

    Each pose is applied to the input and undone on the outputs: NP and TP as softmax probabilities; HV as a
    vector field, so besides moving the pixels back, a mirror negates the horizontal component and a quarter
    turn exchanges the components with one sign change (HoVer-Net's HV targets are per-side normalised
    offsets from the nucleus centre, which these symmetries map onto each other). 'none' is one plain pass.
    Returns {"np": (B, 2, out, out), "hv": (B, 2, out, out), "tp": (B, C, out, out) when the model types}.
    """
    total: dict[str, torch.Tensor] = {}
    poses = POSES[tta]
    for turns, mirror in poses:
        posed = x.flip(-1) if mirror else x
        posed = torch.rot90(posed, turns, dims=(-2, -1)) if turns else posed
        with autocast(device, precision):  # type: ignore[arg-type]
            out = model(posed)
        restored = {"np": torch.softmax(out["np"].float(), dim=1), "hv": out["hv"].float()}
        if "tp" in out:
            restored["tp"] = torch.softmax(out["tp"].float(), dim=1)
        for key, value in restored.items():
            value = torch.rot90(value, -turns, dims=(-2, -1)) if turns else value
            if key == "hv":
                h, v = value[:, 0], value[:, 1]
                for _ in range(turns):  # np.rot90's quarter turn maps an offset (h, v) to (v, -h): undo it
                    h, v = -v, h
                value = torch.stack([-h if mirror else h, v], dim=1)
            value = value.flip(-1) if mirror else value
            total[key] = total[key] + value if key in total else value
    return {key: value / len(poses) for key, value in total.items()}


def tile_step(model: PatchModel, trim: int) -> int:
    step = model.output_size - 2 * trim
    if trim < 0 or step < 8:
        raise SpecError(f"predict.trim = {trim} leaves {step} px of each {model.output_size} px output; "
                        f"use 0 to {(model.output_size - 8) // 2}")
    return step


def default_trim(model: PatchModel) -> int:
    """Context to drop per side when the model has none of its own (mode 'same'): 1/8 of the output."""
    return model.output_size // 8 if model.input_size == model.output_size else 0
