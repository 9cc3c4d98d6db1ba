"""Statistics for result tables: mean ± std and confidence intervals over seeds, and paired differences.

Pure functions of numbers and predictions; the study and report code decide what to feed them.

Which interval a table should report. A comparison such as `pathology − original` varies for two reasons:
the seeds (pre-training and probe initialisation, data order) and the finite test set. The two intervals here
each see one of them:
- `paired_t_interval`: a t-interval over the per-seed differences of two rows that share seeds (seed s of row A
  against seed s of row B, scored on the same test set). It measures how much the difference moves from seed
  to seed, which is what decides whether a technique helps; with 3 seeds t₀.₉₇₅ = 4.30 makes it wide, but
  it is honest about how little 3 runs show, and it assumes the differences are roughly normal.
- `paired_bootstrap`: resamples the test items (the same items for both rows, and for every seed scored on
  that test set) and recomputes the mean difference; percentile interval. It measures how much the difference
  would move on another test set of the same size from the same distribution, *given these trained models*:
  it ignores seed-to-seed variance, so with a few seeds that disagree it is too narrow. Caveat for tiles:
  resampling tiles treats them as independent, which tiles of one slide are not; on slide-grouped data it
  is optimistic unless the units resampled are slides.
Tables should report the paired t-interval over seeds as the headline (the question is whether the method
helps across runs, not whether these particular models differ on this test set) and name it; the bootstrap
is a complement where seeds are too few for a t-interval to say anything, and must be labelled as "test-item
variation only". Both are computed for the same difference, row A minus row B, so they can sit side by side.

Values are whatever unit the caller uses (fractions in [0, 1] in metrics.json); std is the sample standard
deviation (ddof 1), as metrics.json reports. With one seed no interval exists: the bounds are NaN and
`format` says so instead of printing a zero-width interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats

BootstrapMetric = Literal["top1", "balanced_acc"]

#: Resampled positions held at once (replicates per block × test items): ~100 MB of working arrays whatever
#: `replicates` and the test set's size.
_BLOCK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of `n` values."""

    mean: float
    std: float
    n: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """"83.5 ± 1.2" (values × scale, e.g. fractions as %)."""
        return f"{scale * self.mean:.{digits}f} ± {scale * self.std:.{digits}f}"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval, and how it was computed."""

    estimate: float
    low: float  # NaN when no interval exists (one seed)
    high: float
    n: int  # seeds (t-intervals) or units (bootstrap) the interval rests on
    method: str
    confidence: float = 0.95

    def format(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """"+1.3 [−0.4, +3.0]" with `signed` (differences), "83.5 [81.0, 86.0]" without; × scale."""
        sign = "+" if signed else ""
        head = f"{scale * self.estimate:{sign}.{digits}f}"
        if math.isnan(self.low):
            return f"{head} [no interval: n = {self.n}]"
        return f"{head} [{scale * self.low:{sign}.{digits}f}, {scale * self.high:{sign}.{digits}f}]"


def mean_std(values: Sequence[float]) -> Spread:
    """Mean ± sample std (ddof 1) of per-seed values; std 0 for a single value."""
    array = _finite(values)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return Spread(float(array.mean()), std, len(array))


def t_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t over seeds") -> Interval:
    """Student-t interval of the mean of per-seed values: mean ± t_{n−1, (1+confidence)/2} · s / √n."""
    array = _finite(values)
    n = len(array)
    mean = float(array.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, method, confidence)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * float(array.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method, confidence)


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> np.ndarray:
    """Per-seed differences a[s] − b[s], in sorted seed order; both rows must have exactly the same seeds."""
    if set(a) != set(b):
        only_a, only_b = sorted(map(str, set(a) - set(b))), sorted(map(str, set(b) - set(a)))
        raise ValueError(f"paired rows need the same seeds: only in the first {only_a}, only in the second "
                         f"{only_b}; run the missing seeds or compare unpaired")
    seeds = sorted(a, key=str)
    return np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)


def paired_t_interval(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = 0.95) -> Interval:
    """t-interval of the mean per-seed difference a − b between two rows sharing seeds and test sets."""
    return t_interval(list(paired_differences(a, b)), confidence, method="paired t over seeds")


@dataclass(frozen=True)
class PairedPredictions:
    """One unit (a seed, or a (seed, fold)) of two rows scored on the same test items.

    Units naming the same `test_set` are resampled with the same items in each bootstrap replicate (they
    are one draw of test items scored by several models); different test sets (folds) are resampled
    independently.
    """

    test_set: str
    targets: np.ndarray  # (N,) int class indices
    a: np.ndarray  # (N,) predicted classes of row A
    b: np.ndarray  # (N,) predicted classes of row B


def paired_bootstrap(
    units: Mapping[Hashable, PairedPredictions],
    metric: BootstrapMetric = "top1",
    replicates: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap over test items of mean over units of metric(A) − metric(B).

    `top1`: accuracy; `balanced_acc`: mean recall over the classes present in the (resampled) targets, which
    equals metrics.json's balanced_acc whenever every predicted class occurs in the targets. Deterministic
    given `seed`.
    """
    if not units:
        raise ValueError("paired_bootstrap needs at least one unit of predictions")
    by_set: dict[str, list[PairedPredictions]] = {}
    for unit in units.values():
        if not (unit.targets.shape == unit.a.shape == unit.b.shape) or unit.targets.ndim != 1:
            raise ValueError(f"test set {unit.test_set!r}: targets and both rows' predictions must be (N,) "
                             "arrays of one length")
        first = by_set.setdefault(unit.test_set, [unit])[0]
        if first is not unit:
            if not np.array_equal(first.targets, unit.targets):
                raise ValueError(f"test set {unit.test_set!r}: units named alike have different targets; name "
                                 "each distinct test set differently")
            by_set[unit.test_set].append(unit)
    n_units = sum(len(group) for group in by_set.values())
    estimate = sum(_metric_difference(u, None, metric)[0] for g in by_set.values() for u in g) / n_units
    rng = np.random.default_rng(seed)
    draws = np.empty(replicates, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(len(g[0].targets) for g in by_set.values()))
    for start in range(0, replicates, block):
        count = min(block, replicates - start)
        total = np.zeros(count)
        for name in sorted(by_set):  # a fixed order of draws: deterministic whatever the mapping's order
            group = by_set[name]
            items = rng.integers(0, len(group[0].targets), size=(count, len(group[0].targets)))
            for unit in group:
                total += _metric_difference(unit, items, metric)
        draws[start:start + count] = total / n_units
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1.0 - alpha / 2])
    return Interval(float(estimate), float(low), float(high), n_units,
                    f"paired bootstrap over test items ({replicates} replicates)", confidence)


