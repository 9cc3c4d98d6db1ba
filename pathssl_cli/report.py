"""`pathssl report RUN_DIR...`: the paper-style results table from the runs' metrics.json files.

Rows are what was evaluated (SSL method + backbone + weights), columns are dataset × protocol (e.g. `crc /
linear`, `pcam / knn_k20`, `bach / linear[subset_1pct]`), and each cell is mean ± std over seeds of one metric
(top-1 accuracy by default, as in Kang et al.; values in %). Writes the markdown table, the same table as CSV
(mean, std and seed count in separate columns) and a grouped bar chart with std error bars.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.console import info, warn
from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.fileio import atomic_path, atomic_write

METRIC_LABELS = {
    "top1": "top-1 accuracy",
    "balanced_acc": "balanced accuracy",
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
}


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    n: int
    source: Path


def find_metrics(run_dirs: Iterable[Path]) -> list[Path]:
    """metrics.json of each run dir; a folder without one is searched below (e.g. `runs/eval`)."""
    found: list[Path] = []
    problems: list[Problem] = []
    for run_dir in run_dirs:
        direct = run_dir / "metrics.json"
        if direct.is_file():
            found.append(direct)
        elif run_dir.is_dir() and (below := sorted(run_dir.rglob("metrics.json"))):
            found.extend(below)
        elif run_dir.is_file() and run_dir.name == "metrics.json":
            found.append(run_dir)
        else:
            what = (
                "does not exist" if not run_dir.exists() else "holds no metrics.json (nor any folder below)"
            )
            problems.append(
                Problem(
                    str(run_dir),
                    f"{what}. Give run directories written by `pathssl evaluate "
                    "linear|finetune|knn` (a finished run has metrics.json).",
                )
            )
    if problems:
        raise SpecError(problems)
    return [path for path in found if _is_finished_evaluation(path)]


def _is_finished_evaluation(metrics_path: Path) -> bool:
    """Skip other run kinds (pretrain, segment) found below a folder, and runs that did not finish: a failed
    rerun into an old directory must not have its predecessor's metrics reported as its own."""
    run_json = metrics_path.parent / "run.json"
    if not run_json.is_file():
        return True  # metrics written by hand or copied without their run.json
    try:
        record = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return False
    if record.get("kind") not in (None, "linear", "finetune", "knn"):
        return False
    if record.get("status") != "done":
        warn(f"{metrics_path.parent}: skipped, its run.json says status {record.get('status')!r}, not 'done'")
        return False
    return True


def weights_label(weights: str) -> str:
    """'random', or the weights file named with its folder (runs/dino_tcga/backbone.safetensors →
    dino_tcga/backbone), which identifies a pretrain run without the whole path."""
    if weights == "random":
        return "random"
    path = Path(weights)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def row_key(record: dict[str, Any]) -> tuple[str, str, str]:
    """(method, backbone, weights): a checkpoint's teacher and student are two rows ('... (student)')."""
    weights = weights_label(str(record.get("weights")))
    network = record.get("weights_network") or "auto"
    return (
        record.get("method") or "-",
        str(record.get("backbone", "?")),
        weights if network == "auto" else f"{weights} ({network})",
    )


def record_cells(record: dict[str, Any], metric: str) -> list[tuple[str, dict[str, Any]]]:
    """(column, summary) for the run's main result and each variant (other k of kNN)."""
    dataset = record.get("dataset", "?")
    out = [(f"{dataset} / {record.get('label') or record.get('protocol', '?')}", record.get("metrics", {}))]
    for label, summary in (record.get("variants") or {}).items():
        out.append((f"{dataset} / {label}", summary))
    return [(column, summary[metric]) for column, summary in out if metric in summary]


PROTOCOL_ORDER = {"linear": 0, "finetune": 1, "knn": 2}


