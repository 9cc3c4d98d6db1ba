"""The study's tables: every finished run's metrics.json, pooled over seeds by `pathssl_cli.report`.

Rows are the study's backbones (by name); columns its grid entries with their label fraction, e.g.
`linear 100%` (all labels), `linear 50%`, and for kNN's other neighbour counts `knn 100% knn_k200`.
Classification runs report top-1, balanced accuracy, macro-F1 (and AUROC for binary tasks); segmentation runs
PQ, AJI and Dice (and mPQ, bPQ on PanNuke).
"""

from __future__ import annotations

import json
from pathlib import Path

from pathssl_cli.console import warn
from pathssl_cli.report import Result, write_study_tables
from pathssl_cli.study.plan import Plan, PlannedRun
from pathssl_cli.study.status import run_status

CLASSIFICATION_METRICS = ("top1", "balanced_acc", "macro_f1", "auroc")
SEGMENT_METRICS = ("pq", "aji", "dice")
PANNUKE_METRICS = ("mpq", "bpq")


def _column(run: PlannedRun, variant: str | None = None) -> str:
    column = f"{run.entry} {run.fraction * 100:g}%"
    return f"{column} {variant}" if variant else column


def run_results(run: PlannedRun) -> list[Result]:
    """The results of one finished run; [] for one not done (unfinished, failed, stale or of another spec)."""
    if run.kind == "subsample" or run.backbone is None:
        return []
    status = run_status(run)
    if status.word in ("stale", "changed"):  # its metrics.json is there, but not the result of this study
        warn(f"{run.name}: left out of the report, {status.word} ({'; '.join(status.changes[:2])}); rerun the study")
    if status.word != "done":
        return []
    path = run.output_dir / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warn(f"{path}: cannot read ({exc}); left out of the report")
        return []
    found: list[Result] = []
    if run.kind == "segment":
        means = record.get("mean", {})
        for metric in SEGMENT_METRICS:
            if metric in means:
                found.append(Result("segment", metric, run.backbone, _column(run), float(means[metric])))
        for metric in PANNUKE_METRICS:
            if metric in record:
                found.append(Result("segment", metric, run.backbone, _column(run), float(record[metric])))
        return found
    for metric in CLASSIFICATION_METRICS:
        for summary, variant in [(record.get("metrics", {}), None),
                                 *[(s, label) for label, s in (record.get("variants") or {}).items()]]:
            for value in summary.get(metric, {}).get("values", []):
                found.append(Result(run.kind, metric, run.backbone, _column(run, variant), float(value)))
    return found


def write_study_report(plan: Plan) -> Path | None:
    """report.md/.csv/.png under the study's output root from what has finished; None when nothing has."""
    results = [r for run in plan.runs for r in run_results(run)]
    if not results:
        return None
    rows = [bb.name for bb in plan.spec.backbones]
    columns: list[str] = []
    for result in results:  # plan order: entries, then fractions as listed
        if result.column not in columns:
            columns.append(result.column)
    return write_study_tables(results, plan.root, f"Study {plan.spec.study.name}", rows, columns)