def _metric_difference(unit: PairedPredictions, items: np.ndarray | None, metric: BootstrapMetric) -> np.ndarray:
    """metric(A) − metric(B) for each row of `items` (R, N) resampled positions; None = the items as given."""
    targets = unit.targets.astype(np.int64)
    if items is None:
        items = np.arange(len(targets))[None, :]
    correct_a = (unit.a == targets).astype(np.float64)[items]  # (R, N)
    correct_b = (unit.b == targets).astype(np.float64)[items]
    if metric == "top1":
        return (correct_a - correct_b).mean(axis=1)
    classes = int(targets.max()) + 1
    rows = np.arange(items.shape[0])[:, None] * classes
    flat = (rows + targets[items]).ravel()
    size = items.shape[0] * classes
    support = np.bincount(flat, minlength=size).reshape(-1, classes)
    hits_a = np.bincount(flat, weights=correct_a.ravel(), minlength=size).reshape(-1, classes)
    hits_b = np.bincount(flat, weights=correct_b.ravel(), minlength=size).reshape(-1, classes)
    present = support > 0
    recall_gap = np.where(present, (hits_a - hits_b) / np.maximum(support, 1), 0.0)
    return recall_gap.sum(axis=1) / present.sum(axis=1)


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) == 0 or not np.isfinite(array).all():
        raise ValueError(f"need one or more finite values, got {list(values)}")
    return array
