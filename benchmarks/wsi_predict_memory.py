"""Peak memory of whole-slide nuclei prediction at two slide sizes: chunked (pathssl) vs one chunk (naive).

Each measurement runs in a fresh subprocess (so peaks do not mix) that opens a synthetic pyramidal TIFF
through tiffslide and runs `segment_image` with a tiny random-weight HoVer-Net (fast mode, 256 -> 164 px). A
random network finds no nuclei, so its NP/HV outputs are replaced by those of the synthetic nuclei (dark
pixels, HV of their connected components): the network still runs on every patch, and post-processing, the
instance map, JSON and GeoJSON get thousands of real instances to handle. The child reports its peak
resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and its RSS just before prediction (imports, model). The claim:
the chunked peak does not grow with the slide area, while a single whole-slide chunk does.

    python benchmarks/wsi_predict_memory.py                  # 1024^2 and 2048^2 px (4x the area)
    python benchmarks/wsi_predict_memory.py --sizes 2048 4096 --chunk 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(slide: Path, chunk: int, out_dir: Path) -> None:
    import numpy as np
    import torch
    from scipy import ndimage

    from pathssl_cli.segment.hovernet import build_hovernet
    from pathssl_cli.segment.predict import SlideReader, segment_image
    from pathssl_cli.segment.targets import hv_map

    class NetworkWithNucleiOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_hovernet("resnet_tiny", mode="fast", num_types=6, decoder_width=0.125).eval()
            self.input_size, self.output_size = self.net.input_size, self.net.output_size

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.net(x)
            fg = (x.mean(1) < 0.45).numpy()
            hv = np.stack([hv_map(ndimage.label(f)[0], min_size=1) for f in fg])
            crop = slice((self.input_size - self.output_size) // 2, (self.input_size + self.output_size) // 2)
            logit = torch.from_numpy(np.where(fg, 10.0, -10.0).astype(np.float32))[..., crop, crop]
            out["np"] = torch.stack([-logit, logit], 1)
            out["hv"] = torch.from_numpy(hv)[..., crop, crop]
            return out

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = NetworkWithNucleiOutputs()
    reader = SlideReader(slide, None)
    before = _rss_mb()
    start = time.perf_counter()
    out = segment_image(
        model,
        reader,
        out_dir,
        "slide",
        chunk_size=chunk,
        chunk_margin=64,
        batch_size=4,
        overlay=True,
        overlay_max_px=1024,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps({"peak_rss_mb": peak, "rss_before_mb": before, "seconds": seconds, "instances": out.count})
    )


def measure(slide: Path, chunk: int, work: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(slide), "--chunk", str(chunk), "--out", str(work)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs=2, default=[1024, 2048], help="slide sides in px")
    parser.add_argument("--chunk", type=int, default=492, help="chunk size of the bounded run (px)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (medians reported)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.chunk, args.out)
        return

    from pathssl_cli.synthetic_slide import write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = Path(tmp) / f"slide_{size}.tif"
            write_synthetic_slide(slide, width=size, height=size, mpp=0.25, tile_size=256, n_levels=2, seed=0)
            for label, chunk in (("chunked", args.chunk), ("one chunk", size)):
                runs = [
                    measure(slide, chunk, Path(tmp) / f"out_{size}_{chunk}_{r}") for r in range(args.repeats)
                ]
                rows.append(
                    {
                        "size": size,
                        "strategy": label,
                        "chunk": chunk,
                        **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                    }
                )
    print(
        f"{'slide':>11} {'strategy':>10} {'chunk':>6} {'peak MB':>8} {'before MB':>9} {'pred MB':>8} "
        f"{'s':>7} {'nuclei':>7}"
    )
    for r in rows:
        print(
            f"{r['size']:>5}x{r['size']:<5} {r['strategy']:>10} {r['chunk']:>6} {r['peak_rss_mb']:>8.0f} "
            f"{r['rss_before_mb']:>9.0f} {r['peak_rss_mb'] - r['rss_before_mb']:>8.0f} {r['seconds']:>7.1f} "
            f"{r['instances']:>7.0f}"
        )
    small, large = args.sizes
    for label in ("chunked", "one chunk"):
        a = next(r for r in rows if r["size"] == small and r["strategy"] == label)
        b = next(r for r in rows if r["size"] == large and r["strategy"] == label)
        growth = (b["peak_rss_mb"] - b["rss_before_mb"]) / max(a["peak_rss_mb"] - a["rss_before_mb"], 1e-9)
        print(
            f"{label}: area x{(large / small) ** 2:.0f} -> prediction memory x{growth:.2f} "
            f"(peak {a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB)"
        )


if __name__ == "__main__":
    main()
