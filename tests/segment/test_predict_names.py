"""Issue 20 §5: `segment predict` names outputs by file stem (so `segment score` pairs them with labels), and two
inputs must never share a name: siteA/slide_001 and siteB/slide_001 wrote the same files, the second "skipped" as
done with exit 0. Duplicates are refused up front (exit 2), and outputs made from another input are never taken
as done."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_train_predict import ThresholdModel  # tests/segment is on sys.path under pytest

from pathssl_cli.cli import cli

TINY_SPEC = Path(__file__).resolve().parents[2] / "specs" / "segment" / "tiny.toml"


class StandInModel(ThresholdModel):
    config = SimpleNamespace(num_types=0)


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = np.full((64, 64, 3), 230, np.uint8)
    for _ in range(4):  # a few dark blobs: the stand-in model's nuclei
        y, x = rng.integers(8, 56, 2)
        cv2.circle(image, (int(x), int(y)), 7, (40, 40, 90), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


@pytest.fixture()
def predict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pathssl_cli.segment import train

    (tmp_path / "model.pt").write_bytes(b"")
    monkeypatch.setattr(train, "default_model_path", lambda spec: tmp_path / "model.pt")
    monkeypatch.setattr(train, "load_model", lambda path, device, **_: StandInModel())

    def run(*inputs: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, [
            "segment", "predict", str(TINY_SPEC), "--set", f"run.output_dir='{tmp_path / 'out'}'",
            "--set", f"predict.inputs={list(inputs)}", "--set", "predict.overlay=false"])
        return result.exit_code, result.output

    return run


def test_two_inputs_with_one_stem_are_refused_up_front(tmp_path: Path, predict) -> None:
    a, b = _image(tmp_path / "siteA" / "slide_001.png", 1), _image(tmp_path / "siteB" / "slide_001.png", 2)
    code, output = predict(str(a), str(b))
    assert code == 2, output
    assert str(a) in output and str(b) in output and "Traceback" not in output
    assert not (tmp_path / "out" / "predictions").exists()  # refused before any work


def test_outputs_of_another_input_are_not_taken_as_done(tmp_path: Path, predict) -> None:
    a, b = _image(tmp_path / "siteA" / "slide_001.png", 1), _image(tmp_path / "siteB" / "slide_001.png", 2)
    code, output = predict(str(a))
    assert code == 0, output
    geojson = tmp_path / "out" / "predictions" / "geojson" / "slide_001.geojson"
    first = geojson.read_bytes()
    assert json.loads(first)["features"]  # a's nuclei
    code, output = predict(str(a))  # the same input again: done, skipped
    assert code == 0 and "skipped" in output
    code, output = predict(str(b))  # another input with that name: refused, the outputs stay a's
    assert code == 2, output
    assert str(a.resolve()) in output and str(b) in output
    assert geojson.read_bytes() == first
    summary = json.loads((tmp_path / "out" / "predict_run" / "predict_summary.json").read_text())
    assert summary["outputs"] == []  # the last completed run (the skip) predicted nothing


def test_the_same_file_named_twice_is_predicted_once(tmp_path: Path, predict) -> None:
    a = _image(tmp_path / "siteA" / "slide_001.png", 1)
    code, output = predict(str(a), str(tmp_path / "siteA" / "*.png"))
    assert code == 0, output
    summary = json.loads((tmp_path / "out" / "predict_run" / "predict_summary.json").read_text())
    assert [Path(o["input"]).name for o in summary["outputs"]] == ["slide_001.png"]
