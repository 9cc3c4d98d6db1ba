"""The study's tables: every finished run's metrics.json, gathered into replicates and summarised by
`pathssl_cli.stats`.

Rows are the study's backbones (by name); columns its grid entries with their label fraction, e.g.
`linear 100%` (all labels), `linear 50%`, and for kNN's other neighbour counts `knn 100% knn_k200`.
Classification runs report top-1, balanced accuracy, macro-F1 (and AUROC for binary tasks); segmentation runs
PQ, AJI and Dice (and mPQ, bPQ on PanNuke).

What counts as a replicate (the n of every interval): one seed of the whole pipeline. A pre-trained row's
replicate s is pre-training seed s evaluated with seed s; a random-init row's is the seed that draws the weights
and the probe; a fixed weights file's is the evaluation seed, and a deterministic evaluation of it (kNN, the
L-BFGS probe: the same number for every seed) is one constant value, compared with each replicate of the other
row. With K folds a replicate's value is the mean over its K test folds, so every item is scored once; folds are
not replicates, because every seed shares them: their spread is between slides, not between runs, and counting
them would shrink the interval by a factor the seeds do not earn. A replicate missing a fold is left out (and
named), so that no mean mixes test sets.

Cells: mean ± sample std [t-interval of the mean over replicates] (n). Differences against `[tables] reference`:
the per-replicate differences over the seeds both rows have, with their paired t-interval (stats.py argues why
this, not a bootstrap over test items, is the headline: the question is whether a technique helps across runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathssl_cli.console import warn
from pathssl_cli.stats import Interval, Spread, mean_std, paired_t_interval, t_interval
from pathssl_cli.study.plan import Plan, PlannedRun
from pathssl_cli.study.status import run_status

CLASSIFICATION_METRICS = ("top1", "balanced_acc", "macro_f1", "auroc")
SEGMENT_METRICS = ("pq", "aji", "dice")
PANNUKE_METRICS = ("mpq", "bpq")
PAIRED_METHOD = "paired t over seeds"


@dataclass(frozen=True)
class Result:
    """One value of one metric from one run of a study (a fraction in [0, 1])."""

    protocol: str  # linear | finetune | knn | segment
    metric: str
    row: str  # the backbone's name in the study
    column: str  # the grid entry, with its label fraction and variant
    value: float
    seed: int = 0  # the replicate
    fold: int | None = None
    folds: int = 1  # folds the replicate is made of (its planned test folds)
    deterministic: bool = False  # no seed changes it, given the weights


@dataclass(frozen=True)
class Cell:
    """A row × column of one table: its replicates and their summary."""

    replicates: dict[int, float]  # seed -> value (the mean over its folds)
    spread: Spread
    interval: Interval
    constant: bool = False  # one deterministic value of fixed weights
    folds: int = 1
    incomplete: tuple[int, ...] = ()  # seeds left out for a missing fold
    difference: Interval | None = None  # against the reference row


@dataclass
class Tables:
    """(protocol, metric) -> row -> column -> Cell, with what was left out and why."""

    cells: dict[tuple[str, str], dict[str, dict[str, Cell]]] = field(default_factory=dict)
    reference: str | None = None
    notes: list[str] = field(default_factory=list)


def _column(run: PlannedRun, variant: str | None = None) -> str:
    column = f"{run.entry} {run.fraction * 100:g}%"
    return f"{column} {variant}" if variant else column


def run_results(run: PlannedRun, folds: int = 1) -> list[Result]:
    """The results of one finished run; [] for one not done (unfinished, failed, stale or of another spec)."""
    if run.stage == "pretrain" or run.kind == "subsample" or run.backbone is None:
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
    deterministic = run.deterministic or bool((record.get("settings") or {}).get("deterministic"))

    def result(metric: str, column: str, value: Any) -> Result:
        return Result(run.kind, metric, run.backbone or "", column, float(value), run.seed or 0, run.fold, folds,
                      deterministic)

    if run.kind == "segment":
        means = record.get("mean", {})
        return [*[result(m, _column(run), means[m]) for m in SEGMENT_METRICS if m in means],
                *[result(m, _column(run), record[m]) for m in PANNUKE_METRICS if m in record]]
    found: list[Result] = []
    for metric in CLASSIFICATION_METRICS:
        for summary, variant in [(record.get("metrics", {}), None),
                                 *[(s, label) for label, s in (record.get("variants") or {}).items()]]:
            values = summary.get(metric, {}).get("values", [])
            if values:  # the study runs one seed per run: its one value (the L-BFGS probe's fit)
                found.append(result(metric, _column(run, variant), values[0]))
    return found


def summarise(results: list[Result], reference: str | None, constant_rows: set[str],
              confidence: float = 0.95) -> Tables:
    """Replicates (fold means), their spread and interval per cell, and paired differences against `reference`."""
    tables = Tables(reference=reference)
    grouped: dict[tuple[str, str, str, str], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.protocol, r.metric, r.row, r.column), []).append(r)
    for (protocol, metric, row, column), found in grouped.items():
        by_seed: dict[int, dict[int | None, float]] = {}
        for r in found:
            by_seed.setdefault(r.seed, {})[r.fold] = r.value
        folds = found[0].folds
        complete = {seed: sum(v.values()) / len(v) for seed, v in by_seed.items() if len(v) == folds}
        incomplete = tuple(sorted(set(by_seed) - set(complete)))
        if incomplete:
            tables.notes.append(f"{protocol} {metric}, {row}, {column}: seed(s) {list(incomplete)} left out, "
                                f"{folds} folds planned but not all finished")
        if not complete:
            continue
        values = [complete[s] for s in sorted(complete)]
        constant = row in constant_rows and all(r.deterministic for r in found) and len(complete) == 1
        table = tables.cells.setdefault((protocol, metric), {})
        table.setdefault(row, {})[column] = Cell(complete, mean_std(values), t_interval(values, confidence),
                                                 constant, folds, incomplete)
    if reference is not None:
        for key, table in tables.cells.items():
            for row, cells in table.items():
                base = table.get(reference, {})
                for column, cell in cells.items():
                    if row != reference and column in base:
                        cells[column] = _with_difference(cell, base[column], confidence, tables.notes,
                                                         f"{key[0]} {key[1]}, {row}, {column}")
    return tables


def paired_difference(a: Cell, b: Cell, confidence: float = 0.95) -> Interval | None:
    """a − b replicate by replicate (the seeds both have); a constant row pairs with every replicate of the
    other. None when no replicate pairs."""
    if a.constant and b.constant:
        (value_a,), (value_b,) = a.replicates.values(), b.replicates.values()
        return Interval(value_a - value_b, math.nan, math.nan, 1, PAIRED_METHOD, confidence)
    if a.constant or b.constant:
        (value,) = (a if a.constant else b).replicates.values()
        other = b.replicates if a.constant else a.replicates
        fixed = dict.fromkeys(other, value)
        return paired_t_interval(fixed, other, confidence) if a.constant else paired_t_interval(other, fixed,
                                                                                                 confidence)
    common = sorted(set(a.replicates) & set(b.replicates))
    if not common:
        return None
    return paired_t_interval({s: a.replicates[s] for s in common}, {s: b.replicates[s] for s in common},
                             confidence)


def _with_difference(cell: Cell, base: Cell, confidence: float, notes: list[str], where: str) -> Cell:
    difference = paired_difference(cell, base, confidence)
    if difference is None:
        notes.append(f"{where}: no seed in common with the reference ({sorted(cell.replicates)} against "
                     f"{sorted(base.replicates)}), so no paired difference")
    elif not (cell.constant or base.constant) and difference.n < max(len(cell.replicates), len(base.replicates)):
        notes.append(f"{where}: the difference pairs the {difference.n} seed(s) both rows have")
    return Cell(cell.replicates, cell.spread, cell.interval, cell.constant, cell.folds, cell.incomplete,
                difference)


def provenance(plan: Plan) -> list[dict[str, Any]]:
    """Per row: what made its backbones (the pretrain spec, its overrides and seeds, or the weights)."""
    import os

    spec = plan.spec
    here = Path(spec.source_file).parent if spec.source_file else Path.cwd()

    def shown(path: Any) -> str:
        """Relative to the study spec when that reads better (a sibling folder of specs/), else absolute."""
        try:
            relative = os.path.relpath(path, here)
        except ValueError:  # another drive (Windows)
            return str(path)
        return relative if not relative.startswith(os.path.join(os.pardir, os.pardir, os.pardir)) else str(path)

    entries = {p.name: p for p in spec.pretrains}
    found = []
    for bb in spec.backbones:
        item: dict[str, Any] = {"backbone": bb.name, "architecture": plan.architectures.get(bb.name, "?"),
                                "seeds": spec.seeds_of(bb)}
        if bb.pretrain is not None:
            entry = entries[bb.pretrain]
            item.update(weights=f"pretrain {entry.name!r}", spec=shown(entry.spec),
                        set=[*spec.study.pretrain_set, *entry.set],
                        runs=shown(Path(spec.study.output_root) / "pretrain" / f"{entry.name}__seed<s>"))
        else:
            weights = bb.weights if bb.weights is not None else "random"
            item.update(weights="random init (drawn by the seed)" if weights == "random" else shown(weights))
        found.append(item)
    return found
