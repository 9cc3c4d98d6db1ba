"""Input-pipeline throughput: batched views (`BatchViews`) against the per-image torchvision v2 pipeline.

For each method's recipe (mocov2, swav, barlow_twins, dino) and preset (original, pathology), both pipelines
make the recipe's views of the same H&E-like 224 px tiles on ONE thread (views/s per core); the rounds
alternate between the two pipelines and the medians are reported, so background load hits both alike.

Baseline = what the official repositories do per image, written with torchvision v2 transforms on PIL images
(RandomResizedCrop, flips, RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur(23)),
RandomSolarize, ToImage/ToDtype/Normalize), and for `pathology` a per-image RandStainNA as in the
reference code (OpenCV LAB conversion, Reinhard transfer to a sampled template, back to RGB).

    python benchmarks/input_pipeline.py [--batch 32] [--rounds 5] [--methods dino,swav] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from pathssl_cli.augment.recipes import METHODS, ViewRecipe, recipe_for
from pathssl_cli.augment.stain import StainStats, fit_stain_stats
from pathssl_cli.augment.views import BatchViews
from pathssl_cli.synthetic import labelled_tiles

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ReferenceRandStain:
    """Per-image RandStainNA as yiqings/RandStainNA does it (OpenCV 8-bit LAB), for the baseline only."""

    def __init__(self, images: np.ndarray, p: float, rng: np.random.Generator) -> None:
        lab = np.stack(
            [cv2.cvtColor(im, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64) for im in images]
        )
        means, stds = lab.mean(1), lab.std(1)
        self.moments = (means.mean(0), means.std(0), stds.mean(0), stds.std(0))
        self.p, self.rng = p, rng

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.rng.random() >= self.p:
            return image
        lab = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB).astype(np.float64)
        mean_loc, mean_scale, std_loc, std_scale = self.moments
        target_mean = self.rng.normal(mean_loc, mean_scale)
        target_std = np.maximum(self.rng.normal(std_loc, std_scale), 1e-2)
        mean, std = lab.reshape(-1, 3).mean(0), np.clip(lab.reshape(-1, 3).std(0), 1e-4, None)
        lab = np.clip((lab - mean) * (target_std / std) + target_mean, 0, 255).astype(np.uint8)
        return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def per_image_pipelines(recipe: ViewRecipe, stain: ReferenceRandStain | None) -> list[Callable]:
    """One torchvision v2 transform per view, as the official per-image recipes."""
    interpolation = (
        T.InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    )

    def pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> Callable:
        steps: list[Callable] = [
            T.RandomResizedCrop(size, scale=scale, ratio=recipe.ratio, interpolation=interpolation)
        ]
        steps.append(T.RandomHorizontalFlip(recipe.hflip))
        if recipe.vflip > 0:
            steps.append(T.RandomVerticalFlip(recipe.vflip))
        if stain is not None:
            steps.append(stain)
        steps.append(
            T.RandomApply(
                [T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
                p=recipe.jitter_p,
            )
        )
        steps.append(T.RandomGrayscale(recipe.grayscale_p))
        if blur_p > 0:
            steps.append(T.RandomApply([T.GaussianBlur(recipe.blur_kernel, recipe.blur_sigma)], p=blur_p))
        if solarize_p > 0:
            steps.append(T.RandomSolarize(128, p=solarize_p))
        steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]
        return T.Compose(steps)

    views = []
    for i in range(recipe.n_global):
        views.append(
            pipeline(
                recipe.global_size,
                recipe.global_scale,
                recipe.blur_p[i % len(recipe.blur_p)],
                recipe.solarize_p[i % len(recipe.solarize_p)],
            )
        )
    views += [
        pipeline(recipe.local_size, recipe.local_scale, recipe.local_blur_p, recipe.local_solarize_p)
    ] * recipe.n_local
    return views


def measure(images: np.ndarray, method: str, preset: str, stats: StainStats, rounds: int) -> dict[str, float]:
    recipe = recipe_for(method, preset)  # type: ignore[arg-type]
    pil = [Image.fromarray(im) for im in images]
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    reference_stain = (
        ReferenceRandStain(images, recipe.stain.p, np.random.default_rng(0)) if recipe.stain.p else None
    )
    baseline = per_image_pipelines(recipe, reference_stain)
    batched = BatchViews(recipe, MEAN, STD, stain=stats if recipe.stain.p else None)
    generator = torch.Generator().manual_seed(0)
    n_views = len(images) * recipe.n_views

    def run_baseline() -> None:
        for image in pil:
            for view in baseline:
                view(image)

    def run_batched() -> None:
        batched(batch, generator)

    run_baseline(), run_batched()  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"baseline": [], "batched": []}
    for _ in range(rounds):
        for name, fn in (("baseline", run_baseline), ("batched", run_batched)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = n_views / statistics.median(times["baseline"])
    fast = n_views / statistics.median(times["batched"])
    return {
        "baseline_views_s": base,
        "batched_views_s": fast,
        "ratio": fast / base,
        "views_per_image": recipe.n_views,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="images per batch (the per-image baseline loops)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating timed rounds; medians are reported"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--presets", default="original,pathology")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(1)  # per-core figures; cv2 too
    cv2.setNumThreads(1)
    n_per_class = -(-args.batch // 4)
    images, _ = labelled_tiles(n_per_class, 224, seed=0)
    images = images[: args.batch]
    stats = fit_stain_stats(list(images), "lab", "normal")

    rows = []
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, {args.rounds} rounds (medians)")
    print("| method | preset | views/image | per-image v2 views/s | batched views/s | ratio |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for preset in args.presets.split(","):
            result = measure(images, method, preset, stats, args.rounds)
            rows.append({"method": method, "preset": preset, **result})
            print(
                f"| {method} | {preset} | {result['views_per_image']} | {result['baseline_views_s']:.0f} | "
                f"{result['batched_views_s']:.0f} | {result['ratio']:.2f}x |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
