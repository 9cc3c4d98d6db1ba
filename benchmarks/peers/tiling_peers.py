"""Tiling end to end against the tools people use: `pathssl tile` (tissue mask, grid, JPEG tiles written to its
store with the Parquet index) vs TIAToolbox (`SlidingWindowPatchExtractor` with its Otsu tissue mask, every patch
read out), LazySlide (`find_tissues` + `tile_tissues`, every tile image read out) and histolab (`GridTiler` over
its `TissueMask`, tiles saved as it does), on the same slides, µm/px, tile size and tissue threshold, interleaved.

    python benchmarks/peers/tiling_peers.py [--slides A.svs B.tif] [--mpp 0.5] [--tile 224] [--min-tissue 0.5] \
        [--repeats 5] [--parallel 2] [--tiatoolbox-python VENV/bin/python] [--histolab-python VENV/bin/python]

Each tool is asked for what a user would write: 0.5 µm/px (TIAToolbox `resolution=0.5, units="mpp"`, LazySlide
`mpp=0.5`; histolab has no µm/px option and tiles a pyramid level, here level 0 at 0.499 µm/px), 224 px tiles
on a grid with no overlap, a tile kept when at least half of it is tissue by the tool's own mask (pathssl
`min_tissue`, TIAToolbox `min_mask_ratio`, LazySlide `background_fraction = 1 - 0.5`, histolab
`tissue_percent`). Peers are timed delivering tiles as pixels in memory (TIAToolbox, LazySlide) or writing them
the way they do (histolab: RGBA PNG files via PIL, its default); pathssl is timed writing JPEG shards and its
index (and QC thumbnails, its default), so it does more.

Tile counts differ by each tool's tissue rule, so every tool's tiles are scored against one reference: tissue =
pixels with an optical density of at least 0.15 in some channel (OD = -log10(I / 255), I the 8-bit level-0
pixel). 0.15 is the transparency threshold of Macenko et al. 2009 (glass scans at OD ~0.02-0.05; the palest
eosin at ~0.2 in green). The rule is per pixel, with no smoothing, so it can be checked by eye: `--reference-png`
writes the thumbnail with the reference outlined. Recall = reference pixels covered by the tool's tiles; purity =
share of the tiles' pixels that are reference tissue.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from harness import one_thread

if __name__ == "__main__":
    one_thread()

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED_WSI = ROOT.parent / "shared" / "data" / "wsi"
REFERENCE_OD = 0.15


def _fresh(out_root: str) -> Path:
    folder = Path(out_root) / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    return folder


# ------------------------------------------------------------------------------------------------------------
# Contenders: (slides, mpp, size, min_tissue, workers, out_root) -> {slide: [[x0, y0, extent0], ...]} (level 0)
# ------------------------------------------------------------------------------------------------------------
def pathssl_tile(slides: list[str], mpp: float, size: int, min_tissue: float, workers: int, out_root: str
                 ) -> dict[str, Any]:
    """`pathssl tile` with its defaults (QC thumbnails, JPEG quality 90), from a spec file, as `run_tile`.

    Returns the store; `pathssl_boxes` reads the tiles back from its index, outside the timed call."""
    from pathssl_cli.specs import load_spec
    from pathssl_cli.tiling.tiler import run_tile

    folder = _fresh(out_root)
    spec = folder / "spec.toml"
    listed = ", ".join(f'"{s}"' for s in slides)
    spec.write_text(
        f'kind = "tile"\n[input]\nslides = [{listed}]\n[tiles]\nmpp = [{mpp}]\nsize = {size}\n'
        f'min_tissue = {min_tissue}\n[output]\ndir = "{folder / "store"}"\n[run]\nworkers = {workers}\n'
    )
    summary = run_tile(load_spec(spec))
    return {"store": str(folder / "store"), "tiles": summary["tiles_written"]}


def pathssl_boxes(store: str, mpp: float, size: int) -> dict[str, Any]:
    """{slide: [[x0, y0, extent0], ...]} from a store's index."""
    import pyarrow.parquet as pq
    import tiffslide

    from pathssl_cli.tiling.slide import choose_level

    part = pq.read_table(Path(store) / "parts").to_pydict()
    tiles: dict[str, Any] = {}
    for row in pq.read_table(Path(store) / "slides").to_pylist():
        with tiffslide.TiffSlide(row["slide"]) as slide:
            choice = choose_level(row["base_mpp"], tuple(slide.level_downsamples), mpp, size)
        extent = round(choice.read_size * choice.downsample)
        tiles[row["slide"]] = [[x, y, extent] for s, x, y in zip(part["slide"], part["x"], part["y"], strict=True)
                               if s == row["slide"]]
    return tiles


