"""A 2-process gloo torchrun run of every method gives the same losses, DDP-averaged gradients and final state
(queues, centre, teacher, key encoder) as one process over the same global batch. One launch for all
methods."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _common():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_dist_common", HERE / "_dist_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out_dir = tmp_path_factory.mktemp("dist_methods")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(HERE / "dist_methods_script.py"), str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    common = _common()
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=True) for name in common.METHOD_NAMES}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float) -> None:
    """Equal up to float32 reduction-order noise: 2e-4 of the tensor's own scale, or `floor` for tensors whose
    true value is ~0 (e.g. the gradient of a bias just before a BatchNorm). A wrong gradient scaling, a
    missing rank or a per-rank statistic is off by far more."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= 2e-4 * scale + floor, f"{what}: max error {error:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("name", ["mocov2", "swav", "barlow_twins", "dino"])
def test_two_processes_match_one_process(name: str, distributed_results: dict[str, dict]) -> None:
    single = _common().run_steps(name)
    multi = distributed_results[name]
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)
    for step, (g_multi, g_single) in enumerate(zip(multi["grads"], single["grads"], strict=True)):
        assert g_multi.keys() == g_single.keys(), f"step {step}: different parameters received gradients"
        largest = max(g.abs().max().item() for g in g_single.values())
        for key in g_single:
            what = f"step {step} gradient of {key}"
            assert_close_to_scale(g_multi[key], g_single[key], what, 1e-4 * largest)
    for key, value in single["state"].items():
        if value.is_floating_point():
            assert_close_to_scale(multi["state"][key], value, f"final state {key}", 1e-5)
        else:
            assert torch.equal(multi["state"][key], value), f"final state {key}"
