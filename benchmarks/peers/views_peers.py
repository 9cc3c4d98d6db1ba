"""Pre-training input pipeline against the tools people use: pathssl's batched views (`BatchViews`) vs the same
recipe written per image with torchvision v2 (as the official repositories do, benchmarks/input_pipeline.py) and
batched with kornia, on the same uint8 H&E tiles, interleaved, one thread.

Every contender makes all views of every image of the batch at the paper's view sizes (global 224 px, local
96 px; DINO 2 + 10 views, SwAV 2 + 6, MoCo v2 and Barlow Twins 2) with the method's recipe: random resized crop
and flips, RandStainNA (pathology preset: LAB, normal templates, p 0.8), colour jitter, grayscale, Gaussian blur
(23 px), solarisation, normalisation. kornia has no RandStainNA: the kornia contender does it batched with
`kornia.color.rgb_to_lab`/`lab_to_rgb` (per-image LAB mean/std moved to a template sampled from moments fitted on
the tiles), the way a kornia user would add it.

    python benchmarks/peers/views_peers.py [--batch 32] [--repeats 5] [--methods dino,swav,mocov2,barlow_twins] \
        [--presets pathology,original]

Images/s = tiles turned into all their views per second (so DINO's 12 views count as one image).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from harness import one_thread

if __name__ == "__main__":
    one_thread()

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CACHE: dict[tuple, Any] = {}


def _input_pipeline() -> Any:
    spec = importlib.util.spec_from_file_location("input_pipeline", ROOT / "benchmarks" / "input_pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiles(batch: int) -> Any:
    """The benchmark's H&E-like 224 px tiles (uint8, B x 224 x 224 x 3), made once."""
    key = ("tiles", batch)
    if key not in _CACHE:
        from pathssl_cli.synthetic import labelled_tiles

        images, _ = labelled_tiles(-(-batch // 4), 224, seed=0)
        _CACHE[key] = images[:batch]
    return _CACHE[key]


def pathssl_views(method: str, preset: str, batch: int) -> dict[str, int]:
    import torch

    from pathssl_cli.augment.recipes import recipe_for
    from pathssl_cli.augment.stain import fit_stain_stats
    from pathssl_cli.augment.views import BatchViews

    key = ("pathssl", method, preset, batch)
    if key not in _CACHE:
        images = tiles(batch)
        recipe = recipe_for(method, preset)  # type: ignore[arg-type]
        stats = fit_stain_stats(list(images), "lab", "normal") if recipe.stain.p else None
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        _CACHE[key] = (BatchViews(recipe, MEAN, STD, stain=stats), tensor, torch.Generator().manual_seed(0))
    views, tensor, generator = _CACHE[key]
    out = views(tensor, generator)
    return {"images": batch, "views": len(out), "sizes": [int(v.shape[-1]) for v in out]}


def torchvision_views(method: str, preset: str, batch: int) -> dict[str, int]:
    """Per image, per view, torchvision v2 on PIL images (benchmarks/input_pipeline.py's baseline)."""
    import numpy as np
    from PIL import Image

    from pathssl_cli.augment.recipes import recipe_for

    key = ("torchvision", method, preset, batch)
    if key not in _CACHE:
        bench = _input_pipeline()
        images = tiles(batch)
        recipe = recipe_for(method, preset)  # type: ignore[arg-type]
        stain = bench.ReferenceRandStain(images, recipe.stain.p, np.random.default_rng(0)) if recipe.stain.p else None
        _CACHE[key] = (bench.per_image_pipelines(recipe, stain), [Image.fromarray(im) for im in images])
    pipelines, pil = _CACHE[key]
    sizes = []
    for image in pil:
        sizes = [int(view(image).shape[-1]) for view in pipelines]
    return {"images": batch, "views": len(sizes), "sizes": sizes}


class KorniaRandStain:
    """RandStainNA batched in kornia's LAB: each selected image's LAB mean/std moved to a template drawn from
    normal distributions of the tiles' per-image means and stds (Shen et al. 2022, LAB, normal)."""

    def __init__(self, images: Any, p: float) -> None:
        import kornia.color as C

        lab = C.rgb_to_lab(images)
        means, stds = lab.mean(dim=(2, 3)), lab.std(dim=(2, 3))
        self.moments = (means.mean(0), means.std(0), stds.mean(0), stds.std(0))
        self.p = p

    def __call__(self, x: Any) -> Any:
        import kornia.color as C
        import torch

        selected = (torch.rand(x.shape[0]) < self.p).nonzero().flatten()
        if not selected.numel():
            return x
        mean_loc, mean_scale, std_loc, std_scale = self.moments
        n = selected.numel()
        target_mean = mean_loc + mean_scale * torch.randn(n, 3)
        target_std = (std_loc + std_scale * torch.randn(n, 3)).clamp(min=1e-2)
        lab = C.rgb_to_lab(x[selected])
        mean, std = lab.mean(dim=(2, 3), keepdim=True), lab.std(dim=(2, 3), keepdim=True).clamp(min=1e-4)
        lab = (lab - mean) * (target_std[..., None, None] / std) + target_mean[..., None, None]
        out = x.clone()
        out[selected] = C.lab_to_rgb(lab).clamp(0, 1)
        return out


def _kornia_view(recipe: Any, size: int, scale: tuple, blur_p: float, solarize_p: float) -> Any:
    import kornia.augmentation as K

    resample = "BICUBIC" if recipe.interpolation == "bicubic" else "BILINEAR"
    steps = [K.RandomResizedCrop((size, size), scale=scale, ratio=recipe.ratio, resample=resample),
             K.RandomHorizontalFlip(p=recipe.hflip)]
    if recipe.vflip:
        steps.append(K.RandomVerticalFlip(p=recipe.vflip))
    head = K.AugmentationSequential(*steps)
    tail = [K.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue, p=recipe.jitter_p),
            K.RandomGrayscale(p=recipe.grayscale_p)]
    if blur_p:
        kernel = min(recipe.blur_kernel, 2 * size - 1)
        tail.append(K.RandomGaussianBlur((kernel, kernel), recipe.blur_sigma, p=blur_p))
    if solarize_p:
        tail.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))  # threshold exactly 0.5
    tail.append(K.Normalize(mean=MEAN, std=STD))
    return head, K.AugmentationSequential(*tail)


