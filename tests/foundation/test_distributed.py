"""The distributed helpers under a real 2-process gloo torchrun launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pathssl_cli.distributed import all_reduce_sum, autocast, gather_with_grad, init_distributed


def test_single_process_defaults() -> None:
    info = init_distributed("cpu")
    assert info.world_size == 1 and info.is_main and not info.enabled
    x = __import__("torch").ones(2)
    assert gather_with_grad(x) is x and all_reduce_sum(x).tolist() == [1.0, 1.0]
    with autocast("cpu", "fp32"):
        pass


def test_two_process_gloo_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(Path(__file__).with_name("dist_worker.py"))],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
