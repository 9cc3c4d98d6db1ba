"""`probe.kind = "lbfgs"`: multinomial logistic regression fitted full-batch by L-BFGS, its L2 strength chosen
on val.

The protocol is DINOv2's logistic-regression evaluation (facebookresearch/dinov2, dinov2/eval/log_regression.py,
"the 'standard' process for log regression evaluation"), the descendant of CLIP's linear probe (Radford et al.
2021, appendix A.3: scikit-learn's L-BFGS, 1,000 iterations, λ swept on val over 10⁻⁶..10⁶):
- objective: C · Σᵢ cross-entropy(W xᵢ + b, yᵢ) + ½ ‖W‖²_F, bias not penalised (the LogisticRegression of
  scikit-learn and of cuML, which DINOv2 calls); a binary task fits one logit, as both libraries do;
- C swept over `DINOV2_CS` = 10^linspace(-6, 5, 45) (DINOv2's C_POWER_RANGE), each fit from zero;
- at most `MAX_ITER` = 1,000 L-BFGS iterations (DINOv2's DEFAULT_MAX_ITER, CLIP's and UNI's max_iter) with
  tolerance `TOL` = 1e-12 (DINOv2's `tol`), in float64 (DINOv2's train_dtype). With so small a gradient
  tolerance a fit ends when the objective stops decreasing (scipy's ftol, 64 ε relative) or at max_iter, so
  the model is the objective's optimum rather than wherever the solver stopped: scikit-learn's default tol of
  1e-4 stops fits with C ≥ 1 early enough to change 1.6-4.8% of val predictions (benchmarks/linear_lbfgs.py);
- the C with the best val score (`select_by`; the smallest C wins a tie, the stronger regularisation) is refit
  on train + val, and that model scores the evaluation split (DINOv2: "the final model is trained on a
  concatenation of train_dataset and finetune_dataset"; UNI's `combine_trainval=True` does the same). It is
  not refit when the evaluation split is val itself (DINOv2's `finetune_on_val`): that would train on the
  items it is scored on.
UNI's released evaluation (mahmoodlab/UNI, eval_patch_features/linear_probe.py) uses the same solver with one
fixed C = D·K/100 (D feature dimensions, K classes) instead of a sweep; `probe.cs = [that]` reproduces the
choice, though UNI's torch objective penalises ‖W‖ rather than ½‖W‖².

The solver is scikit-learn's (scipy's Fortran L-BFGS-B on its multinomial loss) rather than torch.optim.LBFGS
on the same objective: on a CPU it reached the same optimum 3-5× faster per fit at 2,000 × 512 features
(benchmarks/linear_lbfgs.py), and it is the library the protocol was defined with (CLIP; DINOv2's cuML
mirrors its API). Fits run on the CPU whatever `run.device` says, with BLAS on one thread, as the minibatch
probe's loop is: at this size threads cost more than they save (20× slower with the default threads on the
shared 2-core machine, same benchmark). The whole sweep on standardised features cost 1.4× the paper preset's
minibatch sweep there; on raw features, whose scales spread over decades, 16× (31 of 45 fits ran to
max_iter): `features.normalize` conditions the problem. A GPU solver (cuML, as DINOv2 uses) would pay off
only for training sets of ~10⁵ items.

L-BFGS from zero on the full batch is deterministic: every seed would give the same model, so one sweep
serves all of them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pathssl_cli.console import info, progress, progress_enabled, warn
from pathssl_cli.errors import WorkFailed
from pathssl_cli.evaluate.metrics import classification_metrics
from pathssl_cli.evaluate.probe import selection_metric
from pathssl_cli.specs.evaluate import LinearProbe

#: DINOv2's grid of inverse L2 strengths: 10^linspace(-6, 5, 45), about 4 per decade.
DINOV2_CS: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.linspace(-6.0, 5.0, 45))
#: L-BFGS iterations per fit: DINOv2's DEFAULT_MAX_ITER, CLIP's and UNI's 1,000.
MAX_ITER = 1000
#: Gradient tolerance: DINOv2's tol (see the module docstring for why not scikit-learn's default).
TOL = 1e-12


@dataclass(frozen=True)
class LogRegFit:
    """One fitted model and how its fit ended."""

    c: float
    model: LogisticRegression
    n_iter: int
    converged: bool  # False: stopped at max_iter
    seconds: float

    def scores(self, features: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(N, num_classes) float32 log-probabilities; -inf for a class absent from the fit's training items."""
        present = self.model.classes_.astype(np.int64)
        log_proba = self.model.predict_log_proba(features.double().numpy())
        out = torch.full((features.shape[0], num_classes), float("-inf"), dtype=torch.float64)
        out[:, torch.from_numpy(present)] = torch.from_numpy(log_proba)
        return out.float()


def fit_logreg(features: torch.Tensor, targets: torch.Tensor, c: float, max_iter: int = MAX_ITER) -> LogRegFit:
    """Minimise C · Σ cross-entropy + ½‖W‖² over (N, D) features and (N,) int64 targets, from zero."""
    if len(np.unique(targets.numpy())) < 2:
        raise WorkFailed("the L-BFGS probe needs training items of at least two classes; the training split "
                         "has one. Check the dataset's labels and splits.")
    start = time.perf_counter()
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=TOL)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per fit and summarised by the caller
        model.fit(features.double().numpy(), targets.long().numpy())
    n_iter = int(np.max(model.n_iter_))
    return LogRegFit(c=c, model=model, n_iter=n_iter, converged=n_iter < max_iter,
                     seconds=time.perf_counter() - start)


