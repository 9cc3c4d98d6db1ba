"""`pathssl segment score`: score instance maps from any tool against ground truth, as the field scores them.

Formats (`--format`, default ``auto``):
- ``generic``: a file or a folder of instance maps (`.npy`, `.png`, `.tif`, `.mat`); a folder is paired with
  the other folder by file name without extension (``a.npy`` scores against ``a.mat``). Prediction files with
  no truth are ignored (prediction folders also hold overlays and JSON); truth files with no prediction are
  errors.
- ``consep``: the same, reading CoNSeP `.mat` labels; a dataset root with `Labels/` may be given.
- ``pannuke``: a fold folder holding `masks.npy` (N, H, W, 6) (and `types.npy` for per-tissue results) or the
  `masks.npy` file itself, for truth and prediction alike.
``auto`` picks ``pannuke`` when the truth is or holds `masks.npy`, ``consep`` when it holds `Labels/` or
`.mat` files, else ``generic``. A `segment predict` output folder can be given as is: its `maps/` is read.

Output: ``per_image`` (each with ``name``), ``mean`` (per-image means, as HoVer-Net's compute_stats) with the
keys dice, dice2, aji, aji_plus, dq, sq, pq, and ``pooled`` (from counts summed over images). PanNuke adds
``mpq``, ``bpq``, ``per_tissue`` and ``per_class``. When both sides carry nucleus types, ``detection`` holds
HoVer-Net's centroid F1 and per-type F1. NaN (undefined, e.g. an image with no nucleus on either side) is
``null`` in JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.errors import Problem, SpecError
from pathssl_cli.segment import metrics as M
from pathssl_cli.segment.io import (
    MAP_SUFFIXES,
    as_integer_map,
    pannuke_instance_map,
    read_consep_label,
    read_instance_map,
    read_pannuke_masks,
    read_pannuke_types,
)

FORMATS: tuple[str, ...] = ("auto", "generic", "consep", "pannuke")


def detect_format(true: Path) -> str:
    if true.name == "masks.npy" or (true.is_dir() and (true / "masks.npy").is_file()):
        return "pannuke"
    if true.suffix.lower() == ".mat" or (
        true.is_dir() and ((true / "Labels").is_dir() or any(true.glob("*.mat")))
    ):
        return "consep"
    return "generic"


def _collect(path: Path, role: str, problems: list[Problem]) -> dict[str, Path]:
    """{name: file} of the instance maps at `path`: a file, or a folder's map files (hidden files skipped).

    A CoNSeP root is read from its `Labels/`, a `segment predict` output folder from its `maps/`.
    """
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        problems.append(Problem(str(path), f"--{role} does not exist"))
        return {}
    folder = next((path / sub for sub in ("Labels", "maps") if (path / sub).is_dir()), path)
    found: dict[str, Path] = {}
    for suffix in MAP_SUFFIXES:  # earlier suffixes win when one name has several files
        for file in sorted(folder.glob(f"*{suffix}")):
            if not file.name.startswith("."):
                found.setdefault(file.stem, file)
    if not found:
        problems.append(
            Problem(str(folder), f"no instance maps ({', '.join(MAP_SUFFIXES)}) in the --{role} folder")
        )
    return found


def _read(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    if fmt == "consep" and path.suffix.lower() == ".mat":
        label = read_consep_label(path)
        return label.inst_map, label.type_map
    return read_instance_map(path)


def _centroids_and_types(inst: np.ndarray, type_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (x, y) and majority type of each instance, from the maps alone."""
    inst = M.remap_label(inst)
    n = int(inst.max(initial=0))
    rows, cols = np.indices(inst.shape)
    area = np.maximum(np.bincount(inst.ravel(), minlength=n + 1), 1)
    cx = np.bincount(inst.ravel(), weights=cols.ravel(), minlength=n + 1) / area
    cy = np.bincount(inst.ravel(), weights=rows.ravel(), minlength=n + 1) / area
    n_types = int(type_map.max(initial=0)) + 1
    votes = np.bincount(
        inst.ravel().astype(np.int64) * n_types + type_map.ravel(), minlength=(n + 1) * n_types
    )
    votes = votes.reshape(n + 1, n_types)
    if n_types > 1:  # background votes only win where no other type was voted, as HoVer-Net's process()
        best = np.where(votes[:, 1:].max(axis=1) > 0, 1 + np.argmax(votes[:, 1:], axis=1), 0)
    else:
        best = np.zeros(n + 1, dtype=np.int64)
    return np.stack([cx, cy], axis=1)[1:], best[1:]


