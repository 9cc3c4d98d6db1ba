"""Chunked whole-image prediction (merging across chunk borders, outputs) and train -> predict -> score."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from pathssl_cli.cli import cli
from pathssl_cli.errors import SpecError
from pathssl_cli.segment.metrics import instance_stats
from pathssl_cli.segment.postproc import describe_instances
from pathssl_cli.segment.predict import ImageReader, SlideReader, plan_chunks, segment_image
from pathssl_cli.segment.targets import hv_map
from pathssl_cli.synthetic import render_tissue
from pathssl_cli.synthetic_slide import write_synthetic_slide

TINY_SPEC = Path(__file__).resolve().parents[2] / "specs" / "segment" / "tiny.toml"


class ThresholdModel(torch.nn.Module):
    """A stand-in network with exact, window-independent outputs: dark pixels are nuclei, and the HV maps are
    those of the connected components of the input patch. 96 px in, 64 px out, like a HoVer-Net mode."""

    input_size, output_size = 96, 64

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fg = (x.mean(1) < 0.5).numpy()
        hv = np.stack([hv_map(ndimage.label(f)[0], min_size=1) for f in fg])
        logit = torch.from_numpy(np.where(fg, 10.0, -10.0).astype(np.float32))
        crop = slice(16, 80)
        return {
            "np": torch.stack([-logit, logit], 1)[..., crop, crop],
            "hv": torch.from_numpy(hv)[..., crop, crop],
        }


def components(np_prob: np.ndarray, hv: np.ndarray, type_prob: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """Post-processing that is exactly window-invariant for blobs inside the window: connected components."""
    inst = ndimage.label(np_prob > 0.5)[0].astype(np.int32)
    return inst, describe_instances(inst, type_prob)


@pytest.fixture(scope="module")
def tissue() -> tuple[np.ndarray, np.ndarray]:
    rgb, inst, _ = render_tissue(np.random.default_rng(3), 200, 180, "stroma", mpp=1.0)
    return rgb, inst


def _instances(inst_map: np.ndarray) -> set[frozenset[int]]:
    """Each instance as the frozen set of its flat pixel indices (ids do not matter)."""
    flat = inst_map.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {frozenset(g.tolist()) for i, g in zip(ids, groups, strict=True) if i != 0}


def test_plan_chunks_cover_the_image_once() -> None:
    chunks = plan_chunks(300, 200, chunk_size=100, margin=30, out_size=64)
    cover = np.zeros((300, 200), int)
    for c in chunks:
        cover[c.top : c.bottom, c.left : c.right] += 1
        assert c.top % 64 == 0 and c.left % 64 == 0 and c.win_top % 64 == 0 and c.win_left % 64 == 0
        assert c.win_top == max(c.top - 64, 0) and c.win_bottom == min(c.bottom + 64, 300)
    assert (cover == 1).all()


def test_chunked_prediction_equals_one_pass(tissue: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    rgb, _ = tissue
    model = ThresholdModel()
    reader = _array_reader(rgb)
    one = segment_image(model, reader, tmp_path / "one", "x", chunk_size=1024, postprocess=components)
    many = segment_image(
        model,
        reader,
        tmp_path / "many",
        "x",
        chunk_size=64,
        chunk_margin=64,
        postprocess=components,
        map_format="tif",
    )
    import tifffile

    map_one, map_many = np.load(one.inst_map), tifffile.imread(many.inst_map)
    # Every blob is smaller than the 64 px margin, so each one is whole in the chunk that owns it.
    assert max(s.stop - s.start for box in ndimage.find_objects(map_one) for s in box) < 64
    assert _instances(map_one) == _instances(map_many)
    # No duplicates: ids are 1..count, each used once, and the JSON lists each exactly once.
    records = json.loads(many.instances.read_text())
    assert [r["id"] for r in records] == list(range(1, many.count + 1))
    assert set(np.unique(map_many)) == {0, *range(1, many.count + 1)}
    for r in records:
        r0, c0, r1, c1 = r["bbox"]
        assert r0 <= r["centroid"][1] < r1 and c0 <= r["centroid"][0] < c1


def test_hovernet_postprocessing_agrees_across_chunks(tmp_path: Path) -> None:
    """With the real watershed, per-window normalisation may move a few seams; instances must still agree."""
    rgb, truth, _ = render_tissue(np.random.default_rng(3), 200, 180, "lymphocytes", mpp=0.5)
    reader = _array_reader(rgb)
    one = segment_image(ThresholdModel(), reader, tmp_path / "one", "x", chunk_size=1024, overlay=False)
    many = segment_image(ThresholdModel(), reader, tmp_path / "many", "x", chunk_size=64, overlay=False)
    stats = instance_stats(np.load(one.inst_map), np.load(many.inst_map))
    assert stats["pq"] > 0.9
    assert stats["n_pred"] == many.count  # every id in the map is a separate, listed instance
    assert instance_stats(truth, np.load(many.inst_map))["dice"] > 0.8


def test_geojson_and_overlay(tissue: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    rgb, _ = tissue
    out = segment_image(
        ThresholdModel(),
        _array_reader(rgb),
        tmp_path,
        "x",
        chunk_size=128,
        postprocess=components,
        type_names=["background"],
    )
    geo = json.loads(out.geojson.read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) > 0
    for feature in geo["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        assert feature["properties"]["objectType"] == "detection"
    overlay = cv2.imread(str(out.overlay))
    assert overlay.shape == rgb.shape
    assert not np.array_equal(overlay[..., ::-1], rgb)  # contours were drawn


def test_slide_region_matches_image_reads(tmp_path: Path) -> None:
    import tiffslide

    slide_path = tmp_path / "slide.tif"
    write_synthetic_slide(slide_path, width=700, height=500, tile_size=128, n_levels=2, seed=1)
    region = (100, 60, 300, 200)
    reader = SlideReader(slide_path, region)
    with tiffslide.TiffSlide(str(slide_path)) as slide:
        pixels = np.asarray(slide.read_region((100, 60), 0, (300, 200), as_array=True))[..., :3]
    same = _array_reader(pixels)
    for window in ((0, 0, 64, 64), (-20, -30, 96, 96), (150, 250, 96, 96), (-10, 100, 96, 96)):
        np.testing.assert_array_equal(reader.read(*window), same.read(*window))
    out = segment_image(ThresholdModel(), reader, tmp_path / "pred", "slide", chunk_size=128)
    assert np.load(out.inst_map).shape == (200, 300)


def _array_reader(image: np.ndarray) -> ImageReader:
    return ImageReader(image)


# ------------------------------------------------------------------------------------------------ CLI
def _write_generic(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels", "types"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, inst, types = render_tissue(rng, 80, 80, ("tumour", "lymphocytes", "stroma")[i % 3], mpp=0.5)
        cv2.imwrite(str(root / "images" / f"img{i}.png"), rgb[..., ::-1])
        np.save(root / "labels" / f"img{i}.npy", inst)
        np.save(root / "types" / f"img{i}.npy", types)
    return root


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_predict_score_end_to_end(tmp_path: Path) -> None:
    train_dir = _write_generic(tmp_path / "train", 4, seed=0)
    test_dir = _write_generic(tmp_path / "test", 2, seed=1)
    run_dir = tmp_path / "run"
    common = [
        "--set",
        "data.format=generic",
        "--set",
        f"data.train=['{train_dir}']",
        "--set",
        f"data.test=['{test_dir}']",
        "--set",
        "data.num_types=5",
        "--set",
        f"run.output_dir='{run_dir}'",
        "--set",
        "train.steps_per_epoch=2",
    ]
    _invoke("segment", "train", str(TINY_SPEC), *common)
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoints" / "last.pt").exists()
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_first = max(r["step"] for r in log)
    assert {r["phase"] for r in log} == {1, 2} and steps_first == 4

    # Resume: one more phase-2 epoch continues from the checkpoint instead of starting over.
    _invoke("segment", "train", str(TINY_SPEC), *common, "--set", "train.phase2_epochs=2")
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == steps_first + 2
    assert sum(1 for r in log if r["phase"] == 1 and "loss" in r) == 2

    _invoke(
        "segment", "predict", str(TINY_SPEC), *common, "--set", f"predict.inputs=['{test_dir}/images/*.png']"
    )
    maps = run_dir / "predictions" / "maps"
    assert sorted(p.name for p in maps.glob("*.npy")) == ["img0.npy", "img1.npy"]
    assert (run_dir / "predictions" / "geojson" / "img0.geojson").exists()
    # A broken input fails alone (exit 1, named); finished inputs are skipped, not recomputed.
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = f"predict.inputs=['{test_dir}/images/*.png', '{tmp_path}/broken.png']"
    broken = CliRunner().invoke(cli, ["segment", "predict", str(TINY_SPEC), *common, "--set", inputs])
    assert broken.exit_code == 1 and "broken.png" in broken.output and "1 of 3 inputs failed" in broken.output
    scored = json.loads(
        _invoke("segment", "score", "--true", str(test_dir / "labels"), "--pred", str(maps), "--json")
    )
    assert [row["name"] for row in scored["per_image"]] == ["img0", "img1"]
    assert all(0.0 <= scored["mean"][k] <= 1.0 for k in ("dice", "aji", "pq"))

    _invoke("segment", "eval", str(TINY_SPEC), *common)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and set(metrics["mean"]) >= {"dice", "aji", "aji_plus", "pq"}
    assert "f1" in metrics["detection"]


def test_eval_on_a_pannuke_fold(tmp_path: Path) -> None:
    from pathssl_cli.runs import save_checkpoint
    from pathssl_cli.segment.evaluate import run_segment_eval
    from pathssl_cli.segment.metrics import pannuke_scores
    from pathssl_cli.segment.train import build_model, load_model, model_record
    from pathssl_cli.specs.segment import SegmentSpec

    fold = tmp_path / "Fold 3"
    fold.mkdir()
    rng = np.random.default_rng(0)
    images, masks = np.zeros((2, 64, 64, 3)), np.zeros((2, 64, 64, 6))
    for i, texture in enumerate(("tumour", "lymphocytes")):
        rgb, inst, types = render_tissue(rng, 64, 64, texture, mpp=0.5)
        images[i] = rgb
        for c in range(5):
            masks[i, ..., c] = np.where(types == c + 1, inst, 0)
        masks[i, ..., 5] = inst == 0
    np.save(fold / "images.npy", images)
    np.save(fold / "masks.npy", masks)
    np.save(fold / "types.npy", np.array(["Colon", "Breast"]))
    spec = SegmentSpec.model_validate(
        {
            "data": {"format": "pannuke", "test": [str(fold)], "num_types": 5},
            "model": {"backbone": "resnet_tiny", "mode": "same", "input_size": 64, "decoder_width": 0.125},
            "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        }
    )
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint(
        {"model": model.state_dict(), "hovernet": model_record(model)}, tmp_path / "run" / "model.pt"
    )
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run" / "model.pt")(x)["hv"], model(x)["hv"])

    result = run_segment_eval(spec)
    assert set(result["per_tissue"]) == {"Breast", "Colon"} and {"mpq", "bpq", "per_class"} <= set(result)
    predicted = np.load(tmp_path / "run" / "eval" / "predictions" / "Fold 3_masks.npy")
    assert predicted.shape == (2, 64, 64, 6)
    np.testing.assert_array_equal(predicted[..., 5] == 1, predicted[..., :5].sum(-1) == 0)
    rescored = pannuke_scores(masks, predicted, ["Colon", "Breast"])
    np.testing.assert_equal(rescored["mpq"], result["mpq"])
    np.testing.assert_equal(rescored["bpq"], result["bpq"])


@pytest.mark.parametrize("change", ["predict.tta='dihedral'", "predict.postproc.min_size=50", "data.test",
                                    "model.pt"])
def test_eval_refuses_a_run_made_with_other_eval_inputs(tmp_path: Path, change: str) -> None:
    """Issue 20 §1: the segment digest leaves out what only `segment eval` reads, so each of these printed the
    old PQ's run as 'eval: done'. Now eval compares its own inputs: refused (exit 2, naming it) until forced."""
    from pathssl_cli.runs import save_checkpoint
    from pathssl_cli.segment.train import build_model, model_record
    from pathssl_cli.specs import load_spec

    test_dir = _write_generic(tmp_path / "test", 1, seed=1)
    other = _write_generic(tmp_path / "other", 2, seed=2)
    sets = ["data.format='generic'", f"data.train=['{test_dir}']", f"data.test=['{test_dir}']", "data.num_types=5",
            f"run.output_dir='{tmp_path / 'run'}'"]
    spec = load_spec(TINY_SPEC, sets, check_inputs=False)

    def save_model(seed: int) -> None:
        torch.manual_seed(seed)
        model = build_model(spec).eval()
        save_checkpoint({"model": model.state_dict(), "hovernet": model_record(model)}, tmp_path / "run" / "model.pt")

    save_model(0)
    args = ["segment", "eval", str(TINY_SPEC), *[w for item in sets for w in ("--set", item)]]
    _invoke(*args)
    before = (tmp_path / "run" / "eval" / "metrics.json").read_bytes()
    if change == "model.pt":  # retrained: another model under the same name
        save_model(1)
        extra: list[str] = []
        named = "model.checkpoint"
    elif change == "data.test":
        extra = ["--set", f"data.test=['{other}']"]
        named = "data.test"
    else:
        extra = ["--set", change]
        named = change.split("=")[0]
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert named in result.output and "--force" in result.output and "Traceback" not in result.output
    assert (tmp_path / "run" / "eval" / "metrics.json").read_bytes() == before
    result = CliRunner().invoke(cli, ["--force", *args, *extra])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "run").glob("eval.replaced-*/metrics.json"))) == 1


