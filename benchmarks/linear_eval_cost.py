"""Cost of a whole linear evaluation (sweep and seeds included) against the one-time feature extraction.

Target (issue 5): `pathssl evaluate linear` with the `paper` preset — 4 lr × 3 weight decays × 3 seeds = 36
heads, 100 epochs each — costs at most 1.5× extracting the features once.

Measured in one process on the same synthetic ImageFolder (JPEG tiles, train/val/test):
1. one-time extraction: `frozen_features` into an empty cache (train, val and test splits);
2. the rest of the evaluation: `run_linear` on that cache (all 36 heads, scoring, outputs); whole = 1 + 2;
3. the alternative without a cache, re-running the frozen backbone on every epoch: one such epoch (backbone
   over train and val + one linear head's steps) is timed, and the whole sweep is extrapolated as
   epoch × epochs × heads, since each head then needs its own pass (a shared pass for all heads of one seed
   would still be epoch × epochs × seeds, printed too).
Each timing is the median of `--rounds` rounds.

    python benchmarks/linear_eval_cost.py [--backbone resnet18] [--size 96] [--n-train 1536] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from feature_extraction import write_folder

from pathssl_cli.data.benchmarks import eval_transform
from pathssl_cli.evaluate.common import build_backbone, frozen_features, open_splits
from pathssl_cli.evaluate.features import make_loader
from pathssl_cli.evaluate.linear import resolve_plan, run_linear
from pathssl_cli.specs.evaluate import LinearSpec


def make_spec(root: Path, out: Path, args: argparse.Namespace) -> LinearSpec:
    return LinearSpec.model_validate(
        {
            "kind": "linear",
            "data": {"dataset": "folder", "root": str(root)},
            "model": {"backbone": args.backbone, "img_size": args.size},
            "optim": {"preset": "paper"},
            "run": {
                "output_dir": str(out),
                "seeds": [0, 1, 2],
                "device": "cpu",
                "workers": args.workers,
                "batch_size": 128,
                "feature_cache": str(out / "cache"),
            },
        }
    )


def backbone_epoch(spec: LinearSpec) -> float:
    """One epoch of linear training with the frozen backbone in the loop (no cache), plus a val pass."""
    fset_splits = open_splits(spec.data)[0]
    backbone = build_backbone(spec.model, 0).eval()
    transform = eval_transform(backbone.img_size, backbone.mean, backbone.std)
    head = torch.nn.Linear(backbone.feature_dim, len(fset_splits["train"].classes))
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    for name in ("train", "val"):
        ds = fset_splits[name]
        ds.transform = transform
        for images, targets in make_loader(ds, 256, spec.run.workers, torch.device("cpu")):
            with torch.no_grad():
                feats = backbone(images)
            if name == "train":
                loss = F.cross_entropy(head(feats), targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                with torch.no_grad():
                    head(feats).argmax(1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--n-train", type=int, default=1536)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_eval = max(6, args.n_train // 4)

    extraction, rest, epoch = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(
            Path(tmp) / "data", {"train": args.n_train, "val": n_eval, "test": n_eval}, args.size
        )
        for r in range(args.rounds):
            # Extraction into an empty cache, then run_linear on that cache: the second timing is everything
            # the evaluation adds to the one-time extraction (loading the cached features, every head of the
            # sweep, scoring, metrics.json/CSV/PNG). Timing run_linear on an empty cache instead would measure
            # a second extraction too, whose run-to-run noise on a shared machine swamps the difference.
            spec = make_spec(root, Path(tmp) / f"linear{r}", args)
            start = time.perf_counter()
            frozen_features(spec)
            extraction.append(time.perf_counter() - start)
            start = time.perf_counter()
            record = run_linear(spec)
            rest.append(time.perf_counter() - start)

            epoch.append(backbone_epoch(spec))

    plan = resolve_plan(spec.optim)
    heads = len(plan.lrs) * len(plan.weight_decays) * len(spec.run.seeds)
    epochs = plan.epochs or 1
    t_ext, t_rest, t_epoch = statistics.median(extraction), statistics.median(rest), statistics.median(epoch)
    t_whole = t_ext + t_rest
    print(
        f"backbone {args.backbone} at {args.size} px on cpu ({torch.get_num_threads()} threads), "
        f"{args.n_train} train / {n_eval} val / {n_eval} test JPEG tiles, {args.rounds} round(s), medians"
    )
    print(
        f"  preset paper: {heads} heads ({len(plan.lrs)} lr × {len(plan.weight_decays)} wd × "
        f"{len(spec.run.seeds)} seeds), {epochs} epochs, batch {plan.batch_size}; "
        f"test top-1 {100 * record['metrics']['top1']['mean']:.1f}%"
    )
    print(
        f"  one-time extraction (train+val+test): {t_ext:8.1f} s  rounds {[round(t, 1) for t in extraction]}"
    )
    print(f"  run_linear on the cached features:    {t_rest:8.1f} s  rounds {[round(t, 1) for t in rest]}")
    print(f"  whole linear evaluation:              {t_whole:8.1f} s")
    print(f"  ratio whole / extraction = {t_whole / t_ext:.3f} (target <= 1.5)")
    naive_heads = t_epoch * epochs * heads
    naive_seeds = t_epoch * epochs * len(spec.run.seeds)
    print(
        f"  backbone re-run every epoch: one epoch {t_epoch:.1f} s → {naive_heads:.0f} s for the sweep "
        f"({naive_heads / t_whole:.0f}× ours); {naive_seeds:.0f} s even sharing a pass per seed "
        f"({naive_seeds / t_whole:.0f}× ours)"
    )


if __name__ == "__main__":
    main()
