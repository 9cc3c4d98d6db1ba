"""Pixel agreement between slide readers on the real samples, and `slides info` cost per slide.

    python benchmarks/slide_readers.py [--data ../shared/data/wsi] [--repeats 7]

For each sample: every level both tiffslide and OpenSlide expose, read whole through `LevelReader`, compared
(max and mean absolute difference in grey levels, fraction of differing values). The SVS is also converted to
DICOM-WSI (JPEG q95, 256 px frames, 2 levels; tests/slides/dicom_writer.py) and read by wsidicom and OpenSlide,
each against the frames decoded directly with libjpeg-turbo. `slides info` is timed per slide as CPU time
(process_time, median of --repeats), which a shared machine inflates less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "slides")]

from dicom_writer import decoded_frames, write_dicom_wsi  # noqa: E402

from pathssl_cli.slides import open_slide  # noqa: E402
from pathssl_cli.slides.info import slide_info  # noqa: E402
from pathssl_cli.tiling.slide import LevelReader  # noqa: E402


def whole(slide, level: int) -> np.ndarray:
    return LevelReader(slide, level).read(0, 0, *slide.level_dimensions[level])


def diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return f"max {d.max():3d}  mean {d.mean():.3f}  differing {100 * (d > 0).mean():.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wsi")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    samples = sorted(args.data.glob("*.svs")) + sorted(args.data.glob("*.tif"))
    print("== tiffslide vs OpenSlide")
    for path in samples:
        a, b = open_slide(path, "tiffslide"), open_slide(path, "openslide")
        for level in range(min(a.level_count, b.level_count)):
            print(f"{path.name:40s} level {level} {a.level_dimensions[level]}: {diff(whole(a, level), whole(b, level))}"
                  f"  (levels seen: tiffslide {a.level_count}, openslide {b.level_count})")
    with tempfile.TemporaryDirectory() as tmp:
        svs = open_slide(samples[0], "tiffslide")
        source = whole(svs, 0)
        folder = Path(tmp) / "dicom"
        write_dicom_wsi(source, 0.499, folder, tile=256, levels=2)
        print("== DICOM-WSI converted from", samples[0].name)
        dcm, osl = open_slide(folder, "dicom"), open_slide(folder / "level0.dcm", "openslide")
        for level in (0, 1):
            exact = decoded_frames(folder / f"level{level}.dcm")
            print(f"level {level}: wsidicom vs frames {diff(whole(dcm, level), exact)}; "
                  f"openslide vs frames {diff(whole(osl, level), exact)}")
        print(f"level 0 vs the source pixels (the JPEG re-encode): {diff(whole(dcm, 0), source)}")
        print("== slides info, CPU ms per slide (median)")
        for path, reader in [(p, r) for p in samples for r in ("tiffslide", "openslide")] + [(folder, "dicom")]:
            slide_info(path, reader)  # imports and file cache warm
            cpu = []
            for _ in range(args.repeats):
                start = time.process_time()
                slide_info(path, reader)
                cpu.append(time.process_time() - start)
            print(f"{path.name:40s} {reader:9s} {1000 * statistics.median(cpu):6.1f} ms")


if __name__ == "__main__":
    main()