def test_invalid_segment_spec_exits_2() -> None:
    result = CliRunner().invoke(
        cli, ["segment", "train", str(TINY_SPEC), "--set", "data.format=pannuke", "--set", "data.num_types=3"]
    )
    assert result.exit_code == 2 and "num_types" in result.output


@pytest.mark.slow  # two extra Python processes importing torch: ~30-60 s on 2 cores
def test_two_process_gloo_training(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    train_dir = _write_generic(tmp_path / "train", 4, seed=0)
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "pathssl_cli", "segment", "train", str(TINY_SPEC), "--set", "data.format=generic",
            "--set", f"data.train=['{train_dir}']", "--set", "data.test=[]", "--set", "data.num_types=5",
            "--set", f"run.output_dir='{out}'", "--set", "train.steps_per_epoch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATHSSL_PROGRESS": "0"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["world_size"] == 2
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 4 images x 4 windows = 16 patches, 8 per rank = one batch of 8 per epoch; rank 0 logs each step once.
    assert sum(1 for r in steps if "loss" in r) == 2
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("frozen_bn_stats", [False, True])
def test_phase1_encoder_statistics(tmp_path: Path, frozen_bn_stats: bool) -> None:
    """Random-init BatchNorm starts at mean 0: HoVer-Net's freeze moves it, frozen_bn_stats keeps it."""
    from pathssl_cli.runs import load_checkpoint
    from pathssl_cli.segment.train import run_segment_train
    from pathssl_cli.specs.segment import SegmentSpec

    spec = SegmentSpec.model_validate({
        "data": {"format": "generic", "train": [str(_write_generic(tmp_path / "d", 1, seed=0))]},
        "model": {"backbone": "resnet_tiny", "mode": "same", "input_size": 64, "decoder_width": 0.125},
        "train": {"phase1_epochs": 1, "phase2_epochs": 0, "batch_size": 2, "steps_per_epoch": 1, "workers": 0,
                  "frozen_bn_stats": frozen_bn_stats},
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "resume": False},
    })
    run_segment_train(spec)
    state = load_checkpoint(tmp_path / "run" / "model.pt")["model"]
    means = [v for k, v in state.items() if k.startswith("encoder.") and k.endswith("running_mean")]
    assert means and all(m.abs().sum() == 0 for m in means) == frozen_bn_stats