def kornia_views(method: str, preset: str, batch: int) -> dict[str, int]:
    """The recipe as kornia.augmentation modules on the float batch, one pipeline per view."""
    import torch

    from pathssl_cli.augment.recipes import recipe_for

    key = ("kornia", method, preset, batch)
    if key not in _CACHE:
        recipe = recipe_for(method, preset)  # type: ignore[arg-type]
        tensor = torch.from_numpy(tiles(batch)).permute(0, 3, 1, 2).contiguous()
        stain = KorniaRandStain(tensor.float() / 255, recipe.stain.p) if recipe.stain.p else None
        views = [
            _kornia_view(recipe, recipe.global_size, recipe.global_scale, recipe.blur_p[i % len(recipe.blur_p)],
                         recipe.solarize_p[i % len(recipe.solarize_p)])
            for i in range(recipe.n_global)
        ] + [_kornia_view(recipe, recipe.local_size, recipe.local_scale, recipe.local_blur_p,
                          recipe.local_solarize_p)] * recipe.n_local
        _CACHE[key] = (views, stain, tensor)
    views, stain, tensor = _CACHE[key]
    x = tensor.float().div_(255)  # kornia works on float images; the conversion is part of its pipeline
    out = []
    for head, tail in views:
        view = head(x)
        if stain is not None:
            view = stain(view)
        out.append(tail(view))
    return {"images": batch, "views": len(out), "sizes": [int(v.shape[-1]) for v in out]}


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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="dino,swav,mocov2,barlow_twins")
    parser.add_argument("--presets", default="pathology", help="pathology (the paper's) and/or original")
    args = parser.parse_args()
    import torch

    settle_threads()
    contenders = [Contender("pathssl (batched)", "views_peers", "pathssl_views"),
                  Contender("torchvision v2 (per image)", "views_peers", "torchvision_views")]
    kornia = find_peer("kornia (batched)", "kornia", "views_peers", "kornia_views", None,
                       'pip install -e ".[peers]" (or pip install kornia)')
    if kornia is not None:
        contenders.append(kornia)
    for line in machine_report():
        print(line)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; batch {args.batch} tiles of 224 px; "
          f"median of {args.repeats} interleaved repeats")
    header = ["method", "preset", "views/image"] + [f"{c.label} img/s (wall / CPU)" for c in contenders]
    header += [f"pathssl / {c.label} (wall / CPU, range)" for c in contenders[1:]]
    print_table(header, [])  # rows follow as they are measured
    for method in args.methods.split(","):
        for preset in args.presets.split(","):
            series = interleave(contenders, args.repeats, method=method, preset=preset, batch=args.batch)
            ours = series[contenders[0].label]
            row = [method, preset, str(ours.result["views"])]
            for c in contenders:
                s = series[c.label]
                row.append(f"{args.batch / s.median_wall():.1f} / {args.batch / s.median_cpu():.1f}")
            for c in contenders[1:]:
                wall = paired_ratio(ours, series[c.label], 1, 1)
                cpu = paired_ratio(ours, series[c.label], 1, 1, clock="cpu")
                row.append(f"{wall[0]:.2f}x / {cpu[0]:.2f}x ({min(wall[1], cpu[1]):.2f}-{max(wall[2], cpu[2]):.2f})")
            print("| " + " | ".join(row) + " |", flush=True)
    print(load_average() + " (after)")


if __name__ == "__main__":
    main()