def column_order(column: str) -> tuple[str, int, float, str]:
    """Dataset, then linear < finetune < kNN (by k), then the label fraction (1% < 10% < all labels)."""
    dataset, _, label = column.partition(" / ")
    base, _, subset = label.partition("[")
    protocol = base.split("_k")[0]
    k = re.search(r"_k(\d+)$", base)
    pct = re.search(r"(\d+(?:\.\d+)?)pct", subset)
    fraction = float(pct[1]) if pct else float("inf")
    rank = PROTOCOL_ORDER.get(protocol, len(PROTOCOL_ORDER)) * 10_000 + (int(k[1]) if k else 0)
    return (dataset, rank, fraction, label)


def collect(files: list[Path], metric: str) -> tuple[dict[tuple[str, str, str], dict[str, Cell]], list[str]]:
    table: dict[tuple[str, str, str], dict[str, Cell]] = {}
    columns: list[str] = []
    problems: list[Problem] = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(Problem(str(path), f"cannot read as JSON ({exc}); rerun that evaluation."))
            continue
        if not isinstance(record, dict) or "metrics" not in record:
            problems.append(Problem(str(path), "not a pathssl evaluation metrics.json (no 'metrics' key)."))
            continue
        row = table.setdefault(row_key(record), {})
        for column, summary in record_cells(record, metric):
            if column in row:
                warn(
                    f"{column} for {' + '.join(row_key(record))} appears twice ({row[column].source} and "
                    f"{path}); keeping {path}"
                )
            row[column] = Cell(
                float(summary["mean"]),
                float(summary.get("std", 0.0)),
                len(summary.get("values", [])) or 1,
                path,
            )
            if column not in columns:
                columns.append(column)
    if problems:
        raise SpecError(problems)
    return table, sorted(columns, key=column_order)


def markdown(table: dict[tuple[str, str, str], dict[str, Cell]], columns: list[str], metric: str) -> str:
    header = ["method", "backbone", "weights", *columns]
    lines = [
        f"{METRIC_LABELS.get(metric, metric)} (%), mean ± std over seeds",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + [":---:"] * len(columns)) + "|",
    ]
    for key in sorted(table):
        cells = [
            f"{100 * c.mean:.2f} ± {100 * c.std:.2f}" if (c := table[key].get(col)) else "—"
            for col in columns
        ]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines) + "\n"


def csv_text(table: dict[tuple[str, str, str], dict[str, Cell]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "method",
            "backbone",
            "weights",
            *[f"{col} {part}" for col in columns for part in ("mean", "std", "n")],
        ]
    )
    for key in sorted(table):
        values: list[str] = []
        for col in columns:
            c = table[key].get(col)
            values += [f"{100 * c.mean:.4f}", f"{100 * c.std:.4f}", str(c.n)] if c else ["", "", ""]
        writer.writerow([*key, *values])
    return buffer.getvalue()


def _grouped_bars(ax: Any, series: dict[str, dict[str, Cell]], columns: list[str]) -> None:
    """One bar per (series, column), side by side within a column: mean in %, std as the error bar."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(columns))
    for i, (label, cells) in enumerate(series.items()):
        means = [100 * cells[c].mean if c in cells else np.nan for c in columns]
        stds = [100 * cells[c].std if c in cells else 0.0 for c in columns]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label)


def bar_chart(
    table: dict[tuple[str, str, str], dict[str, Cell]], columns: list[str], metric: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.5))
    _grouped_bars(ax, {" + ".join(key): table[key] for key in sorted(table)}, columns)
    ax.set_xticks(np.arange(len(columns)), columns, rotation=30, ha="right")
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_report(run_dirs: list[Path], out: Path | None, metric: str = "top1") -> Path:
    """Write `out` (markdown; default ./report.md) and `.csv`, `.png` beside it; returns the markdown path."""
    if metric not in METRIC_LABELS:
        raise SpecError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_LABELS)}")
    table, columns = collect(find_metrics(run_dirs), metric)
    if not columns:
        raise SpecError(f"none of the runs reports {metric!r} (AUROC exists for binary tasks only).")
    out = Path(out) if out is not None else Path("report.md")
    text = markdown(table, columns, metric)
    atomic_write(out, text)
    atomic_write(out.with_suffix(".csv"), csv_text(table, columns))
    bar_chart(table, columns, metric, out.with_suffix(".png"))
    print(text, end="")
    info(
        f"report: {len(table)} rows × {len(columns)} columns → {out}, {out.with_suffix('.csv')}, "
        f"{out.with_suffix('.png')}"
    )
    return out


# ------------------------------------------------------------------------- study tables (`pathssl study`)
@dataclass(frozen=True)
class Result:
    """One seed's value of one metric, from one run of a study (values are fractions in [0, 1])."""

    protocol: str  # linear | finetune | knn | segment
    metric: str
    row: str  # the backbone's name in the study
    column: str  # the grid entry, with its label fraction and variant
    value: float


