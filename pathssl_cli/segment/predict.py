"""`pathssl segment predict`: HoVer-Net on image files and whole-slide regions with bounded memory.

The network runs on HoVer-Net's tile grid (`pathssl_cli.segment.inference`). Post-processing runs per *chunk*:
a block of `chunk_size` output pixels plus a `chunk_margin` of context on each side (both multiples of the
tile step, so the chunk's network outputs equal those of a whole-image pass). An instance belongs to the chunk
whose core holds its centroid, so each nucleus is written once, whole, even across chunk borders; where two
owners' pixels meet, the first written keeps them, and an instance left with under half its pixels (the same
nucleus seen from the other side) is dropped. Memory is bounded by the chunk size: the instance map is a
memory-mapped .npy reopened per chunk, and the JSON/GeoJSON are streamed.
"""

from __future__ import annotations

import glob
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np
import torch

from pathssl_cli.console import info, progress
from pathssl_cli.distributed import resolve_device
from pathssl_cli.errors import PathsslError, SpecError, WorkFailed
from pathssl_cli.fileio import atomic_path
from pathssl_cli.runs import open_run
from pathssl_cli.segment.inference import PatchModel, default_trim, predict_window, tile_step
from pathssl_cli.segment.predict_names import check_sources, claim_name, unique_inputs
from pathssl_cli.segment.readers import ImageReader, SlideReader, open_reader
from pathssl_cli.segment.slide_scale import ChunkTissue, MppSlideReader, slide_metrics
from pathssl_cli.sharding import resolve_shard
from pathssl_cli.slides.readers import slide_readers
from pathssl_cli.specs.segment import SegmentSpec, TTAChoice

# QuPath-friendly colours by type id (0 = untyped); PanNuke order after background.
TYPE_COLOURS = [
    (255, 255, 0),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
]


@dataclass(frozen=True)
class Chunk:
    top: int  # core, in output/region px
    left: int
    bottom: int
    right: int
    win_top: int  # core plus margin, clipped to the image
    win_left: int
    win_bottom: int
    win_right: int


def plan_chunks(height: int, width: int, chunk_size: int, margin: int, out_size: int) -> list[Chunk]:
    """Chunks in raster order; sizes and margins rounded up to multiples of `out_size` (the tile grid)."""
    size = math.ceil(chunk_size / out_size) * out_size
    margin = math.ceil(margin / out_size) * out_size
    chunks = []
    for top in range(0, height, size):
        for left in range(0, width, size):
            bottom, right = min(top + size, height), min(left + size, width)
            chunks.append(Chunk(top, left, bottom, right, max(top - margin, 0), max(left - margin, 0),
                                min(bottom + margin, height), min(right + margin, width)))
    return chunks


@dataclass
class PredictOutputs:
    inst_map: Path
    instances: Path
    geojson: Path
    overlay: Path | None
    count: int
    chunks: int = 0
    skipped: int = 0  # chunks without tissue, not predicted


def output_paths(out_dir: Path, name: str, map_format: str) -> tuple[Path, Path, Path, Path]:
    """(instance map, instance JSON, GeoJSON, overlay PNG) paths of one input, each kind in its own folder so
    `segment score --pred <out_dir>/maps` sees instance maps only."""
    return (
        out_dir / "maps" / f"{name}.{map_format}",
        out_dir / "instances" / f"{name}.json",
        out_dir / "geojson" / f"{name}.geojson",
        out_dir / "overlays" / f"{name}.png",
    )


class _JsonListWriter:
    """Stream a JSON list (or GeoJSON FeatureCollection) item by item, so no instance list lives in memory."""

    def __init__(self, fh: TextIO, head: str, tail: str) -> None:
        self.fh, self.tail, self.first = fh, tail, True
        fh.write(head)

    def add(self, obj: Any) -> None:
        self.fh.write(("" if self.first else ",\n") + json.dumps(obj))
        self.first = False

    def close(self) -> None:
        self.fh.write(self.tail)


