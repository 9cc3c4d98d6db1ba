"""The study's report files: report.md (one table per protocol and metric, the paired differences under it,
what made each backbone), report.csv (one line per cell, every number) and report.png (bars with std)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.console import info
from pathssl_cli.fileio import atomic_path, atomic_write
from pathssl_cli.report import METRIC_LABELS, Cell, grouped_bars
from pathssl_cli.stats import Interval
from pathssl_cli.study.plan import Plan, _weights
from pathssl_cli.study.tables import Cell as StudyCell
from pathssl_cli.study.tables import Tables, provenance, run_results, summarise

CSV_HEADER = ["protocol", "metric", "backbone", "column", "mean", "std", "n", "ci_low", "ci_high", "confidence",
              "folds", "replicates", "reference", "difference", "difference_low", "difference_high",
              "difference_n", "difference_method"]


def _bounds(interval: Interval) -> str:
    """"[81.0, 86.0]", or why there is none."""
    if math.isnan(interval.low):
        return f"[no interval: n = {interval.n}]"
    return f"[{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def cell_text(cell: StudyCell) -> str:
    """"83.5 ± 1.2 [81.0, 86.0] (3)"; one constant value: "83.5 (deterministic)"."""
    if cell.constant:
        return f"{100 * cell.spread.mean:.1f} (deterministic)"
    return f"{cell.spread.format()} {_bounds(cell.interval)} ({cell.spread.n})"


def difference_text(interval: Interval | None) -> str:
    """"+1.3 [-0.4, +3.0] (3)"."""
    if interval is None:
        return "no common seed"
    return f"{interval.format(signed=True)} ({interval.n})"


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{100 * value:.4f}"


def write_tables(plan: Plan, tables: Tables, rows: list[str], columns: list[str]) -> Path:
    """report.md, report.csv and report.png under the study's output root; returns report.md."""
    spec = plan.spec
    level = f"{100 * spec.tables.confidence:g}%"
    folds = f" With folds, a replicate is the mean over its {spec.study.folds} test folds (every item scored " \
            "once); folds are not replicates." if spec.study.folds else ""
    lines = [f"# Study {spec.study.name}", "",
             f"Cells: mean ± std over replicates [{level} t-interval of the mean] (n replicates). A replicate is "
             "one seed of the whole pipeline: a pre-trained row's pre-training seed (evaluated with the same "
             "seed), a random init's seed, or a weights file's evaluation seed; a deterministic evaluation "
             f"(kNN, the L-BFGS probe) of a weights file is one value, marked 'deterministic'.{folds} Values in %.",
             ""]
    if tables.reference:
        lines += [f"Differences: row − {tables.reference}, in percentage points, replicate by replicate (the "
                  f"same seeds, folds and test sets): mean [{level} paired t-interval over seeds] (n pairs).", ""]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for (protocol, metric), table in tables.cells.items():
        cols = [c for c in columns if any(c in table[r] for r in table)]
        present = [r for r in rows if r in table]
        label = METRIC_LABELS.get(metric, metric)
        lines += [f"## {protocol}: {label} (%)", "", "| backbone | " + " | ".join(cols) + " |",
                  "|---|" + "|".join([":---:"] * len(cols)) + "|"]
        for row in present:
            lines.append(f"| {row} | " + " | ".join(cell_text(c) if (c := table[row].get(col)) else "—"
                                                     for col in cols) + " |")
            for col in cols:
                if (c := table[row].get(col)) is not None:
                    writer.writerow(_csv_row(protocol, metric, row, col, c, tables.reference))
        if tables.reference in present:
            others = [r for r in present if r != tables.reference]
            lines += ["", f"{protocol} {label}, paired difference against {tables.reference} ({PAIRED}, "
                      f"{level}):", "", "| row − reference | " + " | ".join(cols) + " |",
                      "|---|" + "|".join([":---:"] * len(cols)) + "|"]
            for row in others:
                texts = [difference_text(c.difference) if (c := table[row].get(col)) and col in
                         table[tables.reference] else "—" for col in cols]
                lines.append(f"| {row} − {tables.reference} | " + " | ".join(texts) + " |")
        lines.append("")
    lines += _provenance_lines(plan)
    if tables.notes:
        lines += ["## Left out", "", *[f"- {note}" for note in tables.notes], ""]
    out = plan.root
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.md", "\n".join(lines))
    atomic_write(out / "report.csv", buffer.getvalue())
    _chart(tables, rows, columns, out / "report.png")
    info(f"report: {len(tables.cells)} tables → {out / 'report.md'}, report.csv, report.png")
    return out / "report.md"