def _score_pairs(true: Path, pred: Path, fmt: str, match_iou: float) -> dict[str, Any]:
    problems: list[Problem] = []
    true_files, pred_files = _collect(true, "true", problems), _collect(pred, "pred", problems)
    if true.is_file() and pred.is_file():
        pairs = [(true.stem, true, pred)]
    else:
        pairs = [
            (name, file, pred_files[name]) for name, file in sorted(true_files.items()) if name in pred_files
        ]
        problems += [
            Problem(str(file), f"no prediction named {name}.* in {pred}")
            for name, file in sorted(true_files.items())
            if name not in pred_files
        ]
    loaded = []
    for name, true_file, pred_file in pairs:
        try:
            t, tt = _read(true_file, fmt)
            p, pt = _read(pred_file, fmt)
        except SpecError as exc:
            problems += exc.problems
            continue
        if t.shape != p.shape:
            problems.append(
                Problem(str(pred_file), f"shape {p.shape} differs from the truth {true_file} {t.shape}")
            )
            continue
        loaded.append((name, t, tt, p, pt))
    if problems:
        raise SpecError(problems)

    per_image, stats_list = [], []
    with_types = all(tt is not None and pt is not None and tt.any() for _, _, tt, _, pt in loaded)
    detection_inputs: list[list[np.ndarray]] = [[], [], [], []]
    for name, t, tt, p, pt in loaded:
        stats = M.instance_stats(t, p, match_iou)
        stats_list.append(stats)
        per_image.append({"name": name, **{k: stats[k] for k in _ROW_KEYS}})
        if with_types and tt is not None and pt is not None:
            for target, values in zip(
                detection_inputs, (*_centroids_and_types(t, tt), *_centroids_and_types(p, pt)), strict=True
            ):
                target.append(values)
    result = _summary(per_image, stats_list)
    if with_types and loaded:
        tc, tt_, pc, pt_ = detection_inputs
        result["detection"] = M.detection_f1(tc, tt_, pc, pt_, radius=12.0)
    return result


_ROW_KEYS = (*M.METRIC_KEYS, "n_true", "n_pred", "tp", "fp", "fn")


def _summary(per_image: list[dict[str, Any]], stats: list[dict[str, Any]]) -> dict[str, Any]:
    agg = M.aggregate(stats)
    return {
        "per_image": per_image,
        "mean": {k: agg[k] for k in M.METRIC_KEYS},
        "pooled": agg["pooled"],
        "n_images": agg["n_images"],
        "n_undefined": agg["n_undefined"],
    }


def _pannuke_paths(path: Path, role: str) -> tuple[Path, Path | None]:
    masks = path if path.suffix == ".npy" else path / "masks.npy"
    if not masks.is_file():
        raise SpecError(f"no PanNuke masks.npy for --{role}", where=str(path))
    types = masks.parent / "types.npy"
    return masks, types if types.is_file() else None