def segment_image(model: PatchModel, reader: ImageReader | SlideReader | MppSlideReader, out_dir: Path, name: str, *,
                  chunk_size: int = 2048, chunk_margin: int = 64, batch_size: int = 8,
                  device: torch.device | str = "cpu", precision: str = "fp32", map_format: str = "npy",
                  overlay: bool = True, overlay_max_px: int = 8192, type_names: list[str] | None = None,
                  postprocess: Callable[..., tuple[np.ndarray, dict[int, Any]]] | None = None,
                  postprocess_kwargs: dict[str, Any] | None = None, trim: int = 0, tta: TTAChoice = "none",
                  to_level0: tuple[float, float, float] = (1.0, 0.0, 0.0),
                  has_tissue: Callable[[int, int, int, int], bool] | None = None) -> PredictOutputs:
    """Segment the nuclei of one image/region into `out_dir`: maps/<name>.{npy|tif} (int32 instance ids),
    instances/<name>.json (id, bbox, centroid x/y, contour, type, type_prob per nucleus),
    geojson/<name>.geojson (QuPath detections) and overlays/<name>.png (contours coloured by type).

    `postprocess(np_prob, hv, type_prob, **postprocess_kwargs) -> (inst_map, {id: Instance})` defaults to
    HoVer-Net's watershed. Its per-window min-max normalisations make results depend slightly on the window,
    as in HoVer-Net's own tiled WSI inference; larger chunks mean fewer such seams.

    `to_level0` = (scale, x0, y0) maps prediction px to the JSON/GeoJSON coordinates (slide level 0);
    `has_tissue(top, left, bottom, right)` says whether a chunk core holds tissue: chunks without are skipped.
    """
    from pathssl_cli.segment.postproc import hovernet_postprocess

    postprocess = postprocess or hovernet_postprocess

    height, width = reader.height, reader.width
    chunks = plan_chunks(height, width, chunk_size, chunk_margin, tile_step(model, trim))
    scale = min(1.0, overlay_max_px / max(height, width))
    canvas = np.zeros((max(1, round(height * scale)), max(1, round(width * scale)), 3), np.uint8) if overlay \
        else None
    map_path, json_path, geojson_path, overlay_path = output_paths(out_dir, name, map_format)
    paths = PredictOutputs(map_path, json_path, geojson_path, overlay_path if overlay else None, 0, len(chunks))
    next_id = 1
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    # The .npy is the map itself, or (for .tif) a hidden scratch file converted tile by tile at the end.
    scratch = out_dir / "maps" / f".{name}.scratch.npy"
    with ExitStack() as stack:
        npy_tmp = stack.enter_context(atomic_path(paths.inst_map)) if map_format == "npy" else scratch
        np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=np.int32, shape=(height, width)).flush()
        json_fh = stack.enter_context(stack.enter_context(atomic_path(paths.instances)).open("w"))
        geo_fh = stack.enter_context(stack.enter_context(atomic_path(paths.geojson)).open("w"))
        records = _JsonListWriter(json_fh, "[\n", "\n]\n")
        features = _JsonListWriter(geo_fh, '{"type": "FeatureCollection", "features": [\n', "\n]}\n")
        try:
            with progress(total=len(chunks), desc=name, unit="chunk") as bar:
                for chunk in chunks:
                    if has_tissue is not None and not has_tissue(chunk.top, chunk.left, chunk.bottom, chunk.right):
                        paths.skipped += 1  # glass: nothing read, nothing predicted; white in the overlay
                        if canvas is not None:
                            canvas[round(chunk.top * scale):round(chunk.bottom * scale),
                                   round(chunk.left * scale):round(chunk.right * scale)] = 255
                        bar.update(1)
                        continue
                    next_id = _segment_chunk(
                        model, reader, chunk, npy_tmp, next_id, records, features, canvas, scale, type_names,
                        postprocess, postprocess_kwargs or {}, to_level0, batch_size=batch_size, device=device,
                        precision=precision, trim=trim, tta=tta)
                    bar.update(1)
            records.close()
            features.close()
            if map_format == "tif":
                with atomic_path(paths.inst_map) as tif_tmp:
                    _npy_to_tiled_tif(scratch, tif_tmp)
        finally:
            scratch.unlink(missing_ok=True)
    if canvas is not None and paths.overlay is not None:
        _ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        with atomic_path(paths.overlay) as tmp:
            tmp.write_bytes(png.tobytes())
    paths.count = next_id - 1
    return paths


