"""Seeded, class-stratified, nested low-label subsets and their files: the algorithm and the file format that
`pathssl subsample` (`pathssl_cli.data.subsample`) writes and every evaluation reads.

Algorithm. Within each class (stratum), the items are sorted by id and shuffled with a generator keyed by
(seed, class name); a fraction f keeps the first round(f × n_class) items of that order (half rounds up). The
same order serves every fraction, so the subsets are nested (1% ⊂ 10% ⊂ 100%) and the result depends only on
the seed and the items, not on file listing order or on the other fractions asked for. A fraction that would
keep no item of some class is refused (exit 2) with the smallest fraction that keeps one of every class.

Sources. A `[data]` section subsamples the *train* split of a classification dataset, after its val (and test)
hold-outs, so an evaluation with the same `[data]` settings and `train_subset = <file>` trains on exactly
these items. An `[images]` section subsamples a segmentation dataset at image level: CoNSeP-style
`Images/*.png` (item id = file stem, a single stratum "image") or a PanNuke fold's `types.npy` (item id =
the index into the fold's arrays, strata = tissue types).

Subset file format (`subset_<percent>pct.csv`, e.g. `subset_1pct.csv`)::

    # pathssl-subset {"version": 1, "fraction": 0.01, "seed": 0, "source": {...}, "counts": {...}}
    id,label
    ADI/ADI-AAAFLCLY.tif,ADI

The first line is a comment holding JSON metadata (`read_subset_meta`); then a CSV with the item id and its
class (or tissue type). `read_subset(path)` returns the ids in file order (sorted by item position).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pathssl_cli.data.datasets.base import DataSource, class_permutation, count_text, describe_missing
from pathssl_cli.data.subset_files import MAGIC
from pathssl_cli.errors import Problem, SpecError

# ------------------------------------------------------------------------------------------------ algorithm


def kept_count(fraction: float, n: int) -> int:
    """round(fraction × n), half up, computed exactly (0.29 × 100 is 28.999… in floating point)."""
    exact = Fraction(repr(float(fraction))) * n
    return int(exact + Fraction(1, 2))


def minimum_fraction(n: int) -> float:
    """The smallest fraction f with round(f × n) ≥ 1, i.e. 1 / (2n), rounded up to 4 significant digits."""
    exact = Fraction(1, 2 * n)
    step = Fraction(10) ** (math.floor(math.log10(exact)) - 3)
    candidate = math.ceil(exact / step) * step
    while kept_count(float(candidate), n) < 1:  # float(candidate) may round just below the exact bound
        candidate += step
    return float(candidate)


def nested_subsets(ids: Sequence[str], targets: np.ndarray, classes: Sequence[str],
                   fractions: Sequence[float], seed: int) -> dict[float, np.ndarray]:
    """fraction → sorted positions kept; nested across fractions, stratified by class, ≥ 1 item per class.

    Raises `SpecError` when a fraction would keep no item of a class that has items.
    """
    targets = np.asarray(targets)
    if len(set(ids)) != len(ids):
        repeated = sorted(item for item, n in Counter(ids).items() if n > 1)
        raise SpecError(f"items are listed more than once ({count_text(repeated)}); list each image once.")
    orders = {}
    counts = {}
    for index, name in enumerate(classes):
        members = np.flatnonzero(targets == index)
        if len(members):
            member_ids = [ids[int(m)] for m in members]
            orders[name] = members[class_permutation(member_ids, seed, name, salt="subsample")]
            counts[name] = len(members)
    problems = []
    for fraction in fractions:
        empty = [name for name, n in counts.items() if kept_count(fraction, n) == 0]
        if empty:
            smallest = min(counts[name] for name in empty)
            problems.append(Problem("subsample.fractions", (
                f"fraction {fraction:g} would keep no item of class(es) {count_text(empty)} (the smallest "
                f"has {smallest} item(s); round({fraction:g} × {smallest}) = 0). Every class needs at "
                f"least one example: use fractions ≥ {minimum_fraction(min(counts.values())):g} for this "
                "dataset.")))
    if problems:
        raise SpecError(problems)
    return {fraction: np.sort(np.concatenate([order[:kept_count(fraction, len(order))]
                                              for order in orders.values()]))
            for fraction in fractions}


def subset_file_name(fraction: float) -> str:
    """subset_1pct.csv for 0.01, subset_0.5pct.csv for 0.005, subset_100pct.csv for 1.0."""
    percent = Fraction(repr(float(fraction))) * 100
    text = str(percent.numerator) if percent.denominator == 1 else f"{float(percent):g}"
    return f"subset_{text}pct.csv"


# ---------------------------------------------------------------------------------------------------- items


@dataclass
class Items:
    """What is subsampled: unique item ids, their stratum index, the strata names and a source description."""

    ids: list[str]
    targets: np.ndarray
    classes: list[str]
    source: dict[str, Any] = field(default_factory=dict)


def load_items(data: DataSource | None, images_format: str | None = None,
               images_root: Path | None = None) -> Items:
    """The items a subsample spec's source holds: the train split of `data` (a `[data]` table) or the
    segmentation images of an `[images]` table (`images_format` 'consep' | 'pannuke', `images_root`)."""
    if data is not None:
        from pathssl_cli.data.benchmarks import open_dataset

        train = open_dataset(_without_subset(data), "train")
        source = {"kind": "classification", "dataset": data.dataset, "root": str(data.root), "split": "train",
                  "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
                  "split_seed": data.split_seed, "folds": data.folds, "fold": data.fold}
        return Items(list(train.ids), train.targets, list(train.classes), source)
    if images_root is None:
        raise ValueError("give a [data] table or the images' format and root")
    if images_format == "consep":
        return consep_items(Path(images_root))
    return pannuke_items(Path(images_root))


def _without_subset(data: DataSource) -> DataSource:
    """`data` reading the whole train split: subsets are carved from all of it, never from another subset."""
    copy = getattr(data, "model_copy", None)
    if copy is None:
        raise TypeError(f"{type(data).__name__} cannot be copied without its train_subset")
    return copy(update={"train_subset": None})  # type: ignore[no-any-return]


def consep_items(root: Path) -> Items:
    """CoNSeP-style image folder: `root/Images/<name>.png` (official `CoNSeP/Train` or `CoNSeP/Test`)."""
    images = root / "Images"
    if not images.is_dir():
        raise SpecError(f"{images}: expected the CoNSeP Images/ folder, but it {describe_missing(images)}. "
                        "Set images.root to a folder holding Images/*.png, such as CoNSeP/Train.")
    stems = sorted(p.stem for p in images.glob("*.png") if not p.name.startswith("."))
    if not stems:
        raise SpecError(f"{images}: no .png images; CoNSeP images are Images/<name>.png.")
    source = {"kind": "images", "format": "consep", "root": str(root)}
    return Items(stems, np.zeros(len(stems), dtype=np.int64), ["image"], source)


def pannuke_items(root: Path) -> Items:
    """A PanNuke fold: `types.npy` (N,) tissue names, e.g. `Fold 1/images/fold1/types.npy` of the release.

    `root` may be that file, the folder holding it, or the fold's top folder (`Fold 1`).
    """
    path = root if root.is_file() else root / "types.npy"
    if not path.is_file() and root.is_dir():
        # The release nests the arrays: "Fold 1/images/fold1/types.npy"; accept the fold's top folder too.
        nested = sorted(root.glob("images/*/types.npy"))
        path = nested[0] if len(nested) == 1 else path
    if not path.is_file():
        raise SpecError(f"{path}: expected PanNuke's types.npy, but it {describe_missing(path)}. Set "
                        "images.root to the fold folder holding images.npy and types.npy (e.g. 'Fold "
                        "1/images/fold1').")
    try:
        types = np.load(path, allow_pickle=False)
    except ValueError:
        raise SpecError(f"{path}: holds Python objects; pathssl reads only plain arrays. Re-save it with "
                        "np.save(path, types.astype(str)).") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot read as a .npy array ({error}).") from None
    if types.ndim != 1 or types.dtype.kind not in "UST":
        raise SpecError(f"{path}: expected a 1-D array of tissue names, found shape {types.shape} dtype "
                        f"{types.dtype}.")
    names = [t.decode() if isinstance(t, bytes) else str(t) for t in types.tolist()]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    source = {"kind": "images", "format": "pannuke", "root": str(root)}
    return Items([str(i) for i in range(len(names))], np.array([index[n] for n in names], dtype=np.int64),
                 classes, source)


def subset_text(items: Items, positions: np.ndarray, meta: dict[str, Any]) -> str:
    buffer = io.StringIO()
    buffer.write(MAGIC + json.dumps(meta, sort_keys=True) + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows((items.ids[p], items.classes[items.targets[p]]) for p in positions)
    return buffer.getvalue()