def pool(results: list[Result]) -> dict[tuple[str, str], dict[str, dict[str, Cell]]]:
    """(protocol, metric) → row → column → mean ± sample std (ddof = 1; 0 for one seed) over the seeds."""
    values: dict[tuple[str, str], dict[str, dict[str, list[float]]]] = {}
    for r in results:
        values.setdefault((r.protocol, r.metric), {}).setdefault(r.row, {}).setdefault(r.column, []).append(r.value)
    out: dict[tuple[str, str], dict[str, dict[str, Cell]]] = {}
    for key, rows in values.items():
        for row, columns in rows.items():
            for column, vals in columns.items():
                array = np.asarray(vals, dtype=np.float64)
                std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
                out.setdefault(key, {}).setdefault(row, {})[column] = Cell(float(array.mean()), std, len(vals),
                                                                           Path())
    return out


def write_study_tables(results: list[Result], out: Path, title: str, rows: list[str],
                       columns: list[str]) -> Path:
    """report.md (one table per protocol and metric, mean ± std (n seeds) in %), report.csv (one line per
    cell) and report.png (one panel per protocol, its first metric) under `out`; `rows` and `columns` give
    the order (the study's)."""
    tables = pool(results)
    lines = [f"# {title}", ""]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "metric", "backbone", "column", "mean", "std", "n"])
    for (protocol, metric), table in tables.items():
        cols = [c for c in columns if any(c in table[r] for r in table)]
        lines += [f"## {protocol}: {METRIC_LABELS.get(metric, metric)} (%), mean ± std over seeds (n)", "",
                  "| backbone | " + " | ".join(cols) + " |", "|---|" + "|".join([":---:"] * len(cols)) + "|"]
        for row in (r for r in rows if r in table):
            cells = [f"{100 * c.mean:.2f} ± {100 * c.std:.2f} ({c.n})" if (c := table[row].get(col)) else "—"
                     for col in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
            for col in cols:
                if (c := table[row].get(col)) is not None:
                    writer.writerow([protocol, metric, row, col, f"{100 * c.mean:.4f}", f"{100 * c.std:.4f}", c.n])
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.md", "\n".join(lines))
    atomic_write(out / "report.csv", buffer.getvalue())
    _study_chart(tables, rows, columns, out / "report.png")
    info(f"report: {len(tables)} tables → {out / 'report.md'}, report.csv, report.png")
    return out / "report.md"


def _study_chart(tables: dict[tuple[str, str], dict[str, dict[str, Cell]]], rows: list[str], columns: list[str],
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, tuple[str, dict[str, dict[str, Cell]]]] = {}
    for (protocol, metric), table in tables.items():
        firsts.setdefault(protocol, (metric, table))
    fig, axes = plt.subplots(len(firsts), 1, figsize=(max(6.0, 1.2 * len(columns) + 2), 3.6 * len(firsts)),
                             squeeze=False)
    for ax, (protocol, (metric, table)) in zip(axes[:, 0], firsts.items(), strict=True):
        cols = [c for c in columns if any(c in table[r] for r in table)]
        _grouped_bars(ax, {r: table[r] for r in rows if r in table}, cols)
        ax.set_xticks(np.arange(len(cols)), cols, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(f"{protocol}: {METRIC_LABELS.get(metric, metric)} (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
