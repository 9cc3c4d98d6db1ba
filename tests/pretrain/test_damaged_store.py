"""A shard damaged under a running pre-training: exit 1 naming the shard and the rebuild, checkpoint kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pathssl_cli.pretrain import STOP_HOOK
from pathssl_cli.runs import load_checkpoint
from pathssl_cli.tiling.index import read_tiles

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # reason: a pretraining subprocess (torch import) that runs 12 tiny steps (~20 s)
def test_damaged_shard_mid_training_exits_1_and_keeps_the_checkpoint(
        tile_store: Path, tmp_path: Path, specs_dir: Path, tiny_overrides: Callable[..., list[str]]) -> None:
    store = tmp_path / "store"
    shutil.copytree(tile_store, store, ignore=shutil.ignore_patterns(".index"))
    out = tmp_path / "run"
    args = [a for item in tiny_overrides(store, out, **{"run.steps": 12, "run.checkpoint_every": 1,
                                                         "data.workers": 2}) for a in ("--set", item)]
    env = {**os.environ, STOP_HOOK: "2", "PATHSSL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pathssl_cli", "pretrain",
                                str(specs_dir / "tiny_barlow_twins.toml"), *args], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stdin is not None
    for line in process.stdout:  # the run holds at step 2, checkpoint written, until stdin closes
        if line.startswith(STOP_HOOK):
            break
    # Every JPEG of one shard is overwritten in place: same file size, so only reading its tiles can tell.
    rows = [r for r in read_tiles(store).to_pylist() if r["shard"] == "shards/slide1-00000.tar"]
    with open(store / rows[0]["shard"], "r+b") as fh:
        for row in rows:
            fh.seek(row["offset"])
            fh.write(bytes(row["nbytes"]))
    process.stdin.close()
    try:
        process.stdout.read()
        errors = process.stderr.read() if process.stderr else ""
        process.wait(timeout=300)
    finally:
        process.kill()  # no-op once it exited; never leave a blocked run behind a failed assertion
    assert process.returncode == 1, errors
    assert "slide1-00000.tar" in errors and "pathssl tile" in errors and "parts/slide1.parquet" in errors
    assert "Traceback" not in errors and "checkpoint is kept" in errors
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] >= 2
