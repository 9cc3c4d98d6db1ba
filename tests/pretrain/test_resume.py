"""A run SIGKILLed mid-way and resumed ends bitwise identical to an uninterrupted run, same seed (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pathssl_cli.pretrain import STOP_HOOK, run_pretrain
from pathssl_cli.runs import load_checkpoint
from pathssl_cli.specs import load_spec


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# MoCo v2 (queue, key encoder; from tiles, and from tiles and slides) and DINOv2 (two centres, EMA teacher,
# per-step block masks, the last layer's lr freeze and the teacher temperature schedule)
@pytest.mark.parametrize(("spec_name", "sources"),
                         [("tiny_mocov2", "tiles"), ("tiny_mocov2", "tiles+slides"), ("tiny_dinov2", "tiles")])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(
        spec_name: str, sources: str, tile_store: Path, slide_files: list[Path], tmp_path: Path,
        specs_dir: Path, tiny_overrides: Callable[..., list[str]]) -> None:
    spec_file = specs_dir / f"{spec_name}.toml"
    # 96 tiles at 16 per step: a pass takes 6 steps, so the resumed run crosses into the second pass; one
    # DataLoader worker exercises the worker split of the stream. With slides, patches cut at random positions
    # and fields of view are mixed in (issue 23): sample i is a pure function of (seed, epoch, rank, i).
    common: dict[str, object] = {"run.steps": 10, "run.checkpoint_every": 4, "data.workers": 1}
    if sources == "tiles+slides":
        common.update({"data.slides": "[" + ", ".join(f'"{s}"' for s in slide_files) + "]",
                       "data.mpp": "[2.0, 4.0]", "data.coords_dir": str(tmp_path / "coords"),
                       "data.patches_per_visit": 4, "data.open_slides": 2, "run.steps": 8})

    whole = tmp_path / "whole"
    run_pretrain(load_spec(spec_file, tiny_overrides(tile_store, whole, **common)))  # type: ignore[arg-type]

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "pathssl_cli", "pretrain", str(spec_file)]
    for item in tiny_overrides(tile_store, killed, **common):
        args += ["--set", item]
    env = {**os.environ, STOP_HOOK: "6", "OMP_NUM_THREADS": "1", "PATHSSL_PROGRESS": "0"}
    with subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:  # blocks until the run has made 6 steps and stopped at the hook
            if line.startswith(STOP_HOOK):
                break
        process.kill()  # SIGKILL: no cleanup, no final checkpoint
        assert process.wait() == -9
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # killed, not finished
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 4  # steps 4 and 5 are lost
    if sources == "tiles+slides":
        # the slides add patches to the 6 steps of tiles, and 8 steps still cross into the second epoch
        assert 6 < json.loads((whole / "metrics.json").read_text())["steps_per_epoch"] < 8

    resumed = load_spec(spec_file, [*tiny_overrides(tile_store, killed, **common), "run.resume=true"])
    run_pretrain(resumed)  # type: ignore[arg-type]

    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    for key in ("method", "optimizer", "scaler", "step", "data", "stain"):
        _assert_same(a[key], b[key], key)  # weights, key encoder, queue, momentum buffers: bitwise equal
    exports = [load_file(run / "backbone.safetensors") for run in (whole, killed)]
    _assert_same(exports[0], exports[1], "export")
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == common["run.steps"]  # redone steps were logged once
    assert json.loads((killed / "run.json").read_text())["status"] == "done"
