"""Group the rotated/flipped copies in an image folder, and write it as a `csv` dataset with a `group` column.

    python scripts/near_duplicate_groups.py ../shared/data/patches/lc25000-colon runs/lc25000/groups.csv
    pathssl evaluate linear specs/evaluate/cpu_real_linear.toml \
        --set data.dataset=csv --set data.root=runs/lc25000/groups.csv

Some public tile sets are augmented copies of fewer originals: LC25000 (Borkowski et al. 2019) made its
5,000 tiles per class from 250 images per class by rotations (up to 25°) and flips, so a random train/test
split scores copies of training images as unseen tiles. The `csv` dataset keeps every `group` on one side of
each hold-out it makes (`pathssl_cli.data.datasets.csv_list`); this script finds the groups.

How: within each class, candidate pairs are the `--candidates` nearest tiles by a colour histogram of the
central disc (unchanged by rotations and flips); a candidate pair is a copy when SIFT keypoints (rotation- and
scale-invariant; the mirrored image is tried too) agree on one similarity transform for at least
`--min-inliers` matches (RANSAC, 4 px). Groups are the connected components of those pairs. On the shared
LC25000 colon sample the inlier counts are bimodal: 0-7 for different originals, 12 to hundreds for copies.
Pairs that the histogram does not rank as candidates are missed, so the groups are a lower bound.

Input: a folder of class folders (`ROOT/<class>/<image>`). Output columns: path (relative to the CSV's
folder, or absolute), label, group (`<class>/<first file of the group>`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import cv2
import numpy as np

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def colour_histograms(images: list[np.ndarray]) -> np.ndarray:
    """sqrt of an 8×8×8 LAB histogram of the central disc of each image (rows comparable by Euclid)."""
    rows = []
    for image in images:
        small = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)
        yy, xx = np.mgrid[:112, :112]
        disc = ((yy - 55.5) ** 2 + (xx - 55.5) ** 2) < 40**2
        pixels = np.ascontiguousarray(lab[disc]).reshape(-1, 1, 3)
        hist = cv2.calcHist([pixels], [0, 1, 2], None, [8, 8, 8], [0, 256, 0, 256, 0, 256]).ravel()
        rows.append(np.sqrt(hist / max(hist.sum(), 1.0)))
    return np.stack(rows)


def _inliers(a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None],
             matcher: cv2.BFMatcher) -> int:
    (points_a, desc_a), (points_b, desc_b) = a, b
    if desc_a is None or desc_b is None or len(desc_a) < 5 or len(desc_b) < 5:
        return 0
    pairs = matcher.knnMatch(desc_a, desc_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]  # Lowe's ratio
    if len(good) < 4:
        return len(good)
    src = points_a[[g.queryIdx for g in good]]
    dst = points_b[[g.trainIdx for g in good]]
    _, mask = cv2.estimateAffinePartial2D(src, dst, ransacReprojThreshold=4.0)
    return int(mask.sum()) if mask is not None else 0


def copy_groups(images: list[np.ndarray], candidates: int = 15, min_inliers: int = 12) -> list[int]:
    """Group index per image: images joined by a chain of rotated/flipped copies share an index."""
    sift = cv2.SIFT_create(nfeatures=400)  # type: ignore[attr-defined]
    matcher = cv2.BFMatcher()

    def keypoints(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        found, desc = sift.detectAndCompute(gray, None)
        return np.array([k.pt for k in found], dtype=np.float32).reshape(-1, 2), desc

    grays = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in images]
    plain = [keypoints(g) for g in grays]
    mirrored = [keypoints(np.ascontiguousarray(g[:, ::-1])) for g in grays]
    hist = colour_histograms(images)
    distance = np.sqrt(((hist[:, None] - hist[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    parent = list(range(len(images)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    checked: set[tuple[int, int]] = set()
    for i in range(len(images)):
        for j in np.argsort(distance[i])[:candidates].tolist():
            pair = (min(i, j), max(i, j))
            if pair in checked:
                continue
            checked.add(pair)
            score = max(_inliers(plain[i], plain[j], matcher), _inliers(mirrored[i], plain[j], matcher))
            if score >= min_inliers:
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(images))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder of class folders (ROOT/<class>/<image>)")
    parser.add_argument("out", type=Path, help="CSV to write (path,label,group)")
    parser.add_argument("--candidates", type=int, default=15, help="nearest tiles by colour checked per tile")
    parser.add_argument("--min-inliers", type=int, default=12, help="SIFT inliers that make a pair a copy")
    args = parser.parse_args(argv)
    classes = sorted(p.name for p in args.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        print(f"{args.root}: no class folders (expected ROOT/<class>/<image>)", file=sys.stderr)
        return 2
    rows = []
    for name in classes:
        files = sorted(p for p in (args.root / name).iterdir() if p.suffix.lower() in SUFFIXES)
        images = []
        for file in files:
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                print(f"{file}: cannot read this image; remove it or replace it", file=sys.stderr)
                return 1
            images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        groups = copy_groups(images, args.candidates, args.min_inliers)
        first: dict[int, str] = {}
        for file, group in zip(files, groups, strict=True):
            first.setdefault(group, file.name)
        sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
        print(f"{name}: {len(files)} images in {len(sizes)} groups ({int((sizes > 1).sum())} with copies, "
              f"largest {int(sizes.max())})")
        out_dir = os.path.abspath(args.out.parent)
        for file, group in zip(files, groups, strict=True):
            path = os.path.relpath(os.path.abspath(file), out_dir)
            rows.append({"path": path, "label": name, "group": f"{name}/{first[group]}"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    with partial.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(args.out)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
