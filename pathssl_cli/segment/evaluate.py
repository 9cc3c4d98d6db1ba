"""`pathssl segment eval`: predict the test split, post-process, score as HoVer-Net and PanNuke do.

Each test image is segmented whole with the same tiled inference `segment predict` uses (one pass, no chunk
seams: test images are tile-sized in PanNuke and 1000 px in CoNSeP), then:
- instance metrics per image (Dice, Dice 2, AJI, AJI+, DQ/SQ/PQ) averaged over images (`metrics.aggregate`);
- HoVer-Net's detection F1 and per-type F1 on centroids (12 px radius);
- for PanNuke, mPQ and bPQ through `metrics.pannuke_scores`; the predicted masks are written as
  `predictions/<fold>_masks.npy` in the official (N, H, W, 6) layout so they can be rescored independently.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathssl_cli.console import info, track
from pathssl_cli.distributed import resolve_device
from pathssl_cli.errors import SpecError
from pathssl_cli.fileio import atomic_path, atomic_write
from pathssl_cli.runs import claim_run_dir, open_run
from pathssl_cli.segment import metrics as M
from pathssl_cli.segment.datasets import PanNukeFold
from pathssl_cli.segment.inference import PatchModel, default_trim, predict_window
from pathssl_cli.segment.postproc import describe_instances, hovernet_postprocess
from pathssl_cli.segment.readers import ImageReader
from pathssl_cli.specs.segment import SegmentSpec, TTAChoice


def segment_array(model: PatchModel, image: np.ndarray, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", precision: str = "fp32", trim: int | None = None,
                  postproc: dict[str, Any] | None = None, tta: TTAChoice = "none",
                  ) -> tuple[np.ndarray, dict[int, Any]]:
    """Instance map and instances of one in-memory RGB image (H, W, 3) uint8 (`trim`: see `predict_window`;
    None = `default_trim`; `postproc`: keyword arguments of `hovernet_postprocess`, None = its defaults)."""
    trim = default_trim(model) if trim is None else trim
    np_prob, hv, tp = predict_window(model, ImageReader(image), 0, 0, image.shape[0], image.shape[1],
                                     batch_size=batch_size, device=device, precision=precision, trim=trim,
                                     tta=tta)
    return hovernet_postprocess(np_prob, hv, tp, **(postproc or {}))


def _truth_points(inst: np.ndarray, types: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (N, 2) x, y and majority types (N,) of a ground-truth map, from the shared describer."""
    onehot = None
    if types is not None:
        n_types = int(types.max(initial=0)) + 1
        onehot = (types[None] == np.arange(n_types)[:, None, None]).astype(np.float32)
    described = describe_instances(M.remap_label(inst), onehot)
    centroids = np.array([d.centroid for d in described.values()], np.float64).reshape(-1, 2)
    kinds = np.array([d.type or 0 for d in described.values()], np.int64)
    return centroids, kinds


