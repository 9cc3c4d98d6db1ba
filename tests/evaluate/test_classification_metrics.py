"""Metrics against confusion matrices worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pathssl_cli.evaluate.metrics import (
    classification_metrics,
    confusion_matrix,
    per_class_table,
    plot_confusion_matrix,
    write_per_class_csv,
)


def one_hot_scores(preds: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float()


def test_three_class_by_hand() -> None:
    # true:  0 0 0 0 1 1 2 2 2 2
    # pred:  0 0 1 2 1 1 2 2 0 2
    # confusion (rows true): [[2,1,1],[0,2,0],[1,0,3]]
    # recall: 2/4, 2/2, 3/4 -> balanced (0.5+1+0.75)/3 = 0.75; top1 = 7/10
    # precision: 2/3, 2/3, 3/4; F1: c0 2*(2/3*1/2)/(2/3+1/2) = 4/7, c1 2*(2/3*1)/(5/3) = 4/5,
    #   c2 2*(3/4*3/4)/(3/2) = 3/4 -> macro F1 (4/7 + 4/5 + 3/4)/3
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = [0, 0, 1, 2, 1, 1, 2, 2, 0, 2]
    got = classification_metrics(one_hot_scores(preds, 3), targets, 3)
    assert got["top1"] == pytest.approx(0.7)
    assert got["balanced_acc"] == pytest.approx(0.75)
    assert got["macro_f1"] == pytest.approx((4 / 7 + 4 / 5 + 3 / 4) / 3, rel=1e-6)
    assert "auroc" not in got
    cm = confusion_matrix(torch.tensor(preds), targets, 3)
    assert cm.tolist() == [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
    rows = per_class_table(cm, ["a", "b", "c"])
    assert [r["support"] for r in rows] == [4, 2, 4]
    assert rows[0]["precision"] == pytest.approx(2 / 3) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[2]["f1"] == pytest.approx(0.75)


def test_binary_auroc_by_hand() -> None:
    # positives scored 0.9, 0.4; negatives 0.6, 0.1: pairs (pos > neg): (0.9>0.6),(0.9>0.1),(0.4>0.1) = 3 of 4
    p = torch.tensor([0.9, 0.4, 0.6, 0.1])
    targets = torch.tensor([1, 1, 0, 0])
    probs = torch.stack([1 - p, p], dim=1)
    got = classification_metrics(probs, targets, 2)
    assert got["auroc"] == pytest.approx(0.75)
    # Logits that rank the samples the same way give the same AUROC.
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=1)
    assert classification_metrics(logits, targets, 2)["auroc"] == pytest.approx(0.75)
    # predictions at 0.5: [1, 0, 1, 0] -> top1 2/4
    assert got["top1"] == pytest.approx(0.5)


def test_binary_auroc_does_not_tie_confident_logits() -> None:
    # A float32 softmax rounds every margin s1 - s0 above ~17 to exactly 1: these six samples all tied and
    # AUROC came out 0.5. By hand: positives 19, 21, 22, 23 against negatives 18, 20 win 7 of 8 pairs.
    margins = torch.tensor([18.0, 19, 20, 21, 22, 23])
    targets = torch.tensor([0, 1, 0, 1, 1, 1])
    logits = torch.stack([torch.full((6,), -5.0), margins - 5.0], dim=1)
    assert classification_metrics(logits, targets, 2)["auroc"] == pytest.approx(7 / 8)
    # Ties stay ties (each tied pair counts one half): positives 1, 1 against negatives 1, 0 -> 3 of 4 pairs.
    tied = torch.stack([torch.zeros(4), torch.tensor([1.0, 1.0, 1.0, 0.0])], dim=1)
    assert classification_metrics(tied, torch.tensor([1, 1, 0, 0]), 2)["auroc"] == pytest.approx(0.75)


def test_outputs_written(tmp_path: Path) -> None:
    cm = np.array([[3, 1], [0, 4]])
    rows = per_class_table(cm, ["neg", "pos"])
    write_per_class_csv(rows, tmp_path / "per_class.csv")
    lines = (tmp_path / "per_class.csv").read_text().splitlines()
    assert lines[0] == "class,support,predicted,precision,recall,f1"
    assert lines[2].startswith("pos,4,5,0.800000,1.000000,")
    plot_confusion_matrix(cm, ["neg", "pos"], tmp_path / "cm.png", title="t")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
