"""Feature-extraction throughput against the backbone's bare inference throughput on the same batches.

Target (issue 5): `pathssl_cli.evaluate.features.extract` — JPEG files decoded and resized by DataLoader
workers, pinned memory on GPU — runs at >= 80% of the images/s of the backbone alone on the same batches
already in memory, i.e. data loading is not the bottleneck.

Both measurements see the same images in the same batches: the bare run gets them pre-decoded and
pre-transformed as tensors (what the loader would hand over), the pipeline run reads them from an ImageFolder
of JPEG files. Rounds alternate between the two and medians are reported, so background load hits both alike.

    python benchmarks/feature_extraction.py [--backbone resnet18] [--size 96] [--n 1536] [--batch 128]
                                            [--workers 2] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pathssl_cli.backbones import create_backbone
from pathssl_cli.data.benchmarks import eval_transform, open_dataset
from pathssl_cli.evaluate.features import extract
from pathssl_cli.specs.data import DataSection
from pathssl_cli.synthetic import TEXTURES, labelled_tiles


def write_folder(root: Path, counts: dict[str, int], size: int, unique_per_class: int = 32) -> Path:
    """An ImageFolder of synthetic H&E JPEGs: `counts[split]` images per split, classes balanced.

    Rendering is the slow part, so `unique_per_class` tiles per class are rendered and the files cycle through
    them under the 8 flips/rotations; every file is still decoded on its own by the loader.
    """
    images, labels = labelled_tiles(unique_per_class, size, seed=0)
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            label = i % len(TEXTURES)
            j = rng.integers(unique_per_class) + label * unique_per_class
            tile = np.rot90(images[j], int(rng.integers(4)))
            tile = tile[:, ::-1] if rng.integers(2) else tile
            folder = root / split / TEXTURES[labels[j]]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(
                str(folder / f"{i:06d}.jpg"),
                np.ascontiguousarray(tile[..., ::-1]),
                [cv2.IMWRITE_JPEG_QUALITY, 90],
            )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=96, help="tile and input size (PCam's 96 px)")
    parser.add_argument("--n", type=int, default=1536, help="images per round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "data", {"train": args.n, "val": 6}, args.size)
        dataset = open_dataset(DataSection(dataset="folder", root=root), "train")
        torch.manual_seed(0)
        backbone = create_backbone(args.backbone, img_size=args.size).eval().to(device)
        dataset.transform = eval_transform(args.size, backbone.mean, backbone.std)
        batches = [
            torch.stack([dataset[i][0] for i in range(s, min(s + args.batch, len(dataset)))])
            for s in range(0, len(dataset), args.batch)
        ]

        def bare() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    backbone(batch.to(device, non_blocking=True)).float().cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return len(dataset) / (time.perf_counter() - start)

        def pipeline() -> float:
            start = time.perf_counter()
            extract(backbone, dataset, batch_size=args.batch, workers=args.workers, device=device)
            return len(dataset) / (time.perf_counter() - start)

        bare()  # warm-up: allocator, cudnn/oneDNN kernel choice
        bare_rates, pipe_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(bare())
            pipe_rates.append(pipeline())

    bare_median, pipe_median = statistics.median(bare_rates), statistics.median(pipe_rates)
    print(
        f"backbone {args.backbone} at {args.size} px on {device}, {args.n} JPEG images, batch {args.batch}, "
        f"{args.workers} workers, torch threads {torch.get_num_threads()}, {args.rounds} rounds (medians)"
    )
    print(
        f"  bare inference (tensors in memory): {bare_median:8.1f} img/s, rounds "
        f"{[round(r) for r in bare_rates]}"
    )
    print(
        f"  extract() from JPEG files:          {pipe_median:8.1f} img/s, rounds "
        f"{[round(r) for r in pipe_rates]}"
    )
    print(f"  ratio extract / bare = {pipe_median / bare_median:.3f} (target >= 0.80)")


if __name__ == "__main__":
    main()