def tiatoolbox_tile(slides: list[str], mpp: float, size: int, min_tissue: float, workers: int, out_root: str
                    ) -> dict[str, Any] | None:
    """TIAToolbox 2.x: `SlidingWindowPatchExtractor(input_mask="otsu")` (its tissue mask at 1.25x), every patch
    read. No parallel option for patch extraction (its engines parallelise model inference, not this)."""
    if workers > 1:
        return None
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor

    tiles: dict[str, Any] = {}
    for path in slides:
        extractor = SlidingWindowPatchExtractor(
            path, patch_size=(size, size), input_mask="otsu", resolution=mpp, units="mpp",
            min_mask_ratio=min_tissue, within_bound=True,
        )
        for patch in extractor:
            assert patch.shape == (size, size, 3)
        scale = mpp / float(extractor.wsi.info.mpp[0])  # locations are in the 0.5 µm/px space
        tiles[path] = [[round(x * scale), round(y * scale), round(size * scale)]
                       for x, y in zip(extractor.locations_df["x"], extractor.locations_df["y"], strict=True)]
    return tiles


def _lazyslide_read(wsi: Any, workers: int) -> int:
    if workers <= 1:
        return sum(1 for tile in wsi.iter.tile_images("tiles") if tile.image is not None)
    from torch.utils.data import DataLoader

    dataset = wsi.ds.tile_images("tiles")
    loader = DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=lambda batch: len(batch))
    return sum(loader)


def lazyslide_tile(slides: list[str], mpp: float, size: int, min_tissue: float, workers: int, out_root: str
                   ) -> dict[str, Any]:
    """LazySlide: `find_tissues` (defaults) + `tile_tissues(mpp=..., background_fraction=1 - min_tissue)`, then
    every tile image read (`wsi.iter.tile_images`; with workers, its torch dataset in a DataLoader)."""
    import lazyslide as zs
    from wsidata import open_wsi

    tiles: dict[str, Any] = {}
    for path in slides:
        wsi = open_wsi(path, store=None)
        zs.pp.find_tissues(wsi)
        zs.pp.tile_tissues(wsi, size, mpp=mpp, background_fraction=1 - min_tissue)
        read = _lazyslide_read(wsi, workers)
        boxes = wsi.shapes["tiles"].geometry.bounds.to_numpy()
        assert read == len(boxes)
        tiles[path] = [[round(b[0]), round(b[1]), round(b[2] - b[0])] for b in boxes.tolist()]
    return tiles


def histolab_tile(slides: list[str], mpp: float, size: int, min_tissue: float, workers: int, out_root: str
                  ) -> dict[str, Any] | None:
    """histolab: `GridTiler(check_tissue=True, tissue_percent=...)` over `TissueMask()` (all tissue, not its
    default biggest-tissue box), tiles saved as its default PNG (its tiles are RGBA, which
    PIL cannot write as JPEG). Level 0 (it tiles levels, not µm/px). No parallel option."""
    if workers > 1:
        return None
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    tiles: dict[str, Any] = {}
    for path in slides:
        folder = _fresh(out_root)
        slide = Slide(path, processed_path=str(folder))
        tiler = GridTiler(tile_size=(size, size), level=0, check_tissue=True, tissue_percent=100 * min_tissue,
                          pixel_overlap=0, prefix="", suffix=".png")
        tiler.extract(slide, extraction_mask=TissueMask())
        found = []
        for name in (p.name for p in folder.rglob("*.png")):
            x0, y0, x1, _y1 = map(int, re.findall(r"(\d+)-(\d+)-(\d+)-(\d+)", name)[0])
            found.append([x0, y0, x1 - x0])
        tiles[path] = sorted(found, key=lambda t: (t[1], t[0]))
    return tiles


# ------------------------------------------------------------------------------------------------------------
# The reference tissue and the scores (pathssl side)
# ------------------------------------------------------------------------------------------------------------
def reference_tissue(path: str) -> np.ndarray:
    """Boolean level-0 mask: some channel's optical density >= 0.15 (see the module docstring)."""
    import tiffslide

    with tiffslide.TiffSlide(path) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    # OD >= 0.15  <=>  I <= 255 * 10**-0.15 (= 180.5): the darkest channel decides.
    return rgb.min(axis=2) <= 255 * 10 ** (-REFERENCE_OD)


def score(reference: np.ndarray, boxes: list[list[int]]) -> dict[str, float]:
    covered = np.zeros(reference.shape, dtype=bool)
    area = 0
    tissue_in_tiles = 0
    for x, y, extent in boxes:
        window = np.s_[max(y, 0) : y + extent, max(x, 0) : x + extent]
        covered[window] = True
        area += extent * extent
        tissue_in_tiles += int(reference[window].sum())
    total = int(reference.sum())
    return {
        "recall": float((covered & reference).sum() / max(total, 1)),
        "purity": float(tissue_in_tiles / max(area, 1)),
    }