PAIRED = "paired t-interval over seeds"


def _csv_row(protocol: str, metric: str, row: str, column: str, c: StudyCell, reference: str | None) -> list[Any]:
    d = c.difference
    replicates = ";".join(f"{seed}:{100 * value:.4f}" for seed, value in sorted(c.replicates.items()))
    return [protocol, metric, row, column, f"{100 * c.spread.mean:.4f}", f"{100 * c.spread.std:.4f}", c.spread.n,
            _number(c.interval.low), _number(c.interval.high), c.interval.confidence, c.folds, replicates,
            reference if d is not None else "", _number(d.estimate) if d else "", _number(d.low) if d else "",
            _number(d.high) if d else "", d.n if d else "", d.method if d else ""]


def _provenance_lines(plan: Plan) -> list[str]:
    """What made each row's backbones: its pre-training (spec, overrides, seeds, run folders) or weights."""
    lines = ["## Backbones", "", "| backbone | architecture | weights | seeds (replicates) |", "|---|---|---|---|"]
    for item in provenance(plan):
        seeds = ", ".join(str(s) for s in item["seeds"])
        weights = item["weights"]
        if "spec" in item:
            sets = ", ".join(f"`{s}`" for s in item["set"]) or "no overrides"
            weights = (f"pre-trained by `{item['spec']}` with {sets} and run.seed = s, in `{item['runs']}` "
                       f"(`pathssl study --dry-run` prints each command)")
        cells = [item["backbone"], item["architecture"], weights, seeds]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, "", "Paths are relative to the study spec's folder.", ""]


def _chart(tables: Tables, rows: list[str], columns: list[str], path: Path) -> None:
    """One panel per protocol (its first metric): mean in %, std as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, tuple[str, dict[str, dict[str, StudyCell]]]] = {}
    for (protocol, metric), table in tables.cells.items():
        firsts.setdefault(protocol, (metric, table))
    fig, axes = plt.subplots(len(firsts), 1, figsize=(max(6.0, 1.2 * len(columns) + 2), 3.6 * len(firsts)),
                             squeeze=False)
    for ax, (protocol, (metric, table)) in zip(axes[:, 0], firsts.items(), strict=True):
        cols = [c for c in columns if any(c in table[r] for r in table)]
        series = {r: {col: Cell(c.spread.mean, c.spread.std, c.spread.n, Path()) for col, c in table[r].items()}
                  for r in rows if r in table}
        grouped_bars(ax, series, cols)
        ax.set_xticks(np.arange(len(cols)), cols, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(f"{protocol}: {METRIC_LABELS.get(metric, metric)} (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_study_report(plan: Plan) -> Path | None:
    """report.md/.csv/.png under the study's output root from what has finished; None when nothing has."""
    planned_folds: dict[tuple[str | None, str | None, float], set[int | None]] = {}
    for run in plan.runs:
        planned_folds.setdefault((run.backbone, run.entry, run.fraction), set()).add(run.fold)
    results = [r for run in plan.runs
               for r in run_results(run, len(planned_folds.get((run.backbone, run.entry, run.fraction), {None})))]
    if not results:
        return None
    spec = plan.spec
    constant_rows = {bb.name for bb in spec.backbones if bb.pretrain is None and _weights(bb) != "random"}
    tables = summarise(results, spec.tables.reference, constant_rows, spec.tables.confidence)
    rows = [bb.name for bb in spec.backbones]
    columns: list[str] = []
    for result in results:  # plan order: entries, then fractions as listed
        if result.column not in columns:
            columns.append(result.column)
    return write_tables(plan, tables, rows, columns)
