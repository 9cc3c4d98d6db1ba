"""Cross-validation by group: `data.folds` (K) and `data.fold` (k) split a dataset into K folds of whole groups.

Fold k is the test split and fold (k + 1) mod K the val split; the other K − 2 folds are the training split.
Scoring k = 0..K−1 in turn scores every item exactly once, each time by a probe that saw none of its group
(slide, patient) in training or in choosing its hyper-parameters. Val is a whole fold rather than a fraction
of the training items so that hyper-parameters, too, are chosen on groups the probe has not seen: with a few
slides a within-fold hold-out would have to split a slide or leave val empty. The price is that the probe
trains on (K − 2)/K of the items (3 of 5 slides at K = 5); protocols that fit nothing on val (kNN) and the
L-BFGS probe's refit use train + val, (K − 1)/K.

The folds come from scikit-learn's StratifiedGroupKFold (shuffled, seeded by `data.split_seed`): whole groups,
with each fold's class proportions as close to the whole set's as whole groups allow. It works on the groups
sorted by name and their class counts, so the folds depend on the rows' groups and labels, not on their order
in the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from pathssl_cli.data.datasets.base import ClassificationDataset, Split, announce_once, count_text
from pathssl_cli.errors import SpecError


def group_folds(targets: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """(N,) fold index in 0..folds-1 of every item; the items of a group share one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed & 0xFFFFFFFF)
    assignment = np.full(len(targets), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # "The least populated class has fewer members than n_splits": stratification is best effort then,
        # which the docstring says; the folds stay group-disjoint.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(targets)), targets, np.asarray(groups))):
            assignment[test] = k
    return assignment


def fold_split(pool: ClassificationDataset, split: Split, folds: int, fold: int, seed: int,
               where: str) -> ClassificationDataset:
    """The `split` part of fold `fold` of `folds` over `pool` (every labelled item of the dataset).

    `where` names the data (the CSV file) in errors. Items without a group (`pool.groups` None) are their
    own groups, which makes this a stratified K-fold over items.
    """
    groups = pool.groups if pool.groups is not None else [f"item:{i}" for i in pool.ids]
    n_groups = len(set(groups))
    if folds > n_groups:
        raise SpecError(f"{where}: data.folds = {folds}, but its rows form only {n_groups} group(s) (column "
                        f"'group'); a fold needs at least one whole group. Use data.folds ≤ {n_groups}, or "
                        "finer groups (regions instead of slides).")
    if not 0 <= fold < folds:
        raise SpecError(f"data.fold = {fold}: folds are numbered 0..{folds - 1} (data.folds = {folds}).")
    assignment = group_folds(pool.targets, groups, folds, seed)
    empty = [str(k) for k in range(folds) if not (assignment == k).any()]
    if empty:
        raise SpecError(f"{where}: fold(s) {', '.join(empty)} of data.folds = {folds} hold no group; use fewer "
                        "folds.")
    val_fold = (fold + 1) % folds
    training = np.flatnonzero(assignment != fold)
    if split == "test":
        positions = np.flatnonzero(assignment == fold)
    elif split == "val":
        positions = np.flatnonzero(assignment == val_fold)
    else:
        positions = np.flatnonzero((assignment != fold) & (assignment != val_fold))
    _note_unseen_classes(pool, assignment, fold, val_fold, where)
    part = pool.select(positions)
    if split != "test":
        part.carved_from = pool.select(training)  # train + val: the pool a protocol fitting nothing on val uses
    return part


def _note_unseen_classes(pool: ClassificationDataset, assignment: np.ndarray, fold: int, val_fold: int,
                         where: str) -> None:
    """Say once when the test fold holds classes no training item has: slide folds can do that (a tissue
    type from one slide only), and the probe then cannot predict them."""
    train_classes = set(pool.targets[(assignment != fold) & (assignment != val_fold)].tolist())
    test_classes = set(pool.targets[assignment == fold].tolist())
    unseen = sorted(pool.classes[c] for c in test_classes - train_classes)
    if unseen:
        announce_once(f"{where}: fold {fold}: class(es) {count_text(unseen)} of the test fold have no item in "
                      "the training folds, so the probe cannot predict them (their recall is 0 on this fold).")
