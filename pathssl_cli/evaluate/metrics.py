"""Classification metrics shared by the linear, fine-tune and kNN protocols.

Top-1 accuracy is what Kang et al. (CVPR 2023) report; balanced accuracy (mean per-class recall) is what eva
reports; macro-F1 is robust to the class imbalance of MHIST and BACH's small test split; AUROC is only defined
here for binary tasks (PCam, MHIST), computed on the positive class's probability.

All scalar metrics come from torchmetrics so that they match what other toolkits compute. Macro averages
follow torchmetrics: a class with no sample in the targets and no prediction is left out of the mean.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from pathssl_cli.fileio import atomic_path, atomic_write

METRIC_NAMES = ("top1", "balanced_acc", "macro_f1", "auroc")


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Scalar metrics of one evaluation.

    scores: (N, C) logits or probabilities (argmax gives the prediction; AUROC ranks `binary_ranking_score`);
    targets: (N,) int64 in [0, C).
    Returns top1, balanced_acc, macro_f1, and auroc when C == 2, all as fractions in [0, 1].
    """
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (N, {num_classes}), got {tuple(scores.shape)}")
    scores = scores.detach().float().cpu()
    targets = targets.detach().long().cpu()
    preds = scores.argmax(dim=1)
    out = {
        "top1": MulticlassAccuracy(num_classes=num_classes, average="micro")(preds, targets).item(),
        "balanced_acc": MulticlassAccuracy(num_classes=num_classes, average="macro")(preds, targets).item(),
        "macro_f1": MulticlassF1Score(num_classes=num_classes, average="macro")(preds, targets).item(),
    }
    if num_classes == 2:
        out["auroc"] = BinaryAUROC()(binary_ranking_score(scores), targets).item()
    return out


def binary_ranking_score(scores: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits or probabilities → (N,) float64 in [0, 1] that orders the samples as the positive class's
    probability does, ties included: AUROC depends on nothing else.

    The margin s1 - s0 orders logits as their softmax does (softmax(s)[:, 1] = sigmoid(s1 - s0)) and
    probabilities as p1 (p1 - p0 = 2 p1 - 1). It is not passed through a sigmoid: in float32 every margin above
    about 17 rounds to exactly 1, which tied the confident samples of a good probe and pulled AUROC towards
    accuracy. Its dense rank keeps the order exactly and lies in [0, 1], where torchmetrics takes scores as
    probabilities rather than applying its own sigmoid.
    """
    margin = scores[:, 1].double() - scores[:, 0].double()
    _, rank = torch.unique(margin, return_inverse=True)
    return rank.double() / max(int(rank.max().item()) if rank.numel() else 0, 1)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    cm = MulticlassConfusionMatrix(num_classes=num_classes)(preds.long().cpu(), targets.long().cpu())
    return cm.numpy().astype(np.int64)


def per_class_table(cm: np.ndarray, class_names: list[str]) -> list[dict[str, float | int | str]]:
    """Precision, recall and F1 per class from a confusion matrix (0 where undefined, like torchmetrics)."""
    rows: list[dict[str, float | int | str]] = []
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        support = int(cm[c, :].sum())
        predicted = int(cm[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "support": support,
                "predicted": predicted,
                "precision": precision,
                "recall": recall,
                "f1": f1,
            }
        )
    return rows


def write_per_class_csv(rows: list[dict[str, float | int | str]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["class", "support", "predicted", "precision", "recall", "f1"], lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    atomic_write(path, buffer.getvalue())


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path, title: str = "") -> None:
    """Row-normalised colours (recall per true class) with the raw counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    row_sums = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, row_sums, out=np.zeros_like(cm, dtype=float), where=row_sums > 0)
    size = max(4.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if normalised[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
