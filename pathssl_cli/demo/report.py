"""The demo's report.md (results table + figures) and its terminal summary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathssl_cli.demo.state import DemoState


def _top1(record: dict[str, Any] | None, variant: str | None = None) -> tuple[float, float] | None:
    if not record:
        return None
    metrics = record.get("variants", {}).get(variant) if variant else record.get("metrics")
    if not metrics or "top1" not in metrics:
        return None
    top1 = metrics["top1"]
    return (float(top1["mean"]), float(top1.get("std", 0.0))) if isinstance(top1, dict) else (float(top1), 0.0)


def _pct(value: tuple[float, float] | None) -> str:
    return "n/a" if value is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def _first(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern)) if folder.exists() else []
    return found[0] if found else None


def _figure(report_dir: Path, figures: Path, source: Path | None, name: str, caption: str) -> str:
    if source is None or not source.exists():
        return f"*{caption}: not produced*\n"
    figures.mkdir(exist_ok=True)
    target = figures / f"{name}{source.suffix}"
    shutil.copyfile(source, target)
    return f"**{caption}**\n\n![{caption}]({os.path.relpath(target, report_dir)})\n"


def write_report(state: DemoState, store: Path, pretrain_dir: Path, eval_runs: dict[str, Path],
                 finetune_dir: Path) -> dict[str, Any]:
    from pathssl_cli.report import run_report

    results = state.results
    rows = {label: {"linear": _top1(results.get(f"linear_{label}")),
                    "knn20": _top1(results.get(f"knn_{label}")),
                    "knn200": _top1(results.get(f"knn_{label}"), "knn_k200")}
            for label in ("pretrained", "random")}
    finetune = _top1(results.get("finetune_10pct"))
    seg = results.get("segment_score") or {}
    seg_mean = seg.get("mean", seg)
    table_path = run_report([*eval_runs.values(), finetune_dir], state.out / "results_table.md")

    margin: dict[str, float | None] = {}
    for key in ("linear", "knn20"):
        pretrained, random_init = rows["pretrained"][key], rows["random"][key]
        margin[key] = pretrained[0] - random_init[0] if pretrained and random_init else None
    lines = [
        f"# pathssl demo: {state.method} on synthetic pathology\n",
        "Everything below was produced from synthetic slides and tiles by the specs in `specs/`; run any of them "
        "again with the matching `pathssl` command, or point them at real data.\n",
        "## Classification (held-out synthetic tissue tiles, 6 classes; top-1 %, mean ± std over seeds)\n",
        "| backbone | linear | kNN k=20 | kNN k=200 |", "| --- | --- | --- | --- |",
        *[f"| resnet_tiny, {label} | {_pct(r['linear'])} | {_pct(r['knn20'])} | {_pct(r['knn200'])} |"
          for label, r in rows.items()],
        "",
        f"Low-label fine-tuning on 10% of the training labels (pretrained init): top-1 {_pct(finetune)}.\n",
        "## Nuclei instance segmentation (HoVer-Net, pretrained encoder; synthetic CoNSeP-layout test set)\n",
        "| PQ | DQ | SQ | AJI | Dice |", "| --- | --- | --- | --- | --- |",
        "| " + " | ".join(f"{seg_mean[k]:.3f}" if isinstance(seg_mean.get(k), int | float) else "n/a"
                         for k in ("pq", "dq", "sq", "aji", "dice")) + " |",
        "",
        "## Paper-style table (`pathssl report`)\n",
        table_path.read_text() if table_path.exists() else "*not produced*",
        "## Figures\n",
        _figure(state.out, state.out / "figures", _first(store / "qc", "*.png"), "qc_thumbnail",
                "Tile store QC: tissue mask and tile grid"),
        _figure(state.out, state.out / "figures", _first(pretrain_dir, "loss*.png"), "loss_curve",
                f"{state.method} pre-training loss"),
        _figure(state.out, state.out / "figures", eval_runs["linear_pretrained"] / "confusion_matrix.png",
                "confusion_matrix", "Linear probe confusion matrix (pretrained)"),
        _figure(state.out, state.out / "figures",
                _first(state.runs / "segment" / "predictions" / "overlays", "*.png"), "segmentation_overlay",
                "Predicted nuclei contours, coloured by type"),
        "## Timings (2-core CPU or whatever ran this)\n",
        *[f"- {title}: {seconds:.0f} s" for title, seconds in state.timings.items()],
    ]
    report = state.out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return {"method": state.method, "report": str(report), "classification": rows, "finetune_10pct": finetune,
            "segmentation": {k: seg_mean.get(k) for k in ("pq", "dq", "sq", "aji", "dice")},
            "margin_over_random": margin, "timings_s": state.timings}


def summarise(summary: dict[str, Any], report: Path) -> str:
    rows = summary["classification"]
    margin = summary["margin_over_random"]
    lines = ["", f"pathssl demo finished: {report}",
             f"  linear top-1  pretrained {_pct(rows['pretrained']['linear'])}  vs random "
             f"{_pct(rows['random']['linear'])}",
             f"  kNN@20 top-1  pretrained {_pct(rows['pretrained']['knn20'])}  vs random "
             f"{_pct(rows['random']['knn20'])}"]
    if margin.get("linear") is not None:
        verdict = "beats" if margin["linear"] > 0 else "does NOT beat"
        lines.append(f"  the pretrained backbone {verdict} random init by {100 * margin['linear']:+.1f} points "
                     f"(linear) and {100 * (margin.get('knn20') or 0):+.1f} points (kNN)")
    seg = summary["segmentation"]
    if seg.get("pq") is not None:
        lines.append(f"  nuclei: PQ {seg['pq']:.3f}, AJI {seg['aji']:.3f}, Dice {seg['dice']:.3f}")
    total = sum(summary["timings_s"].values())
    lines.append(f"  total {total:.0f} s")
    return "\n".join(lines)
