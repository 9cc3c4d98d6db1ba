"""The study's statistics (`pathssl_cli.study.tables`) against tables worked out by hand: replicates as fold
means, mean ± std, t-intervals, paired differences against the reference row, and what is left out."""

from __future__ import annotations

import math

import pytest

from pathssl_cli.study.report_files import cell_text, difference_text
from pathssl_cli.study.tables import Result, summarise

# Two-sided 95% Student-t quantiles t_{0.975, df} from a printed table (not from scipy).
T975 = {1: 12.706, 2: 4.303}


def results(row: str, values: dict[int, list[float]], *, column: str = "linear 100%", metric: str = "top1",
            deterministic: bool = False) -> list[Result]:
    """seed -> one value per fold (fold k is the k-th value)."""
    return [Result("linear", metric, row, column, v, seed, fold if len(vs) > 1 else None, len(vs), deterministic)
            for seed, vs in values.items() for fold, v in enumerate(vs)]


def test_fold_means_are_the_replicates_and_the_interval_is_over_seeds() -> None:
    # Three seeds × three folds. Replicates (fold means): 0.80, 0.84, 0.76.
    found = results("pathology", {0: [0.70, 0.80, 0.90], 1: [0.74, 0.84, 0.94], 2: [0.66, 0.76, 0.86]})
    cell = summarise(found, None, set()).cells["linear", "top1"]["pathology"]["linear 100%"]
    assert cell.replicates == pytest.approx({0: 0.80, 1: 0.84, 2: 0.76})
    assert cell.spread.mean == pytest.approx(0.80) and cell.spread.n == 3 and cell.folds == 3
    assert cell.spread.std == pytest.approx(0.04)  # deviations 0, +0.04, -0.04: √(0.0032 / 2)
    half = T975[2] * 0.04 / math.sqrt(3)  # 0.0994: the folds' spread (±0.10) is not in it
    assert (cell.interval.low, cell.interval.high) == pytest.approx((0.80 - half, 0.80 + half), abs=1e-4)
    assert cell_text(cell) == "80.0 ± 4.0 [70.1, 89.9] (3)"


def test_paired_difference_against_the_reference_by_hand() -> None:
    # Seed 1 is good for both rows and seed 2 bad for both: pairing takes that shared part out.
    found = [*results("pathology", {0: [0.80], 1: [0.84], 2: [0.76]}),
             *results("original", {2: [0.75], 0: [0.78], 1: [0.82]})]
    tables = summarise(found, "original", set())
    cell = tables.cells["linear", "top1"]["pathology"]["linear 100%"]
    differences = [0.02, 0.02, 0.01]
    mean = sum(differences) / 3
    s = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    assert cell.difference is not None and cell.difference.n == 3
    assert cell.difference.estimate == pytest.approx(mean)
    assert cell.difference.low == pytest.approx(mean - T975[2] * s / math.sqrt(3), abs=1e-4)
    assert cell.difference.high == pytest.approx(mean + T975[2] * s / math.sqrt(3), abs=1e-4)
    assert difference_text(cell.difference) == "+1.7 [+0.2, +3.1] (3)"
    assert tables.cells["linear", "top1"]["original"]["linear 100%"].difference is None  # not against itself
    assert not tables.notes


def test_a_replicate_missing_a_fold_is_left_out_and_named() -> None:
    found = results("original", {0: [0.6, 0.8], 1: [0.7, 0.9], 2: [0.5, 0.7]})
    found = [r for r in found if not (r.seed == 2 and r.fold == 1)]  # seed 2's second fold did not finish
    tables = summarise(found, None, set())
    cell = tables.cells["linear", "top1"]["original"]["linear 100%"]
    assert cell.replicates == pytest.approx({0: 0.7, 1: 0.8}) and cell.incomplete == (2,)
    assert cell.spread.mean == pytest.approx(0.75)  # not (0.7 + 0.8 + 0.5) / 3: seed 2 saw one test fold only
    assert any("seed(s) [2] left out" in note and "2 folds planned" in note for note in tables.notes)


def test_differences_pair_only_the_seeds_both_rows_have() -> None:
    found = [*results("pathology", {0: [0.80], 1: [0.90], 2: [0.10]}), *results("original", {0: [0.70], 1: [0.85]})]
    tables = summarise(found, "original", set())
    difference = tables.cells["linear", "top1"]["pathology"]["linear 100%"].difference
    assert difference is not None and difference.n == 2
    assert difference.estimate == pytest.approx((0.10 + 0.05) / 2)  # seed 2 has nothing to pair with
    half = T975[1] * math.sqrt(((0.10 - 0.075) ** 2 + (0.05 - 0.075) ** 2) / 1) / math.sqrt(2)
    assert difference.high - difference.estimate == pytest.approx(half, rel=1e-3)
    assert any("pairs the 2 seed(s) both rows have" in note for note in tables.notes)
    lonely = summarise([*results("a", {5: [0.8]}), *results("original", {0: [0.7]})], "original", set())
    assert lonely.cells["linear", "top1"]["a"]["linear 100%"].difference is None
    assert any("no seed in common" in note for note in lonely.notes)


def test_a_deterministic_weights_file_is_one_value_compared_with_every_replicate() -> None:
    # An ImageNet file under kNN: one run, the same for any seed; the reference has three pre-training seeds.
    found = [*results("imagenet", {0: [0.70]}, deterministic=True),
             *results("original", {0: [0.78], 1: [0.82], 2: [0.74]})]
    tables = summarise(found, "original", {"imagenet"})
    cell = tables.cells["linear", "top1"]["imagenet"]["linear 100%"]
    assert cell.constant and cell_text(cell) == "70.0 (deterministic)"
    differences = [0.70 - 0.78, 0.70 - 0.82, 0.70 - 0.74]  # -0.08, -0.12, -0.04: the reference's spread only
    assert cell.difference is not None and cell.difference.n == 3
    assert cell.difference.estimate == pytest.approx(-0.08)
    half = T975[2] * 0.04 / math.sqrt(3)
    assert (cell.difference.low, cell.difference.high) == pytest.approx((-0.08 - half, -0.08 + half), abs=1e-4)
    assert sum(differences) / 3 == pytest.approx(cell.difference.estimate)
    # A row of fixed weights under a stochastic probe is not constant: its seeds are replicates.
    stochastic = summarise(results("imagenet", {0: [0.70], 1: [0.72]}), None, {"imagenet"})
    assert not stochastic.cells["linear", "top1"]["imagenet"]["linear 100%"].constant


def test_one_replicate_has_no_interval() -> None:
    cell = summarise(results("a", {0: [0.5, 0.7]}), None, set()).cells["linear", "top1"]["a"]["linear 100%"]
    assert cell.spread.mean == pytest.approx(0.6) and math.isnan(cell.interval.low)
    assert cell_text(cell) == "60.0 ± 0.0 [no interval: n = 1] (1)"
