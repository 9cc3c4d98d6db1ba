"""`pathssl segment folds`: the PanNuke three-fold protocol's scores, per fold and as mean ± std.

The protocol (Gamper et al. 2020) trains on one fold, validates on the second and tests on the third, rotated
over the three folds (`specs/segment/pannuke_resnet50_fold{1,2,3}.toml`). Each rotation's `segment eval`
writes <run>/metrics.json; this gathers them. The std is the sample standard deviation over folds (ddof=1),
the spread a reader would expect from a fourth, independent rotation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pathssl_cli.errors import SpecError
from pathssl_cli.stats import mean_std

# (label, path in metrics.json); PanNuke's own mPQ/bPQ first.
FOLD_METRICS = (("mPQ", ("mpq",)), ("bPQ", ("bpq",)), ("PQ", ("mean", "pq")), ("AJI", ("mean", "aji")),
                ("Dice", ("mean", "dice")), ("F1", ("detection", "f1")))


def _lookup(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def fold_summary(run_dirs: list[Path]) -> dict[str, Any]:
    """{"folds": {run name: {metric: value}}, "mean": {...}, "std": {...}} over the runs' metrics.json."""
    folds: dict[str, dict[str, float]] = {}
    for run in run_dirs:
        path = run / "metrics.json"
        if not path.exists():
            raise SpecError(f"{path} not found: run `pathssl segment eval` on that fold's spec first")
        metrics = json.loads(path.read_text())
        folds[run.name] = {label: v for label, keys in FOLD_METRICS if (v := _lookup(metrics, keys)) is not None}
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for label, _ in FOLD_METRICS:
        values = [f[label] for f in folds.values() if label in f and not math.isnan(f[label])]
        if values:
            spread = mean_std(values)
            mean[label] = spread.mean
            std[label] = spread.std if spread.n > 1 else math.nan  # one fold says nothing of the spread
    return {"folds": folds, "mean": mean, "std": std}


def format_summary(summary: dict[str, Any]) -> str:
    labels = [label for label, _ in FOLD_METRICS if label in summary["mean"]]
    lines = ["| fold | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, values in summary["folds"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[x]:.4f}" if x in values else "" for x in labels) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{summary['mean'][x]:.4f} ± {summary['std'][x]:.4f}" for x in labels) + " |")
    return "\n".join(lines)
