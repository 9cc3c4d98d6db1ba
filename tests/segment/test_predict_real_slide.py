"""`pathssl segment predict` end to end on the real 20x SVS sample: read at the model's 0.25 µm/px, glass chunks
skipped, outputs in level-0 coordinates, figures in metrics.json, and the slide closed afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_predict import ThresholdModel  # tests/segment is on sys.path under pytest

from pathssl_cli.cli import cli

TINY_SPEC = Path(__file__).resolve().parents[2] / "specs" / "segment" / "tiny.toml"
REGION = (0, 1300, 1300, 600)  # x, y, w, h at level 0: glass on the left, epidermis and dermis on the right


class StandInModel(ThresholdModel):
    """Dark pixels are nuclei (haematoxylin), so the instances are real structures of the slide."""

    config = SimpleNamespace(num_types=0)


def test_segment_predict_on_the_real_svs(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathssl_cli.segment import readers, train

    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    (tmp_path / "model.pt").write_bytes(b"")  # predict checks that the model exists; the loader is replaced
    monkeypatch.setattr(train, "load_model", lambda path, device, **_: StandInModel())
    closed: list[str] = []
    real_close = readers.SlideReader.close
    monkeypatch.setattr(readers.SlideReader, "close", lambda self: (closed.append("svs"), real_close(self))[1])

    result = CliRunner().invoke(cli, [
        "segment", "predict", str(TINY_SPEC), "--set", f"run.output_dir='{tmp_path}'",
        "--set", f"predict.inputs=['{slide}']", "--set", f"predict.region={list(REGION)}",
        "--set", "predict.mpp=0.25", "--set", "predict.chunk_size=512",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert closed == ["svs"]

    figures = json.loads((tmp_path / "predict_run" / "metrics.json").read_text())["inputs"][slide.name]
    assert figures["level"] == 0 and figures["base_mpp"] == pytest.approx(0.499)
    assert figures["mpp"] == pytest.approx(0.25)
    region_mm2 = REGION[2] * REGION[3] * 0.499**2 / 1e6
    assert 0.1 * region_mm2 < figures["tissue_mm2"] < 0.9 * region_mm2
    # 2600 x 1200 px at 0.25 µm/px in 512 px chunks: 6 x 3; the glass on the left is never run.
    assert figures["chunks"] == 18 and 0 < figures["chunks_skipped"] < 18
    assert figures["nuclei"] > 50
    assert figures["nuclei_per_mm2"] == pytest.approx(figures["nuclei"] / figures["tissue_mm2"])
    assert figures["seconds_per_mm2"] > 0

    features = json.loads((tmp_path / "predictions" / "geojson" / "CMU-1-Small-Region.geojson").read_text())
    rings = np.concatenate([np.array(f["geometry"]["coordinates"][0]) for f in features["features"]])
    x0, y0, w, h = REGION
    assert len(features["features"]) == figures["nuclei"]
    assert x0 <= rings[:, 0].min() and rings[:, 0].max() <= x0 + w
    assert y0 <= rings[:, 1].min() and rings[:, 1].max() <= y0 + h
    # Level-0 coordinates, not 0.25 µm/px ones: the nuclei span the region, not twice its size.
    assert rings[:, 0].max() > x0 + w / 2 and rings[:, 1].max() > y0 + h / 2
