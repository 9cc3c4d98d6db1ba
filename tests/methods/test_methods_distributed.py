"""A 2-process gloo torchrun run of every method gives the same losses, DDP-averaged gradients and final state
(queues, centre, teacher, key encoder) as one process over the same global batch. One launch for all
methods."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
    results = {name: torch.load(out_dir / f"{name}.pt", weights_only=True) for name in common.METHOD_NAMES}
    results["shuffle_bn"] = torch.load(out_dir / "shuffle_bn.pt", weights_only=True)
    results["dinov2_pure"] = torch.load(out_dir / "dinov2_pure.pt", weights_only=True)
    return results


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float) -> None:
    """Equal up to float32 reduction-order noise: 2e-4 of the tensor's own scale, or `floor` for tensors whose
    true value is ~0 (e.g. the gradient of a bias just before a BatchNorm). A wrong gradient scaling, a
    missing rank or a per-rank statistic is off by far more."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= 2e-4 * scale + floor, f"{what}: max error {error:.3g} against scale {scale:.3g}"


def _assert_runs_match(multi: dict, single: dict, gradient_scale: float = 1.0) -> None:
    """Same losses and final state; every DDP-averaged gradient = gradient_scale × the single-process one."""
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)
    for step, (g_multi, g_single) in enumerate(zip(multi["grads"], single["grads"], strict=True)):
        assert g_multi.keys() == g_single.keys(), f"step {step}: different parameters received gradients"
        largest = max(g.abs().max().item() for g in g_single.values()) * gradient_scale
        for key in g_single:
            what = f"step {step} gradient of {key}"
            assert_close_to_scale(g_multi[key], gradient_scale * g_single[key], what, 1e-4 * largest)
    for key, value in single["state"].items():
        if value.is_floating_point():
            assert_close_to_scale(multi["state"][key], value, f"final state {key}", 1e-5)
        else:
            assert torch.equal(multi["state"][key], value), f"final state {key}"


@pytest.mark.parametrize("name", ["mocov2", "swav", "barlow_twins_exact", "dino", "dinov2", "dinov2_sinkhorn"])
def test_two_processes_match_one_process(name: str, distributed_results: dict[str, dict]) -> None:
    _assert_runs_match(distributed_results[name], _common().run_steps(name))


def test_dinov2_sinkhorn_and_centres_over_two_processes_equal_one_process(
        distributed_results: dict[str, dict]) -> None:
    """Sinkhorn-Knopp (CLS: n = B × W; iBOT: n = the all-reduced masked count, here split 6 + 4 between the
    ranks) and both centres after two steps, each rank on its share: equal to one process on the whole."""
    single, multi = _common().dinov2_pure_case(), distributed_results["dinov2_pure"]
    assert multi["n_masked"].item() == 10
    for key in ("sk_cls", "sk_masked", "center", "patch_center"):
        torch.testing.assert_close(multi[key], single[key], rtol=1e-5, atol=1e-7, msg=key)


def test_barlow_twins_default_takes_the_official_gradient_one_over_the_world_size(
        distributed_results: dict[str, dict]) -> None:
    """barlowtwins main.py sums C with a raw all_reduce: DDP's averaged gradient is the single-process one
    divided by W = 2, so SGD at lr over 2 processes makes the steps of one process at lr / 2."""
    common = _common()
    _assert_runs_match(distributed_results["barlow_twins"], common.run_steps("barlow_twins", lr=common.LR / 2),
                       gradient_scale=0.5)


def test_mocov2_shuffle_bn_encodes_keys_with_another_half_of_the_global_batch(
        distributed_results: dict[str, object]) -> None:
    """Under shuffle-BN each key must equal the key encoder's output for the image when BatchNorm statistics
    come from the half of the global batch that the image was shuffled into, which must not be the rank that
    holds its query for every step. Found by trying every split of the 8 images into two halves of 4."""
    common = _common()
    method, images = common.shuffle_bn_case()
    n = images.shape[0]

    def keys_of(half: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(method.key_head(method.key_backbone(images[half])), dim=1)

    own_halves = {tuple(range(n // 2)), tuple(range(n // 2, n))}
    found = []
    for keys in distributed_results["shuffle_bn"]:  # type: ignore[attr-defined]
        matches = [half for half in itertools.combinations(range(n), n // 2)
                   if torch.allclose(keys_of(list(half)), keys[list(half)], atol=1e-5)]
        rest = [tuple(sorted(set(range(n)) - set(h))) for h in matches]
        assert matches and all(r in matches for r in rest), "keys do not come from any split into two halves"
        found.append(set(matches))
    assert any(halves != own_halves for halves in found), "the batch was never shuffled across ranks"
