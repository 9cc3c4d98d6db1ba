"""The L-BFGS logistic-regression probe and the feature standardisation (`probe.kind`, `features.normalize`).

The probe calls scikit-learn, so scikit-learn is not an independent reference for it; these tests check the
fitted model against the objective itself (its gradient, written out here in float64, vanishes at the optimum),
against a second solver (torch.optim.LBFGS on the same objective), and check the protocol around it: C chosen
on val only, the refit on train + val, and statistics taken from the training split only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from pathssl_cli.evaluate.logreg import DINOV2_CS, fit_logreg, lbfgs_probe, sweep_logreg
from pathssl_cli.evaluate.standardize import Standardizer
from pathssl_cli.specs.evaluate import LinearProbe


def blobs(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes around random centres; `spread` large = overlapping classes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1000))
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, dim, generator=gen)
    return x.float(), y.long()


def objective_gradient(x: np.ndarray, y: np.ndarray, coef: np.ndarray, bias: np.ndarray, c: float) -> np.ndarray:
    """∂/∂(W, b) of C·Σ CE(softmax(x Wᵀ + b), y) + ½‖W‖², float64, written independently of the probe."""
    z = x @ coef.T + bias
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    grad_w = c * p.T @ x + coef
    grad_b = c * p.sum(axis=0)
    return np.concatenate([grad_w.ravel(), grad_b])


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_fit_is_the_optimum_of_the_documented_objective(c: float) -> None:
    x, y = blobs(120, 6, 3, spread=2.0, seed=0)
    fit = fit_logreg(x, y, c)
    assert fit.converged
    coef, bias = fit.model.coef_, fit.model.intercept_
    grad = objective_gradient(x.double().numpy(), y.numpy(), coef, bias, c)
    # At the optimum the gradient vanishes; the scale of its terms is C·N (the loss) and ‖W‖ (the penalty).
    scale = c * len(y) + np.abs(coef).sum()
    assert np.abs(grad).max() < 1e-6 * scale
    # The check can fail: the same fit is far from the optimum of the objective with 1/C in place of C.
    wrong = objective_gradient(x.double().numpy(), y.numpy(), coef, bias, 1.0 / c)
    assert np.abs(wrong).max() > 1e-3 * (len(y) / c + np.abs(coef).sum())


def test_fit_agrees_with_torch_lbfgs_on_the_same_objective() -> None:
    x, y = blobs(150, 8, 4, spread=1.5, seed=1)
    c = 0.5
    fit = fit_logreg(x, y, c)
    xd = x.double()
    w = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * F.cross_entropy(xd @ w + b, y, reduction="sum") + 0.5 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    test_x, _ = blobs(300, 8, 4, spread=1.5, seed=2)
    ours = fit.scores(test_x, 4).argmax(dim=1)
    theirs = (test_x.double() @ w.detach() + b.detach()).argmax(dim=1)
    assert torch.equal(ours, theirs)
    np.testing.assert_allclose(fit.model.coef_, w.detach().numpy().T, atol=1e-5)


def test_binary_fit_is_the_optimum_of_the_one_logit_objective() -> None:
    x, y = blobs(80, 5, 2, spread=2.0, seed=3)
    c = 0.3
    fit = fit_logreg(x, y, c)
    w, b = fit.model.coef_[0], fit.model.intercept_[0]
    xd, s = x.double().numpy(), 2.0 * y.numpy() - 1.0  # labels as ±1
    # C·Σ log(1 + exp(-s·z)) + ½‖w‖²: ∂/∂w = -C·Σ s·σ(-s·z)·x + w
    z = xd @ w + b
    weight = -s / (1.0 + np.exp(s * z))
    grad = np.concatenate([c * weight @ xd + w, [c * weight.sum()]])
    assert np.abs(grad).max() < 1e-6 * (c * len(s) + np.abs(w).sum())
    scores = fit.scores(x, 2)
    assert scores.shape == (80, 2)
    torch.testing.assert_close(scores.exp().sum(dim=1), torch.ones(80))


def test_separable_classes_are_classified_perfectly() -> None:
    train = blobs(90, 10, 3, spread=0.05, seed=4)
    val = blobs(30, 10, 3, spread=0.05, seed=5)
    test = blobs(60, 10, 3, spread=0.05, seed=6)
    sweep = sweep_logreg(*train, *val, 3, cs=(1e-2, 1.0, 100.0))
    assert max(sweep.val) == 1.0
    assert (sweep.final.scores(test[0], 3).argmax(dim=1) == test[1]).all()


def test_class_absent_from_training_gets_no_probability() -> None:
    x, y = blobs(60, 4, 3, spread=0.5, seed=7)
    keep = y != 1
    fit = fit_logreg(x[keep], y[keep], 1.0)
    scores = fit.scores(x, 3)
    assert torch.isinf(scores[:, 1]).all() and (scores[:, 1] < 0).all()
    assert torch.isfinite(scores[:, [0, 2]]).all()


def test_c_is_chosen_on_val_never_on_the_evaluation_split() -> None:
    train = blobs(60, 20, 3, spread=2.5, seed=8)
    val = blobs(60, 20, 3, spread=2.5, seed=9)
    cs = (1e-4, 1e-2, 1.0, 100.0)
    # The choice, re-derived independently: each C fitted by scikit-learn directly, scored on val by hand.
    val_acc = []
    for c in cs:
        model = LogisticRegression(C=c, max_iter=1000, tol=1e-12).fit(train[0].double().numpy(), train[1].numpy())
        val_acc.append(float((model.predict(val[0].double().numpy()) == val[1].numpy()).mean()))
    expected = cs[int(np.argmax(val_acc))]
    probe = LinearProbe(kind="lbfgs", cs=list(cs))
    # Whatever the evaluation split holds (val itself, other items, shuffled labels), C and its val score stay.
    for evaluation in (blobs(40, 20, 3, 2.5, 10), (val[0], val[1].roll(1)), (train[0] * -1.0, train[1])):
        per_seed, scores, rows, _ = lbfgs_probe(probe, "top1", train, val, evaluation, 3, [0], False)
        assert per_seed[0]["C"] == expected and per_seed[0]["val_top1"] == pytest.approx(max(val_acc))
        assert [r["val_top1"] for r in rows] == pytest.approx(val_acc)
        assert scores.shape == (len(evaluation[1]), 3)


def test_refit_on_train_and_val_unless_val_is_the_evaluation_split() -> None:
    train = blobs(60, 6, 3, spread=1.5, seed=11)
    val = blobs(30, 6, 3, spread=1.5, seed=12)
    probe = LinearProbe(kind="lbfgs", cs=[0.1])
    both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    reference = fit_logreg(*both, 0.1)
    test = blobs(50, 6, 3, spread=1.5, seed=13)
    _, scores, _, settings = lbfgs_probe(probe, "top1", train, val, test, 3, [0], eval_is_val=False)
    assert settings["refit_on"] == "train+val"
    torch.testing.assert_close(scores, reference.scores(test[0], 3), rtol=1e-5, atol=1e-5)
    # Scored on val itself: a refit would train on the scored items, so the train-only fit is kept.
    _, scores, _, settings = lbfgs_probe(probe, "top1", train, val, val, 3, [0], eval_is_val=True)
    assert settings["refit_on"] == "train"
    torch.testing.assert_close(scores, fit_logreg(*train, 0.1).scores(val[0], 3), rtol=1e-5, atol=1e-5)


def test_one_fit_serves_every_seed() -> None:
    train, val, test = blobs(30, 4, 2, 1.0, 14), blobs(20, 4, 2, 1.0, 15), blobs(20, 4, 2, 1.0, 16)
    per_seed, _, rows, settings = lbfgs_probe(LinearProbe(kind="lbfgs", cs=[1.0, 10.0]), "balanced_acc",
                                              train, val, test, 2, [5, 6, 7], False)
    assert [row["seed"] for row in per_seed] == [5] and settings["seeds_fitted"] == [5]
    assert len(rows) == 2 and "val_balanced_acc" in per_seed[0] and "auroc" in per_seed[0]


def test_dinov2_grid() -> None:
    # DINOv2's C_POWER_RANGE = torch.linspace(-6, 5, 45), written out independently.
    expected = [10.0 ** (-6 + 11 * i / 44) for i in range(45)]
    assert DINOV2_CS == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------- standardisation
def test_standardizer_uses_training_statistics_only() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(50, 4, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 5.0
    other = torch.randn(20, 4, generator=gen) * 7.0 - 40.0  # a val/test split with other statistics
    scaler = Standardizer.fit(train)
    t = train.double().numpy()
    mean, std = t.mean(axis=0), t.std(axis=0, ddof=0)  # BatchNorm's and StandardScaler's biased std
    expected = (other.double().numpy() - mean) / std
    np.testing.assert_allclose(scaler(other).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Standardised with its own statistics instead, the other split would have mean 0 and std 1:
    assert np.abs(scaler(other).numpy().mean(axis=0)).min() > 1.0
    assert scaler.n_fit == 50 and scaler.describe()["statistics_from"] == "train"


def test_constant_training_dimension_is_centred_not_blown_up() -> None:
    train = torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 3.0]], dtype=torch.float32)
    scaler = Standardizer.fit(train)
    assert scaler.constant_dims == 1
    out = scaler(torch.tensor([[0.1001, 2.0]]))
    assert abs(float(out[0, 0])) < 1e-3  # divided by ~0 it would be ~1e4


def test_normalised_probe_ignores_the_scale_of_a_dimension() -> None:
    train, val, test = blobs(90, 8, 3, 1.5, 17), blobs(45, 8, 3, 1.5, 18), blobs(60, 8, 3, 1.5, 19)
    stretch = torch.ones(8)
    stretch[2] = 1000.0

    def predictions(factor: torch.Tensor, normalize: bool) -> tuple[float, torch.Tensor]:
        xs = [x * factor for x in (train[0], val[0], test[0])]
        if normalize:
            scaler = Standardizer.fit(xs[0])
            xs = [scaler(x) for x in xs]
        sweep = sweep_logreg(xs[0], train[1], xs[1], val[1], 3, cs=(1e-3, 1e-2, 0.1, 1.0))
        return sweep.cs[sweep.best], sweep.final.scores(xs[2], 3).argmax(dim=1)

    c_plain, pred_plain = predictions(torch.ones(8), normalize=True)
    c_stretched, pred_stretched = predictions(stretch, normalize=True)
    assert c_plain == c_stretched and torch.equal(pred_plain, pred_stretched)
    # The test can fail: on raw features the same stretch changes what the regularised probe predicts.
    raw_c, raw_pred = predictions(torch.ones(8), normalize=False)
    raw_c2, raw_pred2 = predictions(stretch, normalize=False)
    assert raw_c != raw_c2 or not torch.equal(raw_pred, raw_pred2)