def run_segment_eval(spec: SegmentSpec) -> dict[str, Any]:
    """Score the trained model on data.test (data.val when test is empty); returns the metrics dict."""
    from pathssl_cli.segment.train import default_model_path, load_model, open_split

    split = "test" if spec.data.test else "val"
    if not getattr(spec.data, split):
        raise SpecError("data.test and data.val are empty: give the folders to evaluate on")
    model_path = default_model_path(spec)
    if not model_path.exists():
        raise SpecError(
            f"no trained model at {model_path}: run `pathssl segment train` first or set model.checkpoint"
        )
    device = resolve_device(spec.run.device)
    precision = spec.run.precision if device.type == "cuda" else "fp32"
    model = load_model(model_path, device, channels_last=spec.run.channels_last)
    typed = model.config.num_types > 0
    sources = open_split(spec, split)
    run_dir = Path(spec.run.output_dir) / "eval"
    rows: list[dict[str, Any]] = []
    stats: list[dict[str, Any]] = []
    points: dict[str, list[np.ndarray]] = {"tc": [], "tt": [], "pc": [], "pt": []}
    pannuke_rows: list[dict[str, Any]] = []
    # Its own rule: everything eval depends on (the trained model's sha256, the evaluated split's listing, the
    # post-processing, TTA and trim) must match a run here, which the training digest leaves out.
    claim_run_dir(spec, run_dir, "segment eval")
    with open_run(spec, run_dir, command="segment eval", seed=spec.run.seed) as run:
        for source in sources:
            with ExitStack() as stack:
                pannuke_pred = None
                if isinstance(source, PanNukeFold):
                    target = run_dir / "predictions" / f"{source.root.name}_masks.npy"
                    tmp = stack.enter_context(atomic_path(target))
                    pannuke_pred = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.int32, shape=source.masks.shape
                    )
                for i in track(range(len(source)), total=len(source), desc=f"eval {split}", unit="image"):
                    sample = source.load(i)
                    inst, instances = segment_array(
                        model, sample.image, batch_size=spec.predict.batch_size, device=device,
                        precision=precision, trim=spec.predict.trim, tta=spec.predict.tta,
                        postproc=spec.predict.postproc.model_dump())
                    s = M.instance_stats(sample.inst_map, inst)
                    stats.append(s)
                    rows.append({"name": sample.name, **{k: s[k] for k in M.METRIC_KEYS}})
                    tc, tt = _truth_points(sample.inst_map, sample.type_map if typed else None)
                    points["tc"].append(tc)
                    points["tt"].append(tt)
                    centroids = [d.centroid for d in instances.values()]
                    points["pc"].append(np.array(centroids, np.float64).reshape(-1, 2))
                    points["pt"].append(np.array([d.type or 0 for d in instances.values()], np.int64))
                    if pannuke_pred is not None:
                        pannuke_pred[i] = _pannuke_layout(inst, instances)
                if pannuke_pred is not None and isinstance(source, PanNukeFold):
                    pannuke_pred.flush()
                    tissues = [source.tissue(i) or "unknown" for i in range(len(source))]
                    pannuke_rows += M.pannuke_scores(source.masks, pannuke_pred, tissues)["per_image"]
                    del pannuke_pred
        result: dict[str, Any] = {"split": split, "model": str(model_path), "n_images": len(rows),
                                  "postproc": spec.predict.postproc.model_dump(), "tta": spec.predict.tta}
        summary = M.aggregate(stats)
        result["mean"] = {k: summary[k] for k in M.METRIC_KEYS}
        result["pooled"] = summary["pooled"]
        det = M.detection_f1(
            points["tc"],
            points["tt"] if typed else None,
            points["pc"],
            points["pt"] if typed else None,
            radius=12.0,
            type_ids=list(range(1, model.config.num_types)) if typed else None,
        )
        result["detection"] = det
        if pannuke_rows:
            result.update(_pannuke_summary(pannuke_rows))
        result["per_image"] = rows
        run.write_json("metrics.json", result)
        atomic_write(run_dir / "per_image.csv", _csv(rows))
    shutil.copyfile(run_dir / "metrics.json", Path(spec.run.output_dir) / ".metrics.json.tmp")
    (Path(spec.run.output_dir) / ".metrics.json.tmp").replace(Path(spec.run.output_dir) / "metrics.json")
    info(
        f"PQ {result['mean']['pq']:.4f}  AJI {result['mean']['aji']:.4f}  Dice {result['mean']['dice']:.4f}  "
        f"detection F1 {det['f1']:.4f}"
        + (f"  mPQ {result['mpq']:.4f}  bPQ {result['bpq']:.4f}" if pannuke_rows else "")
    )
    return result


def _pannuke_layout(inst: np.ndarray, instances: dict[int, Any]) -> np.ndarray:
    """Instance map + types -> PanNuke (H, W, 6): channel type-1 holds the instance ids; 5 is background."""
    out = np.zeros((*inst.shape, 6), np.int32)
    type_of = np.zeros(int(inst.max(initial=0)) + 1, np.int64)
    for idx, d in instances.items():
        type_of[idx] = d.type or 0
    pixel_type = type_of[inst]
    for c in range(5):
        hit = pixel_type == c + 1
        out[..., c][hit] = inst[hit]
    out[..., 5] = (inst == 0).astype(np.int32)
    return out


def _pannuke_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """mPQ/bPQ over all folds' images: per tissue means, then the mean over tissues (the official order)."""
    from pathssl_cli.segment.metrics_pannuke import PANNUKE_CLASSES

    per_tissue = {}
    for tissue in sorted({r["tissue"] for r in rows}):
        sel = [r for r in rows if r["tissue"] == tissue]
        per_tissue[tissue] = {
            "mpq": M._nanmean([r["mpq"] for r in sel]),
            "bpq": M._nanmean([r["bpq"] for r in sel]),
            "n_images": len(sel),
        }
    return {
        "mpq": M._nanmean([t["mpq"] for t in per_tissue.values()]),
        "bpq": M._nanmean([t["bpq"] for t in per_tissue.values()]),
        "per_tissue": per_tissue,
        "per_class": {c: M._nanmean([r[c] for r in rows]) for c in PANNUKE_CLASSES},
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["name", *M.METRIC_KEYS])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()
