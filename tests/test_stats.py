"""pathssl_cli.stats against values worked out by hand or by formulas written here independently."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from pathssl_cli.evaluate.metrics import classification_metrics
from pathssl_cli.stats import (
    PairedPredictions,
    mean_std,
    paired_bootstrap,
    paired_t_interval,
    t_interval,
)

# Two-sided 95% Student-t quantiles t_{0.975, df}, from a printed table (not from scipy).
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


def test_mean_std_by_hand() -> None:
    spread = mean_std([0.80, 0.82, 0.84])
    assert spread.mean == pytest.approx(0.82)
    assert spread.std == pytest.approx(0.02)  # deviations ±0.02, 0: √((4e-4 + 4e-4) / 2)
    assert spread.n == 3 and spread.format() == "82.0 ± 2.0"
    assert mean_std([0.5]).std == 0.0


def test_t_interval_by_hand() -> None:
    interval = t_interval([1.0, 2.0, 3.0])  # mean 2, s 1, n 3
    half = T975[2] * 1.0 / math.sqrt(3)  # 2.484
    assert interval.estimate == 2.0
    assert interval.low == pytest.approx(2.0 - half, abs=1e-3)
    assert interval.high == pytest.approx(2.0 + half, abs=1e-3)
    assert interval.n == 3 and "t over seeds" in interval.method


@pytest.mark.parametrize("n", [2, 5, 10])
def test_t_interval_matches_the_textbook_formula(n: int) -> None:
    values = list(np.random.default_rng(n).normal(0.8, 0.03, n))
    interval = t_interval(values)
    half = T975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    assert interval.estimate == pytest.approx(statistics.fmean(values))
    assert interval.high - interval.estimate == pytest.approx(half, rel=2e-4)  # the table's 4 digits
    assert interval.estimate - interval.low == pytest.approx(half, rel=2e-4)


def test_one_seed_has_no_interval() -> None:
    interval = t_interval([0.7])
    assert math.isnan(interval.low) and math.isnan(interval.high)
    assert interval.format() == "70.0 [no interval: n = 1]"


def test_paired_t_interval_by_hand() -> None:
    # Seeds that move both rows alike (seed 1 is good for both, seed 2 bad for both).
    pathology = {0: 0.80, 1: 0.84, 2: 0.76}
    original = {2: 0.75, 0: 0.78, 1: 0.82}  # another order: pairing is by seed, not by position
    interval = paired_t_interval(pathology, original)
    diffs = [0.02, 0.02, 0.01]
    mean = sum(diffs) / 3
    s = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert interval.estimate == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - T975[2] * s / math.sqrt(3), abs=1e-4)
    assert interval.high == pytest.approx(mean + T975[2] * s / math.sqrt(3), abs=1e-4)
    assert interval.format(signed=True) == f"+1.7 [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"
    # Pairing removes the shared seed effect: unpaired, the rows' own spreads make a wider interval.
    unpaired_half = T975[4] * math.sqrt(statistics.variance(pathology.values()) / 3
                                        + statistics.variance(original.values()) / 3)
    assert interval.high - interval.estimate < unpaired_half


def test_paired_rows_must_share_seeds() -> None:
    with pytest.raises(ValueError, match=r"only in the first \['2'\]"):
        paired_t_interval({0: 0.8, 1: 0.8, 2: 0.8}, {0: 0.7, 1: 0.7})


def _predictions(n: int, accuracy_a: float, accuracy_b: float, seed: int) -> PairedPredictions:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    wrong = (targets + 1) % 3
    a = np.where(rng.random(n) < accuracy_a, targets, wrong)
    b = np.where(rng.random(n) < accuracy_b, targets, wrong)
    return PairedPredictions("test", targets, a, b)


def test_bootstrap_estimate_and_width_match_the_normal_approximation() -> None:
    unit = _predictions(2000, 0.85, 0.80, seed=0)
    interval = paired_bootstrap({0: unit}, replicates=4000, seed=1)
    # Per-item paired differences d ∈ {−1, 0, 1}: the bootstrap mean has std ≈ sd(d, ddof 0) / √N.
    d = (unit.a == unit.targets).astype(float) - (unit.b == unit.targets).astype(float)
    assert interval.estimate == pytest.approx(d.mean())
    half = 1.96 * d.std() / math.sqrt(len(d))
    assert interval.high - interval.low == pytest.approx(2 * half, rel=0.1)
    assert interval.low < d.mean() < interval.high


def test_bootstrap_is_deterministic_given_its_seed() -> None:
    units = {0: _predictions(300, 0.8, 0.75, 0), 1: _predictions(300, 0.8, 0.75, 1)}
    units = {k: PairedPredictions("test", units[0].targets, u.a, u.b) for k, u in units.items()}
    first = paired_bootstrap(units, replicates=500, seed=7)
    assert paired_bootstrap(units, replicates=500, seed=7) == first
    assert paired_bootstrap(dict(reversed(units.items())), replicates=500, seed=7) == first
    assert paired_bootstrap(units, replicates=500, seed=8) != first


def test_seeds_scored_on_one_test_set_share_the_resampled_items() -> None:
    unit = _predictions(400, 0.8, 0.7, seed=2)
    alone = paired_bootstrap({0: unit}, replicates=1000, seed=3)
    # Two seeds whose models predict alike: the same items in each replicate give the same interval. Drawing
    # items independently per seed would average two independent draws and narrow it by ~√2.
    twice = paired_bootstrap({0: unit, 1: unit}, replicates=1000, seed=3)
    assert (twice.low, twice.high) == pytest.approx((alone.low, alone.high))
    # Two folds (different test sets) are independent draws: narrower by ~√2.
    folds = paired_bootstrap({0: unit, 1: PairedPredictions("fold 1", unit.targets, unit.a, unit.b)},
                             replicates=1000, seed=3)
    ratio = (folds.high - folds.low) / (alone.high - alone.low)
    assert ratio == pytest.approx(1 / math.sqrt(2), rel=0.15)


def test_bootstrap_of_identical_rows_is_zero() -> None:
    unit = _predictions(200, 0.8, 0.8, seed=4)
    same = PairedPredictions("test", unit.targets, unit.a, unit.a)
    interval = paired_bootstrap({0: same}, metric="balanced_acc", replicates=200)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_balanced_accuracy_estimate_matches_torchmetrics() -> None:
    unit = _predictions(500, 0.9, 0.6, seed=5)
    interval = paired_bootstrap({0: unit}, metric="balanced_acc", replicates=200)
    onehot = torch.nn.functional.one_hot

    def balanced(pred: np.ndarray) -> float:
        scores = onehot(torch.as_tensor(pred), 3).float()
        return classification_metrics(scores, torch.as_tensor(unit.targets), 3)["balanced_acc"]

    assert interval.estimate == pytest.approx(balanced(unit.a) - balanced(unit.b), abs=1e-6)
    assert interval.low < interval.estimate < interval.high


def test_units_named_alike_must_share_targets() -> None:
    a, b = _predictions(50, 0.8, 0.7, 0), _predictions(50, 0.8, 0.7, 1)
    with pytest.raises(ValueError, match="different targets"):
        paired_bootstrap({0: a, 1: b})


def test_balanced_accuracy_averages_the_classes_present_by_hand() -> None:
    # Class 1 has no item: balanced accuracy is the mean recall over classes 0 and 2.
    targets = np.array([0, 0, 2, 2])
    a = np.array([0, 0, 2, 0])  # recalls 1 and 0.5 → 0.75
    b = np.array([1, 1, 2, 2])  # recalls 0 and 1 → 0.5
    interval = paired_bootstrap({0: PairedPredictions("test", targets, a, b)}, metric="balanced_acc",
                                replicates=50)
    assert interval.estimate == pytest.approx(0.25)
