"""`pathssl pretrain` end to end on tiny data: outputs, exports, NaN handling, refusal to overwrite."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from pathssl_cli.backbones import create_backbone
from pathssl_cli.cli import cli
from pathssl_cli.runs import load_checkpoint


def _pretrain(spec: Path, overrides: list[str]) -> tuple[int, str]:
    args = ["pretrain", str(spec)]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_tiny_mocov2_on_a_tile_store_through_the_cli(tile_store: Path, tmp_path: Path, specs_dir: Path,
                                                     tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "run"
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", tiny_overrides(
        tile_store, out, **{"data.mpp_weights": '{"0.5" = 1.0, "1.0" = 1.0}', "run.checkpoint_every": 3}))
    assert code == 0, output

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["seed"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["lr"] >= 0 and r["img_per_s"] > 0
               for r in records)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stain = json.loads((out / "stain_statistics.json").read_text())
    assert stain["space"] == "lab" and stain["n_images"] == 16
    # the pathology preset is RandStainNA-GMM (Kang et al.): a 3-component mixture, not a single Gaussian
    assert stain["distribution"] == "gmm" and len(stain["params"]["weights"]) == 3

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["total_steps"] == 4
    assert "queue" in state["method"] and state["stain"]["space"] == "lab"
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and state["optimizer"]["state"]

    # The export loads through the registry and through timm, with the trained weights.
    exported = out / "backbone.safetensors"
    backbone = create_backbone("resnet_tiny", exported).eval()
    trained = {k.removeprefix("backbone.timm_model."): v for k, v in state["method"].items()
               if k.startswith("backbone.timm_model.")}
    for key, value in backbone.timm_model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    plain = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(exported)}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), backbone(x))


@pytest.mark.parametrize(("method", "options"), [
    ("swav", {}),
    ("barlow_twins", {"run.precision": "bf16", "run.channels_last": "true"}),
    ("dino", {}),
    # autocast fp16 + GradScaler: emulated on CPU, ~10 s a step, so only in the slow run
    pytest.param("swav", {"run.precision": "fp16"}, marks=pytest.mark.slow),
])
def test_other_tiny_specs_run(method: str, options: dict[str, str], image_folder: Path, tmp_path: Path,
                              specs_dir: Path, tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / method
    code, output = _pretrain(specs_dir / f"tiny_{method}.toml",
                             tiny_overrides(image_folder, out, **{"run.steps": 3, **options}))
    assert code == 0, output
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 3
    if options.get("run.precision") == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
    if method == "dino":
        assert "center" in state["method"] and any(k.startswith("teacher") for k in state["method"])
    exported = create_backbone("vit_tiny" if method == "dino" else "resnet_tiny", out / "backbone.safetensors")
    # the exported network is the one the method's official evaluation uses: DINO's EMA teacher, else the student
    role = "teacher_backbone" if method == "dino" else "backbone"
    other = "backbone" if method == "dino" else None
    for key, value in exported.timm_model.state_dict().items():
        assert torch.equal(value, state["method"][f"{role}.timm_model.{key}"]), key
    if other is not None:
        assert any(not torch.equal(v, state["method"][f"{other}.timm_model.{k}"])
                   for k, v in exported.timm_model.state_dict().items()), "teacher and student coincide"
    assert json.loads((out / "metrics.json").read_text())["exported_network"] == (
        "teacher" if method == "dino" else "student")


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(
        image_folder: Path, tmp_path: Path, specs_dir: Path,
        tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "nan"
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", tiny_overrides(
        image_folder, out, **{"optim.lr": 1e30, "optim.warmup_epochs": 0, "run.steps": 6,
                              "run.checkpoint_every": 1}))
    assert code == 1, output
    assert "became" in output and "checkpoint" in output and "Traceback" not in output
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "became" in run["error"]
    assert not (out / "backbone.safetensors").exists()
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 1 <= state["step"] < 6
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_an_existing_run_is_not_overwritten_without_resume(image_folder: Path, tmp_path: Path,
                                                           specs_dir: Path,
                                                           tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "twice"
    overrides = tiny_overrides(image_folder, out, **{"run.steps": 1})
    assert _pretrain(specs_dir / "tiny_mocov2.toml", overrides)[0] == 0
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", overrides)
    assert code == 2 and "run.resume = true" in output
    # Resuming with a different plan is refused too: the schedules would not continue exactly.
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", [*overrides, "run.resume=true", "run.steps=5"])
    assert code == 2 and "planned 1 steps" in output


def test_too_few_tiles_is_a_spec_error_before_any_output(image_folder: Path, tmp_path: Path,
                                                          specs_dir: Path,
                                                          tiny_overrides: Callable[..., list[str]]) -> None:
    out = tmp_path / "small"
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml",
                             tiny_overrides(image_folder, out, **{"data.batch_size": 128}))
    assert code == 2 and "fewer than one batch" in output and "96" in output
    assert not out.exists()


def test_stain_statistics_of_another_distribution_are_refused(image_folder: Path, tmp_path: Path,
                                                              specs_dir: Path,
                                                              tiny_overrides: Callable[..., list[str]]) -> None:
    """A stain_statistics.json fitted as a single Gaussian would silently replace the preset's mixture."""
    from pathssl_cli.augment.stain import fit_stain_stats
    from pathssl_cli.data.tiles import sample_images

    stats_file = tmp_path / "normal.json"
    fit_stain_stats(sample_images([image_folder], 8, 0), "lab", "normal").save(stats_file)
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", tiny_overrides(
        image_folder, tmp_path / "run", **{"augment.stain_statistics": str(stats_file)}))
    assert code == 2, output
    assert "distribution 'normal' (the recipe asks for 'gmm')" in output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mpp_weights_with_an_image_folder_is_refused(tile_store: Path, image_folder: Path, tmp_path: Path,
                                                     specs_dir: Path,
                                                     tiny_overrides: Callable[..., list[str]]) -> None:
    """Issue 20 §5: image-folder tiles carry no µm/px, so no weighted field of view selected them and 0 of a
    folder's tiles reached an epoch, silently. The combination is a spec error naming the folder and the fix."""
    out = tmp_path / "mixed"
    code, output = _pretrain(specs_dir / "tiny_mocov2.toml", [
        *tiny_overrides(tile_store, out, **{"data.mpp_weights": '{"0.5" = 1.0, "1.0" = 1.0}'}),
        f'data.tiles=["{tile_store}", "{image_folder}"]'])
    assert code == 2, output
    assert str(image_folder) in output and "data.mpp_weights" in output and "Traceback" not in output
    assert not out.exists()
