"""benchmarks/gpu_check.py runs end to end in its CPU form, so the command prepared for a GPU loan is exercised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # reason: ~45 s on 2 idle cores: a tile store, 5 methods' training steps, one segment predict
def test_gpu_check_cpu_form_writes_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATHSSL_PROGRESS": "0"}
    # A generous budget: on a loaded CI machine a skipped measurement would hide a broken one.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--budget-s", "900"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and result["environment"]["ok"]
    assert result["tile_store"]["ok"] and result["tile_store"]["tiles"] > 0
    for method in ("mocov2", "swav", "barlow_twins", "dino", "dinov2"):
        row = result[f"train_step/{method}"]
        assert row["ok"], row.get("error")
        assert row["fp32"]["img_s"] > 0 and 0 < row["fp32"]["views_share"] < 1
    predict = result["segment_predict"]
    assert predict["ok"], predict.get("error")
    assert predict["tiles_per_s"] > 0 and predict["windows"] > 0
    for name in ("torchrun", "compile"):  # GPU-only, skipped with a reason rather than silently absent
        assert result[name]["ok"] is False and "no GPU" in result[name]["skipped"]


def test_a_failing_measurement_is_recorded_not_fatal(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    check = gpu_check.Check(tmp_path / "g.json", budget_s=60)

    def broken() -> dict:
        raise RuntimeError("compile failed")

    assert check.run("bad", broken) is None
    assert check.run("good", lambda: {"x": 1}) == {"x": 1}
    check.run("late", lambda: {"x": 2}, min_s=3600)
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["bad"]["ok"] is False and "compile failed" in saved["bad"]["error"]
    assert saved["good"] == {"ok": True, "x": 1, "seconds": saved["good"]["seconds"]}
    assert saved["late"]["ok"] is False and "time budget" in saved["late"]["skipped"]
