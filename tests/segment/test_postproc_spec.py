"""`[predict.postproc]`: the watershed parameters as spec fields, defaulting to HoVer-Net's official values, and
used by `segment eval` and `segment predict` alike."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pathssl_cli.runs import save_checkpoint
from pathssl_cli.segment import postproc
from pathssl_cli.segment.evaluate import run_segment_eval
from pathssl_cli.segment.predict import run_segment_predict
from pathssl_cli.segment.train import build_model, model_record
from pathssl_cli.specs.segment import PostprocSection, SegmentSpec
from pathssl_cli.synthetic import render_tissue


def test_defaults_are_the_official_values() -> None:
    """The spec defaults must be the function defaults (HoVer-Net's): a spec that says nothing changes nothing."""
    signature = inspect.signature(postproc.hovernet_postprocess).parameters
    assert PostprocSection().model_dump() == {name: signature[name].default for name in PostprocSection.model_fields}
    assert PostprocSection().model_dump() == {"np_thresh": 0.5, "marker_thresh": 0.4, "sobel_ksize": 21,
                                              "min_size": 10}


@pytest.mark.parametrize("bad", [{"sobel_ksize": 20}, {"marker_thresh": 1.0}, {"np_thresh": 0.0},
                                 {"min_size": -1}, {"threshold": 0.5}])
def test_invalid_values_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PostprocSection.model_validate(bad)


def test_eval_and_predict_use_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    rgb, inst, _ = render_tissue(np.random.default_rng(0), 64, 64, "lymphocytes", mpp=0.5)
    cv2.imwrite(str(root / "images" / "a.png"), rgb[..., ::-1])
    np.save(root / "labels" / "a.npy", inst)
    chosen = {"np_thresh": 0.3, "marker_thresh": 0.55, "sobel_ksize": 11, "min_size": 4}
    spec = SegmentSpec.model_validate({
        "data": {"format": "generic", "test": [str(root)]},
        "model": {"backbone": "resnet_tiny", "mode": "same", "input_size": 64, "decoder_width": 0.125},
        "predict": {"inputs": [str(root / "images" / "a.png")], "overlay": False, "postproc": chosen},
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
    })
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint({"model": model.state_dict(), "hovernet": model_record(model)}, tmp_path / "run" / "model.pt")

    seen: list[dict[str, Any]] = []
    real = postproc.hovernet_postprocess

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("pathssl_cli.segment.evaluate.hovernet_postprocess", spy)
    monkeypatch.setattr("pathssl_cli.segment.postproc.hovernet_postprocess", spy)
    result = run_segment_eval(spec)
    assert seen == [chosen] and result["postproc"] == chosen
    seen.clear()
    run_segment_predict(spec)
    assert seen and all(kwargs == chosen for kwargs in seen)