def _segment_chunk(model: PatchModel, reader: ImageReader | SlideReader | MppSlideReader, c: Chunk, npy_path: Path,
                   next_id: int, records: _JsonListWriter, features: _JsonListWriter,
                   canvas: np.ndarray | None, scale: float, type_names: list[str] | None, postprocess: Any,
                   pp_kwargs: dict[str, Any], to_level0: tuple[float, float, float], **infer: Any) -> int:
    """Predict and post-process one chunk's window, keep the instances whose centroid lies in its core,
    give them global ids and append them to every output. Returns the next free id."""
    np_prob, hv, tp = predict_window(model, reader, c.win_top, c.win_left, c.win_bottom - c.win_top,
                                     c.win_right - c.win_left, **infer)
    local, instances = postprocess(np_prob, hv, tp, **pp_kwargs)
    owned = [inst for inst in instances.values()
             if c.top <= inst.centroid[1] + c.win_top < c.bottom
             and c.left <= inst.centroid[0] + c.win_left < c.right]
    # Reopened per chunk so only this window's pages are ever resident: RSS bounded by the chunk.
    inst_map = np.load(npy_path, mmap_mode="r+")
    window = inst_map[c.win_top : c.win_bottom, c.win_left : c.win_right]
    n_local = int(local.max(initial=0))
    is_owned = np.zeros(n_local + 1, bool)
    is_owned[[inst.id for inst in owned]] = True
    writable = is_owned[local] & (window == 0)
    # Pixels already written by an earlier chunk's instance stay with it. An owned instance that would get
    # less than half of its pixels is that same nucleus segmented again (its centroid moved across the core
    # border between the two windows): it is dropped, so no nucleus is listed twice.
    free_px = np.bincount(local[writable], minlength=n_local + 1)
    all_px = np.bincount(local.ravel(), minlength=n_local + 1)
    owned = [inst for inst in owned if 2 * free_px[inst.id] >= all_px[inst.id]]
    lookup = np.zeros(n_local + 1, np.int32)
    for inst in owned:
        lookup[inst.id] = next_id
        inst_id = next_id
        r0, c0, r1, c1 = inst.bbox
        contour = inst.contour + np.array([c.win_left, c.win_top])
        cx, cy = inst.centroid[0] + c.win_left, inst.centroid[1] + c.win_top
        bbox = [r0 + c.win_top, c0 + c.win_left, r1 + c.win_top, c1 + c.win_left]
        k, x0, y0 = to_level0
        if (k, x0, y0) != (1.0, 0.0, 0.0):  # slide level-0 coordinates (GeoJSON opens on the original slide)
            contour = contour * k + np.array([x0, y0])
            cx, cy = cx * k + x0, cy * k + y0
            bbox = [bbox[0] * k + y0, bbox[1] * k + x0, bbox[2] * k + y0, bbox[3] * k + x0]
        type_name = None if inst.type is None else (
            type_names[inst.type] if type_names and inst.type < len(type_names) else str(inst.type))
        records.add({"id": inst_id, "bbox": bbox, "centroid": [cx, cy],
                     "contour": contour.tolist(), "type": inst.type, "type_name": type_name,
                     "type_prob": inst.type_prob})
        ring = contour.tolist() + contour[:1].tolist()
        colour = TYPE_COLOURS[(inst.type or 0) % len(TYPE_COLOURS)]
        properties: dict[str, Any] = {"objectType": "detection", "id": inst_id}
        if type_name is not None:
            properties["classification"] = {"name": type_name, "color": list(colour)}
        if len(ring) >= 4:
            features.add({"type": "Feature", "id": str(inst_id), "properties": properties,
                          "geometry": {"type": "Polygon", "coordinates": [ring]}})
        if canvas is not None:
            local_contour = inst.contour + np.array([c.win_left, c.win_top])
            pts = np.round(local_contour * scale).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [pts], True, colour, 1)
        next_id += 1
    new = lookup[local]
    writable &= new > 0
    window[writable] = new[writable]
    inst_map.flush()
    del window, inst_map
    if canvas is not None:
        _paint_background(canvas, reader, c, scale)
    return next_id