@dataclass
class LogRegSweep:
    """Every C's val score, the chosen C, and the model that scores the evaluation split."""

    cs: tuple[float, ...]
    val: list[float]  # selection metric on val of the model fitted on train, per C
    n_iter: list[int]
    converged: list[bool]
    best: int  # index into cs
    final: LogRegFit  # refit on train + val with cs[best], or the sweep's own fit
    refit_on: Literal["train", "train+val"]
    fit_seconds: list[float] = field(default_factory=list)


def sweep_logreg(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    cs: tuple[float, ...] = DINOV2_CS,
    max_iter: int = MAX_ITER,
    select_by: Literal["top1", "balanced_acc"] = "top1",
    refit: bool = True,
    desc: str = "lbfgs probe",
) -> LogRegSweep:
    """Fit one model per C on train, score each on val, and refit the best C on train + val (when `refit`).

    Only val is ever scored here: the caller scores the evaluation split with `result.final` alone, so no
    choice can depend on it. train_x (N, D) float, train_y (N,) int64; the same for val.
    """
    fits: list[LogRegFit] = []
    val: list[float] = []
    lines, next_line = not progress_enabled(), max(1, len(cs) // 10)
    with progress(total=len(cs), desc=desc, unit="fit") as bar:
        for i, c in enumerate(cs):
            fit = fit_logreg(train_x, train_y, c, max_iter)
            scores = fit.scores(val_x, num_classes)
            fits.append(fit)
            val.append(float(selection_metric(scores[None], val_y.long(), num_classes, select_by)[0]))
            bar.set_postfix(val_best=f"{max(val):.4f}")
            bar.update(1)
            if lines and (i + 1 >= next_line or i + 1 == len(cs)):
                # Off a terminal the bar is silent: a log line per tenth of the sweep shows it advancing.
                info(f"{desc}: fit {i + 1}/{len(cs)} (C = {c:.3g}, {fit.n_iter} iterations), best val "
                     f"{select_by} {max(val):.4f}")
                next_line = i + 1 + max(1, len(cs) // 10)
    best = int(np.argmax(val))  # the first maximum: the smallest C among ties
    if refit:
        final = fit_logreg(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), cs[best], max_iter)
    else:
        final = fits[best]
    return LogRegSweep(
        cs=tuple(cs),
        val=val,
        n_iter=[f.n_iter for f in fits],
        converged=[f.converged for f in fits],
        best=best,
        final=final,
        refit_on="train+val" if refit else "train",
        fit_seconds=[f.seconds for f in fits],
    )


def lbfgs_probe(
    probe: LinearProbe,
    select_by: Literal["top1", "balanced_acc"],
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    seeds: list[int],
    eval_is_val: bool,
) -> tuple[list[dict[str, Any]], torch.Tensor, list[dict[str, Any]], dict[str, Any]]:
    """`evaluate linear` with `probe.kind = "lbfgs"` on (features, targets) pairs: (per-seed rows, evaluation
    scores (N, C), sweep.json rows, settings). The sweep is deterministic, so it runs once and its one row is
    the first seed's."""
    cs = tuple(probe.cs) if probe.cs is not None else DINOV2_CS
    refit = probe.refit and not eval_is_val
    if probe.refit and eval_is_val:
        warn("probe.refit: the evaluation split is val, so the chosen C is not refit on train + val (that "
             "would score the probe on items it was trained on); the model fitted on train is scored.")
    info(f"linear: L-BFGS logistic regression, {len(cs)} values of C on {train[0].shape[0]} × "
         f"{train[0].shape[1]} features, chosen by val {select_by}"
         f"{', refit on train + val' if refit else ''}; deterministic, so one fit serves seeds {seeds}")
    sweep = sweep_logreg(*train, *val, num_classes, cs=cs, max_iter=probe.max_iter, select_by=select_by,
                         refit=refit)
    stopped = [f"{c:.3g}" for c, ok in zip(sweep.cs, sweep.converged, strict=True) if not ok]
    if stopped:
        warn(f"L-BFGS stopped at probe.max_iter = {probe.max_iter} for C = {', '.join(stopped)} (weak "
             "regularisation of barely separable features converges slowly; features.normalize = true "
             "conditions the problem); their models are where the solver stopped, not the optimum.")
    if not sweep.final.converged:
        warn(f"the final model (C = {sweep.final.c:.3g}) stopped at probe.max_iter = {probe.max_iter}.")
    scores = sweep.final.scores(evaluation[0], num_classes)
    metrics = classification_metrics(scores, evaluation[1], num_classes)
    best = sweep.best
    per_seed = [{
        "seed": seeds[0],
        "C": sweep.cs[best],
        f"val_{select_by}": sweep.val[best],
        "n_iter": sweep.final.n_iter,
        "converged": sweep.final.converged,
        **metrics,
    }]
    rows = [
        {"C": c, f"val_{select_by}": v, "n_iter": n, "converged": ok, "seconds": round(s, 4)}
        for c, v, n, ok, s in zip(sweep.cs, sweep.val, sweep.n_iter, sweep.converged, sweep.fit_seconds,
                                  strict=True)
    ]
    settings = {
        "probe": "lbfgs",
        "solver": f"scikit-learn {sklearn.__version__} LogisticRegression(solver='lbfgs')",
        "objective": "C * sum(cross_entropy) + 0.5 * ||W||^2, bias unpenalised",
        "cs": list(sweep.cs),
        "max_iter": probe.max_iter,
        "tol": TOL,
        "select_by": select_by,
        "refit_on": sweep.refit_on,
        "deterministic": True,
        "seeds_fitted": [seeds[0]],
    }
    return per_seed, scores, rows, settings
