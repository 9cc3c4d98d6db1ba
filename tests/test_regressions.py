"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tifffile
from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.synthetic import write_image_folder

SPECS = Path(__file__).resolve().parents[1] / "specs"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_slide_that_is_all_tissue_is_tiled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = np.clip(np.array([190, 90, 170]) + rng.normal(0, 25, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    # 2e4 px/cm = 0.5 µm/px; tissue from edge to edge, as in a crop or a TMA core
    tifffile.imwrite(tmp_path / "full.tif", pixels, tile=(256, 256), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    code, output = invoke("tile", str(SPECS / "tile" / "tiny.toml"), "--set", f"input.slides=['{tmp_path}/full.tif']",
                          "--set", f"output.dir={tmp_path / 'store'}", "--set", "tiles.size=64",
                          "--set", "tiles.mpp=[1.0]")
    assert code == 0, output
    from pathssl_cli.tiling.index import read_tiles

    assert read_tiles(tmp_path / "store").num_rows > 0


def _labelled(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "tiles", n_per_class=3, size=32, seed=0)


def test_knn_k_below_one_is_a_spec_error(tmp_path: Path) -> None:
    root = _labelled(tmp_path)
    code, output = invoke("evaluate", "knn", str(SPECS / "evaluate" / "tiny_knn.toml"), "--set",
                          f"data.root={root}", "--set", f"run.output_dir={tmp_path / 'knn'}", "--set", "knn.k=[0]")
    assert code == 2 and "knn.k" in output
    assert not (tmp_path / "knn").exists()


def test_malformed_test_folder_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    root = _labelled(tmp_path)
    shutil.rmtree(root / "test" / "tumour")
    code, output = invoke("evaluate", "knn", str(SPECS / "evaluate" / "tiny_knn.toml"), "--set",
                          f"data.root={root}", "--set", f"run.output_dir={tmp_path / 'knn'}")
    assert code == 2 and "tumour" in output


def test_report_skips_runs_that_did_not_finish(tmp_path: Path) -> None:
    root = _labelled(tmp_path)
    run = tmp_path / "runs" / "knn"
    code, output = invoke("evaluate", "knn", str(SPECS / "evaluate" / "tiny_knn.toml"), "--set",
                          f"data.root={root}", "--set", f"run.output_dir={run}")
    assert code == 0, output
    shutil.copytree(run, tmp_path / "runs" / "knn_failed_rerun")
    record_path = tmp_path / "runs" / "knn_failed_rerun" / "run.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "status": "failed"}))
    metrics_path = tmp_path / "runs" / "knn_failed_rerun" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["metrics"]["top1"] = {"mean": 0.123456, "std": 0.0, "values": [0.123456]}
    metrics_path.write_text(json.dumps(metrics))
    code, output = invoke("report", str(tmp_path / "runs"), "--out", str(tmp_path / "table.md"))
    assert code == 0, output
    table = (tmp_path / "table.md").read_text()
    assert "12.35" not in table  # the failed rerun's stale metrics.json is not reported
    assert "resnet_tiny" in table
