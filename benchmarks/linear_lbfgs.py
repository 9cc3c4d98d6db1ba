"""Cost of the L-BFGS logistic-regression probe (`probe.kind = "lbfgs"`) and the choices behind it.

On synthetic pooled-CNN-like features (non-negative, per-dimension scales spread over decades, 8 overlapping
classes; 2,000 train and 500 val items × 512 dimensions by default), in one process:
1. solver: one fit per C, scikit-learn's LogisticRegression(lbfgs) (what the probe calls) against
   torch.optim.LBFGS (strong Wolfe, float64) on the same objective C·Σ CE + ½‖W‖², both from zero and run to
   convergence; the ratio torch / scikit-learn of the seconds per fit, and the final objectives (they must
   agree, or the timing compares different work);
2. threads: scikit-learn's fit with BLAS on 1 thread (the probe's setting) against the process default;
3. tolerance: predictions on val of fits with scikit-learn's default tol 1e-4 against the probe's 1e-12, the
   fraction that differ per C;
4. the whole probe: `sweep_logreg` over DINOv2's 45 values of C (+ the refit), on standardised and on raw
   features, against the paper preset's minibatch sweep (36 SGD heads × 100 epochs, batch 256) on the same
   features as the baseline.
Timings are medians of `--rounds` rounds (1-2: one fit each; 4: one run each).

Measured on the shared 2-core machine (load 12-16, so only the ratios mean anything), defaults, --rounds 3:
1. torch / scikit-learn per fit: 2.93 (C 1e-3), 4.26 (C 0.1), 5.17 (C 10), equal objectives (2.85592,
   31.3185, 115.934);
2. default BLAS threads / 1 thread: 20.7;
3. predictions changed by tol 1e-4 instead of 1e-12: 0% (C ≤ 0.01), 1.6% (C 1), 3.4% (C 100), 4.8% (C 1e4);
4. L-BFGS sweep / minibatch sweep (18.7 s): 1.36 standardised (2,222 iterations, no fit at max_iter), 16.2
   raw (34,004 iterations, 31 of 45 fits at max_iter).

    python benchmarks/linear_lbfgs.py [--n-train 2000] [--dim 512] [--classes 8] [--rounds 3] [--skip-raw-sweep]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pathssl_cli.evaluate.logreg import DINOV2_CS, TOL, sweep_logreg
from pathssl_cli.evaluate.probe import HeadConfig, ProbeSchedule, steps_for_epochs, train_probes
from pathssl_cli.evaluate.standardize import Standardizer


def features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(classes, dim)) * 0.15
    scales = np.random.default_rng(4321).lognormal(0.0, 1.0, dim)
    y = np.arange(n) % classes
    x = np.maximum(centres[y] + rng.normal(size=(n, dim)), 0.0) * scales
    return torch.from_numpy(x).float(), torch.from_numpy(y).long()


def median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def objective(x: np.ndarray, y: np.ndarray, coef: np.ndarray, bias: np.ndarray, c: float) -> float:
    z = x @ coef + bias
    z = z - z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(c * ce.sum() + 0.5 * (coef * coef).sum())


def sklearn_fit(x: np.ndarray, y: np.ndarray, c: float, tol: float = TOL, threads: int | None = 1
                ) -> LogisticRegression:
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=1000, tol=tol).fit(x, y)


def torch_fit(x: torch.Tensor, y: torch.Tensor, c: float, classes: int) -> tuple[np.ndarray, np.ndarray]:
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w + b, y, reduction="sum") + 0.5 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-raw-sweep", action="store_true", help="raw features converge slowly (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what the minibatch probe does on a CPU; torch's solver gets the same
    train_x, train_y = features(args.n_train, args.dim, args.classes, seed=0)
    val_x, val_y = features(args.n_val, args.dim, args.classes, seed=1)
    scaler = Standardizer.fit(train_x)
    std_train, std_val = scaler(train_x), scaler(val_x)
    xs, ys, xt = std_train.double().numpy(), train_y.numpy(), std_train.double()
    print(f"{args.n_train} train / {args.n_val} val × {args.dim} features, {args.classes} classes; "
          f"torch threads 1; medians of {args.rounds} rounds")

    print("\n1. one fit, standardised features: torch.optim.LBFGS / scikit-learn")
    for c in (1e-3, 1e-1, 10.0):
        sk_seconds = median_seconds(lambda c=c: sklearn_fit(xs, ys, c), args.rounds)
        th_seconds = median_seconds(lambda c=c: torch_fit(xt, train_y, c, args.classes), args.rounds)
        model = sklearn_fit(xs, ys, c)
        w, b = torch_fit(xt, train_y, c, args.classes)
        sk_objective = objective(xs, ys, model.coef_.T, model.intercept_, c)
        print(f"  C={c:<6g} scikit-learn {sk_seconds:.3f} s ({int(model.n_iter_[0])} it), torch {th_seconds:.3f} s: "
              f"ratio {th_seconds / sk_seconds:.2f}; objectives {sk_objective:.6g} / {objective(xs, ys, w, b, c):.6g}")

    print("\n2. one scikit-learn fit (C = 0.1): BLAS on 1 thread / process default")
    one = median_seconds(lambda: sklearn_fit(xs, ys, 0.1, threads=1), args.rounds)
    default = median_seconds(lambda: sklearn_fit(xs, ys, 0.1, threads=None), args.rounds)
    print(f"  1 thread {one:.3f} s, default {default:.3f} s: ratio default / 1 thread {default / one:.2f}")

    print("\n3. val predictions that change between tol 1e-4 (scikit-learn's default) and 1e-12 (the probe's)")
    xv = std_val.double().numpy()
    for c in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        loose = sklearn_fit(xs, ys, c, tol=1e-4).predict(xv)
        tight = sklearn_fit(xs, ys, c, tol=TOL).predict(xv)
        print(f"  C={c:<6g} {100 * float(np.mean(loose != tight)):.1f}% differ")

    print("\n4. whole probe: DINOv2's 45 values of C + refit, against the paper preset's minibatch sweep")
    heads = [HeadConfig(lr, wd, seed) for seed in (0, 1, 2) for lr in (1e-2, 1e-1, 1.0, 10.0)
             for wd in (0.0, 1e-5, 1e-4)]
    batch = min(256, args.n_train)
    schedule = ProbeSchedule("sgd", steps_for_epochs(100, args.n_train, batch), batch,
                             eval_every=max(1, -(-args.n_train // batch)))
    baseline = median_seconds(
        lambda: train_probes(std_train, train_y, std_val, val_y, args.classes, heads, schedule), 1)
    print(f"  minibatch sweep (36 heads × 100 epochs): {baseline:.1f} s")
    runs = [("standardised", std_train, std_val)]
    if not args.skip_raw_sweep:
        runs.append(("raw", train_x, val_x))
    for name, tx, vx in runs:
        start = time.perf_counter()
        sweep = sweep_logreg(tx, train_y, vx, val_y, args.classes, cs=DINOV2_CS)
        seconds = time.perf_counter() - start
        print(f"  lbfgs on {name} features: {seconds:.1f} s = {seconds / baseline:.2f} × the minibatch sweep; "
              f"{sum(sweep.n_iter)} iterations, {sum(not ok for ok in sweep.converged)} of 45 fits at max_iter; "
              f"best C {sweep.cs[sweep.best]:.3g}, val top-1 {sweep.val[sweep.best]:.3f}")


if __name__ == "__main__":
    main()
