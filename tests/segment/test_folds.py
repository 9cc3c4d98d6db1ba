"""`pathssl segment folds`: PanNuke three-fold scores per fold and as mean ± std."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from pathssl_cli.cli import cli
from pathssl_cli.segment.folds import fold_summary


def _fold(root: Path, name: str, mpq: float, pq: float) -> Path:
    run = root / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"mpq": mpq, "bpq": mpq + 0.1, "mean": {"pq": pq, "aji": 0.5,
                                                  "dice": 0.8}, "detection": {"f1": 0.7}}))
    return run


def test_mean_and_sample_std_over_folds(tmp_path: Path) -> None:
    runs = [_fold(tmp_path, f"fold{i}", mpq, pq) for i, (mpq, pq) in enumerate([(0.4, 0.5), (0.5, 0.6), (0.6, 0.4)])]
    summary = fold_summary(runs)
    assert summary["folds"]["fold1"]["mPQ"] == 0.5
    assert math.isclose(summary["mean"]["mPQ"], 0.5) and math.isclose(summary["std"]["mPQ"], 0.1)  # ddof=1
    assert math.isclose(summary["mean"]["PQ"], 0.5) and math.isclose(summary["std"]["PQ"], 0.1)
    assert summary["std"]["AJI"] == 0.0
    result = CliRunner().invoke(cli, ["segment", "folds", *map(str, runs)])
    assert result.exit_code == 0, result.output
    assert "0.5000 ± 0.1000" in result.output and "fold2" in result.output


def test_missing_eval_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["segment", "folds", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "segment eval" in result.output