def write_reference_png(path: str, reference: np.ndarray, target: Path, boxes: list[list[int]] | None = None
                        ) -> None:
    """Thumbnail (1/4) beside the same with the reference tissue tinted blue and, if given, tiles outlined in
    green: for checking the reference by eye."""
    import cv2
    import tiffslide

    with tiffslide.TiffSlide(path) as slide:
        thumb = np.asarray(slide.get_thumbnail((slide.dimensions[0] // 4, slide.dimensions[1] // 4)).convert("RGB"))
    size = (thumb.shape[1], thumb.shape[0])
    share = cv2.resize(reference.astype(np.float32), size, interpolation=cv2.INTER_AREA)[..., None]
    tinted = (thumb * (1 - 0.6 * share) + np.array([0, 0, 255]) * 0.6 * share).astype(np.uint8)
    for x, y, extent in boxes or []:
        cv2.rectangle(tinted, (x // 4, y // 4), ((x + extent) // 4 - 1, (y + extent) // 4 - 1), (0, 160, 0), 1)
    cv2.imwrite(str(target), np.concatenate([thumb, tinted], axis=1)[..., ::-1])


def main() -> None:
    from harness import (
        Contender,
        find_peer,
        interleave,
        load_average,
        machine_report,
        paired_ratio,
        print_table,
        settle_threads,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", nargs="+", default=None, help="default: the two slides in ../shared/data/wsi")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2, help="workers for each tool's parallel setting; 0: skip")
    parser.add_argument(
        "--tiatoolbox-python", default=os.environ.get("PATHSSL_TIATOOLBOX_PYTHON"),
        help="python of a venv with tiatoolbox (its torch pin clashes)"
    )
    parser.add_argument(
        "--histolab-python", default=os.environ.get("PATHSSL_HISTOLAB_PYTHON"),
        help="python of a venv with histolab (its numpy/scipy pins clash)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reference-png", type=Path, default=None, help="write the reference overlay here")
    args = parser.parse_args()
    settle_threads()
    slides = args.slides or [str(p) for p in sorted(SHARED_WSI.glob("CMU-1-Small-Region*"))]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pathssl_peers_tiling_"))
    workdir.mkdir(parents=True, exist_ok=True)

    contenders = [Contender("pathssl", "tiling_peers", "pathssl_tile")]
    peers = [
        ("TIAToolbox", "tiatoolbox", "tiatoolbox_tile", args.tiatoolbox_python,
         "Its torch<2.13 pin clashes with pathssl's torch: python -m venv VENV && VENV/bin/pip install "
         "tiatoolbox==2.1.3, then pass --tiatoolbox-python VENV/bin/python"),
        ("LazySlide", "lazyslide", "lazyslide_tile", None, 'pip install -e ".[peers]" (or pip install lazyslide)'),
        ("histolab", "histolab", "histolab_tile", args.histolab_python,
         "Its pins (numpy<=1.24.4, scipy<1.10.1, scikit-image<0.19.4) clash with pathssl's: python -m venv VENV "
         "&& VENV/bin/pip install histolab==0.7.0 (needs libopenslide0), then pass --histolab-python VENV/bin/python"),
    ]
    for label, name, function, python, install in peers:
        found = find_peer(label, name, "tiling_peers", function, python, install)
        if found is not None:
            contenders.append(found)
    for line in machine_report():
        print(line)
    for c in contenders:
        print(f"  {c.label}: {c.where}")

    common = {"slides": slides, "mpp": args.mpp, "size": args.tile, "min_tissue": args.min_tissue,
              "out_root": str(workdir)}
    references = {s: reference_tissue(s) for s in slides}
    settings = [(1, contenders)]
    if args.parallel > 1:
        settings.append((args.parallel, contenders))
    for workers, group in settings:
        series = interleave(group, args.repeats, workers=workers, **common)
        live = [c for c in group if series[c.label].result is not None]
        ours = series["pathssl"]
        ours.result = pathssl_boxes(ours.result["store"], args.mpp, args.tile)
        if args.reference_png and workers == 1:
            write_reference_png(slides[0], references[slides[0]], args.reference_png, ours.result[slides[0]])
        n_ours = sum(len(v) for v in ours.result.values())
        rows = []
        for c in live:
            s = series[c.label]
            n = sum(len(v) for v in s.result.values())
            scores = [score(references[p], s.result[p]) for p in slides]
            recall = np.mean([x["recall"] for x in scores])
            purity = np.mean([x["purity"] for x in scores])
            if c.label == "pathssl":
                ratio = "1"
            else:
                wall = paired_ratio(ours, s, n_ours, n)
                cpu = paired_ratio(ours, s, n_ours, n, clock="cpu")
                ratio = f"{wall[0]:.2f}x / {cpu[0]:.2f}x ({min(wall[1], cpu[1]):.2f}-{max(wall[2], cpu[2]):.2f})"
            rows.append([c.label, str(n), f"{n / s.median_wall():.0f}", f"{n / s.median_cpu():.0f}",
                         f"{s.median_wall():.3f}", f"{s.median_cpu():.3f}", f"{recall:.3f}", f"{purity:.3f}", ratio])
        skipped = [c.label for c in group if c not in live]
        print(f"\n{len(slides)} slide(s), {args.mpp} µm/px, {args.tile} px, min tissue {args.min_tissue}, "
              f"workers {workers}, median of {args.repeats} interleaved repeats; {load_average()}"
              + (f"; no parallel setting: {', '.join(skipped)}" if skipped else ""))
        print_table(["tool", "tiles", "tiles/s", "tiles/CPU-s", "wall-s", "CPU-s", "recall", "purity",
                     "pathssl speed-up (wall / CPU, range)"], rows)
    for c in contenders:
        c.close()


if __name__ == "__main__":
    main()