def _score_pannuke(true: Path, pred: Path, match_iou: float) -> dict[str, Any]:
    true_masks_path, types_path = _pannuke_paths(true, "true")
    pred_masks_path, _ = _pannuke_paths(pred, "pred")
    true_masks, pred_masks = read_pannuke_masks(true_masks_path), read_pannuke_masks(pred_masks_path)
    if true_masks.shape[:3] != pred_masks.shape[:3]:
        raise SpecError(
            f"shape {pred_masks.shape} differs from the truth {true_masks.shape}", where=str(pred_masks_path)
        )
    n = true_masks.shape[0]
    tissues = read_pannuke_types(types_path, n) if types_path else ["all"] * n
    if n:  # cheap up-front check of the value type on the first image; later images are checked as read
        as_integer_map(true_masks[0, :, :, 0], str(true_masks_path))
        as_integer_map(pred_masks[0, :, :, 0], str(pred_masks_path))

    per_image, stats = [], []
    for i in range(n):
        t, _ = pannuke_instance_map(np.asarray(true_masks[i]), f"{true_masks_path}: image {i}")
        p, _ = pannuke_instance_map(np.asarray(pred_masks[i]), f"{pred_masks_path}: image {i}")
        s = M.instance_stats(t, p, match_iou)
        stats.append(s)
        per_image.append({"name": f"{i:05d}", "tissue": tissues[i], **{k: s[k] for k in _ROW_KEYS}})
    pannuke = M.pannuke_scores(true_masks, pred_masks, tissues, match_iou)
    for row, pan in zip(per_image, pannuke["per_image"], strict=True):
        row["mpq"], row["bpq"] = pan["mpq"], pan["bpq"]
    result = _summary(per_image, stats)
    result.update(
        mpq=pannuke["mpq"],
        bpq=pannuke["bpq"],
        per_tissue=pannuke["per_tissue"],
        per_class=pannuke["per_class"],
    )
    return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "   nan" if math.isnan(value) else f"{value:6.4f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    keys = list(M.METRIC_KEYS) + (["mpq", "bpq"] if "mpq" in result else [])
    rows = [[r["name"], *[_fmt(r[k]) for k in keys]] for r in result["per_image"]]
    rows.append(
        ["mean", *[_fmt(result["mean"][k]) if k in result["mean"] else _fmt(result[k]) for k in keys]]
    )
    width = max([len(r[0]) for r in rows] + [4])
    lines = ["  ".join([f"{'name':<{width}}", *[f"{k:>8}" for k in keys]])]
    lines += ["  ".join([f"{r[0]:<{width}}", *[f"{v:>8}" for v in r[1:]]]) for r in rows]
    if "per_tissue" in result:
        lines.append("")
        lines += [
            f"{t:<20} mPQ {_fmt(v['mpq'])}  bPQ {_fmt(v['bpq'])}  ({v['n_images']} images)"
            for t, v in result["per_tissue"].items()
        ]
    if "detection" in result:
        det = result["detection"]
        types = "  ".join(f"type {t}: {_fmt(v)}" for t, v in det.get("per_type", {}).items())
        lines.append(
            f"\ndetection F1 {_fmt(det['f1'])}  type accuracy {_fmt(det.get('accuracy', float('nan')))}"
            f"  {types}"
        )
    return "\n".join(lines)


def per_image_csv(result: dict[str, Any]) -> str:
    columns = list(result["per_image"][0]) if result["per_image"] else ["name", *_ROW_KEYS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result["per_image"])
    return buffer.getvalue()


def run_score(
    true: Path,
    pred: Path,
    fmt: str = "auto",
    as_json: bool = False,
    out_csv: Path | None = None,
    match_iou: float = 0.5,
) -> dict[str, Any]:
    """Score predicted instance maps against the truth; print a table (or JSON) and return the result dict."""
    true, pred = Path(true), Path(pred)
    if fmt not in FORMATS:
        raise SpecError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", where="--format")
    if not 0.0 <= match_iou < 1.0:
        raise SpecError(f"match IoU must be in [0, 1), got {match_iou}", where="--match-iou")
    for path, role in ((true, "true"), (pred, "pred")):
        if not path.exists():
            raise SpecError(f"--{role} does not exist", where=str(path))
    fmt = detect_format(true) if fmt == "auto" else fmt
    result = (
        _score_pannuke(true, pred, match_iou)
        if fmt == "pannuke"
        else _score_pairs(true, pred, fmt, match_iou)
    )
    result = {"format": fmt, "match_iou": match_iou, **result}
    if out_csv is not None:
        from pathssl_cli.fileio import atomic_write

        atomic_write(out_csv, per_image_csv(result))
    print(json.dumps(_json_safe(result), indent=2) if as_json else format_table(result))
    return result