def _paint_background(canvas: np.ndarray, reader: ImageReader | SlideReader | MppSlideReader, c: Chunk,
                      scale: float) -> None:
    """Put the chunk's downscaled RGB under pixels no contour has coloured yet (contours stay on top)."""
    t, l_ = round(c.top * scale), round(c.left * scale)
    b, r = max(t + 1, round(c.bottom * scale)), max(l_ + 1, round(c.right * scale))
    b, r = min(b, canvas.shape[0]), min(r, canvas.shape[1])
    if b <= t or r <= l_:
        return
    rgb = reader.read(c.top, c.left, c.bottom - c.top, c.right - c.left)
    small = cv2.resize(rgb, (r - l_, b - t), interpolation=cv2.INTER_AREA)
    target = canvas[t:b, l_:r]
    empty = ~target.any(axis=-1)
    target[empty] = small[empty]


def _npy_to_tiled_tif(npy_path: Path, tif_path: Path, tile: int = 256) -> None:
    import tifffile

    shape = np.load(npy_path, mmap_mode="r").shape

    def tiles() -> Iterator[np.ndarray]:
        for top in range(0, shape[0], tile):
            band = np.load(npy_path, mmap_mode="r")
            for left in range(0, shape[1], tile):
                block = np.zeros((tile, tile), np.int32)
                part = band[top : top + tile, left : left + tile]
                block[: part.shape[0], : part.shape[1]] = part
                yield block
            del band

    tifffile.imwrite(tif_path, tiles(), shape=shape, dtype=np.int32, tile=(tile, tile), compression="zlib")


