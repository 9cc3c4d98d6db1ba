"""kNN AUROC on real binary data, as scored before and after issue 11 (item 4).

Before: AUROC ranked softmax(raw vote sums)[:, 1] in float32; the sums of exp(cos / 0.07) reach k·1.6e6, so
nearly every score saturated to 0 or 1 and AUROC came out close to top-1 accuracy. After: `knn_scores` returns
vote fractions and `classification_metrics` ranks them. An independent float64 Mann-Whitney count on the
fractions checks the new number.

Data: LC25000 colon (250 adenocarcinoma, 250 benign tiles, ImageFolder layout), features of a random-init
`resnet_tiny` at 64 px (nothing is downloaded), a seeded half/half split into neighbours and queries.

    python benchmarks/knn_auroc_saturation.py [--root ../shared/data/patches/lc25000-colon] [--k 20 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pathssl_cli.backbones import create_backbone
from pathssl_cli.data.benchmarks import eval_transform
from pathssl_cli.data.datasets.base import read_rgb
from pathssl_cli.evaluate.knn import knn_scores
from pathssl_cli.evaluate.metrics import classification_metrics


def mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(wins / (len(pos) * len(neg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/patches/lc25000-colon"))
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200])
    args = parser.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"{args.root}: not found; give --root the LC25000 colon folder (colon_n/, colon_aca/)")
    files: list[Path] = []
    labels_list: list[int] = []
    for label, name in enumerate(["colon_n", "colon_aca"]):
        found = sorted((args.root / name).glob("*.jp*g"))
        files += found
        labels_list += [label] * len(found)
    labels = torch.tensor(labels_list)
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny", "random", 64).eval()
    transform = eval_transform(64, backbone.mean, backbone.std)
    with torch.no_grad():
        feats = torch.cat([backbone(torch.stack([transform(read_rgb(p)) for p in files[i:i + 64]]))
                           for i in range(0, len(files), 64)])
    order = np.random.default_rng(0).permutation(len(files))
    train, query = order[: len(files) // 2], order[len(files) // 2:]
    unit_train = torch.nn.functional.normalize(feats[train], dim=1)
    unit_query = torch.nn.functional.normalize(feats[query], dim=1)
    truth = labels[query].numpy()
    for k in args.k:
        fractions = knn_scores(feats[train], labels[train], feats[query], k, 0.07, 2)
        top = (unit_query @ unit_train.T).topk(min(k, len(train)), dim=1).values
        raw_sums = fractions * (top / 0.07).exp().sum(dim=1, keepdim=True)
        old = raw_sums.softmax(dim=1)[:, 1]
        new = classification_metrics(fractions, labels[query], 2)
        print(f"k={k}: top-1 {new['top1']:.4f} | AUROC now {new['auroc']:.4f} (independent "
              f"{mann_whitney(fractions[:, 1].double().numpy(), truth):.4f}, "
              f"{len(torch.unique(fractions[:, 1]))} distinct scores) | before {mann_whitney(old.numpy(), truth):.4f} "
              f"({len(torch.unique(old))} distinct of {len(query)})")


if __name__ == "__main__":
    main()