def test_resumed_training_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pathssl_cli.segment.train as train_module
    from pathssl_cli.runs import load_checkpoint, save_checkpoint
    from pathssl_cli.specs.segment import SegmentSpec

    data = str(_write_generic(tmp_path / "d", 2, seed=0))

    def train(out: str) -> None:
        spec = SegmentSpec.model_validate({
            "data": {"format": "generic", "train": [data]},
            "model": {"backbone": "resnet_tiny", "mode": "same", "input_size": 64, "decoder_width": 0.125},
            "train": {"phase1_epochs": 2, "phase2_epochs": 1, "batch_size": 2, "phase2_batch_size": 2,
                      "steps_per_epoch": 2, "workers": 0, "lr": 1e-3},
            "run": {"output_dir": str(tmp_path / out), "device": "cpu", "seed": 5},
        })
        torch.manual_seed(0)  # a fresh process: build_model draws the same initial weights
        train_module.run_segment_train(spec)

    train("straight")

    def save_then_die(state: dict, path: Path) -> None:
        save_checkpoint(state, path)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train("killed")
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    train("killed")  # resumes at phase 1, epoch 2
    straight = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    resumed = load_checkpoint(tmp_path / "killed" / "model.pt")["model"]
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_trimmed_overlapping_tiles_stay_aligned(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    """ThresholdModel's NP output depends on the pixel alone, so any trim must give the same NP map: a
    misplaced tile would show as a mismatch."""
    from pathssl_cli.segment.inference import predict_window

    rgb, _ = tissue
    reader, model = _array_reader(rgb), ThresholdModel()
    np0, _, _ = predict_window(model, reader, 0, 0, 200, 180, trim=0)
    np8, hv8, _ = predict_window(model, reader, 0, 0, 200, 180, trim=8)
    np.testing.assert_array_equal(np0, np8)
    assert np8.shape == (200, 180) and hv8.shape == (2, 200, 180)
    with pytest.raises(SpecError, match="trim"):
        predict_window(model, reader, 0, 0, 64, 64, trim=30)
