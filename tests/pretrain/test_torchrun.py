"""`torchrun --nproc-per-node 2 -m pathssl_cli pretrain` on CPU (gloo): DDP, rank split, rank-0 outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pathssl_cli.runs import load_checkpoint


@pytest.mark.slow  # two extra Python processes importing torch: ~30 s on 2 cores
def test_two_process_gloo_run(tile_store: Path, tmp_path: Path, specs_dir: Path,
                              tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pathssl_cli", "pretrain", str(specs_dir / "tiny_barlow_twins.toml")]
    for item in tiny_overrides(tile_store, out, **{"run.steps": 3}):
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATHSSL_PROGRESS": "0"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["world_size"] == 2
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 3
    assert (out / "backbone.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 logs, once per step


@pytest.mark.slow  # two extra Python processes importing torch: ~30 s on 2 cores
def test_two_process_run_from_slides_alone(slide_files: list[Path], tmp_path: Path, specs_dir: Path,
                                           tiny_overrides: Callable[..., list[str]]) -> None:
    """Issue 23: no tile store; both ranks compute the coordinate index (one row per slide, under its lock), open
    the same state and read disjoint slides."""
    out = tmp_path / "ddp_slides"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pathssl_cli", "pretrain", str(specs_dir / "tiny_barlow_twins.toml")]
    slides = "[" + ", ".join(f'"{s}"' for s in slide_files) + "]"
    extra = {"run.steps": 2, "data.tiles": "[]", "data.slides": slides, "data.mpp": "[1.0, 2.0]",
             "data.tile_size": 32, "data.coords_dir": str(tmp_path / "coords")}
    for item in tiny_overrides(tmp_path, out, **extra):  # data.tiles = [] replaces the tile store
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATHSSL_PROGRESS": "0"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["world_size"] == 2
    assert len(list((tmp_path / "coords" / "coords").glob("*.parquet"))) == 2
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