# ------------------------------------------------------------------------------------------------- command
def expand_inputs(patterns: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        # A folder named outright is a DICOM-WSI series; folders a glob matches are not inputs.
        found += [Path(m) for m in matches if Path(m).is_file() or (m == pattern and Path(m).is_dir())]
    return found


def run_segment_predict(spec: SegmentSpec, *, num_shards: int | None = None, shard_index: int | None = None,
                        split_array: bool = False) -> dict[str, Any]:
    """Segment every `predict.inputs` file (this process's part of them, see `pathssl_cli.sharding`; torchrun
    ranks take disjoint parts, each on its own GPU); returns {"outputs": [...], "instances": total}."""
    from pathssl_cli.segment.train import default_model_path, load_model

    p = spec.predict
    inputs = expand_inputs(p.inputs)
    if not inputs:
        raise SpecError(f"predict.inputs {p.inputs} matches no file; give image or slide paths or globs")
    part = resolve_shard(num_shards, shard_index, array=split_array)
    inputs = part.take(unique_inputs(inputs))  # the whole list is checked, alike in every array task
    out_dir = Path(spec.run.output_dir) / "predictions"
    check_sources(out_dir, [(path, path.stem) for path in inputs])
    model_path = default_model_path(spec)
    if not model_path.exists():
        raise SpecError(f"no trained model at {model_path}: run `pathssl segment train` first or set "
                        "model.checkpoint")
    device = resolve_device(spec.run.device)
    precision = spec.run.precision if device.type == "cuda" else "fp32"
    model = load_model(model_path, device, channels_last=spec.run.channels_last)
    type_names = _type_names(spec, model.config.num_types)
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    used_readers: list[str] = []
    with open_run(spec, Path(spec.run.output_dir) / f"predict_run{part.suffix}", command="segment predict",
                  seed=spec.run.seed) as run:
        run.record["shard"] = part.record()
        if part.count > 1 or "array_ignored" in part.origin:
            info(f"part {part.index + 1} of {part.count} ({part.source}): {len(inputs)} input(s)"
                 if part.count > 1 else part.origin["array_ignored"])
        for path in inputs:
            done = output_paths(out_dir, path.stem, p.map_format)
            if all(f.exists() for f in done[:3]):
                info(f"{path}: outputs exist, skipped (delete them to predict again)")
                continue
            opened: ImageReader | SlideReader | None = None
            claim_name(out_dir, path.stem, path)
            try:
                reader: ImageReader | SlideReader | MppSlideReader
                opened = reader = open_reader(path, p.region, p.reader)
                slide_kwargs: dict[str, Any] = {}
                figures: dict[str, Any] = {}
                if isinstance(reader, SlideReader):
                    used_readers.append(reader.reader)
                    reader = MppSlideReader(reader.slide, path, p.region, p.mpp or spec.data.mpp, p.mpp_override)
                    slide_kwargs["to_level0"] = reader.to_level0
                    figures = asdict(reader.geometry)
                    if p.tissue_only:
                        tissue = ChunkTissue(reader)
                        slide_kwargs["has_tissue"] = tissue.has_tissue
                        figures["tissue_mm2"] = tissue.area_mm2()
                started = time.perf_counter()
                outputs = segment_image(model, reader, out_dir, path.stem, chunk_size=p.chunk_size,
                                        chunk_margin=p.chunk_margin, batch_size=p.batch_size, device=device,
                                        precision=precision, map_format=p.map_format, overlay=p.overlay,
                                        overlay_max_px=p.overlay_max_px, type_names=type_names,
                                        trim=default_trim(model) if p.trim is None else p.trim, tta=p.tta,
                                        postprocess_kwargs=p.postproc.model_dump(), **slide_kwargs)
                seconds = time.perf_counter() - started
            except (PathsslError, OSError, ValueError) as exc:  # one bad input must not stop the others
                failed.append(f"{path}: {exc}")
                continue
            finally:  # one job predicts many slides: file handles must not wait for the GC
                if opened is not None:
                    opened.close()
            figures.update(nuclei=outputs.count, seconds=seconds, chunks=outputs.chunks,
                           chunks_skipped=outputs.skipped)
            if figures.get("tissue_mm2"):
                figures["nuclei_per_mm2"] = outputs.count / figures["tissue_mm2"]
                figures["seconds_per_mm2"] = seconds / figures["tissue_mm2"]
            results.append({"input": str(path), "instances": outputs.count, "inst_map": str(outputs.inst_map),
                            "json": str(outputs.instances), "geojson": str(outputs.geojson),
                            "overlay": str(outputs.overlay) if outputs.overlay else None, **figures})
            info(f"{path}: {outputs.count} nuclei -> {outputs.inst_map}")
        run.record["slide_readers"] = slide_readers(p.reader, used_readers)
        summary = {"outputs": results, "instances": sum(r["instances"] for r in results), "failed": failed}
        run.write_json("predict_summary.json", summary)
        run.write_json("metrics.json", slide_metrics(results))
        if failed:  # inside the run, so run.json records the failure
            raise WorkFailed(f"{len(failed)} of {len(inputs)} inputs failed:\n" + "\n".join(failed))
    return summary


def _type_names(spec: SegmentSpec, num_classes: int) -> list[str] | None:
    from pathssl_cli.segment.datasets import CONSEP_TYPES_4, PANNUKE_TYPES

    if num_classes == 0:
        return None
    names = {"pannuke": PANNUKE_TYPES, "consep": CONSEP_TYPES_4}.get(spec.data.format)
    if names is not None and len(names) == num_classes - 1:
        return ["background", *names]
    return ["background", *(f"type_{i}" for i in range(1, num_classes))]
