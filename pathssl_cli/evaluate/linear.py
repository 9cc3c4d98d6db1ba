"""`pathssl evaluate linear`: a linear classifier on frozen, cached features.

1. Features of train, val and the evaluation split are extracted once with the eval transform (features.py).
2. One batched run trains every (lr, weight decay, seed) head of the sweep (probe.py); each head keeps its
   best checkpoint by the validation metric.
3. For each seed, the (lr, weight decay) with the best validation score is chosen and its kept checkpoint is
   scored on the evaluation split; metrics are reported as mean ± std over seeds.

That is `probe.kind = "minibatch"`, the default. `probe.kind = "lbfgs"` replaces steps 2-3 with a full-batch
L-BFGS logistic regression whose L2 strength is chosen on val (logreg.py, DINOv2's protocol), and
`features.normalize = true` standardises the features with the training split's statistics before either probe
(standardize.py, MAE's BatchNorm-without-affine probe). Both are off in every preset: the paper's protocol trains
SGD heads on raw features.

Presets (every field can be overridden in `[optim]`):

`paper` — the standard linear protocol, which Kang et al. (CVPR 2023, §5 "linear evaluation") follow. Their
supplementary hyper-parameter table could not be consulted here, so each setting is taken from the public
reference implementation of that standard protocol and marked as such:
- features (`[features] recipe`, default "dino" under this preset): each family's official recipe. ViTs:
  dino `eval_linear.py`, the CLS tokens of the last 4 blocks after the final norm, concatenated, no mean
  patch token (`--n_last_blocks 4 --avgpool_patchtokens false`, its ViT-S setting). CNNs: the global
  average pool (dino `eval_linear.py` for torchvision models, moco `main_lincls.py`, barlowtwins
  `evaluate.py`).
- SGD, momentum 0.9: facebookresearch/dino `eval_linear.py` and facebookresearch/moco `main_lincls.py`.
- 100 epochs, cosine decay to 0: dino `eval_linear.py` (--epochs 100, CosineAnnealingLR eta_min 0).
- batch 256: moco `main_lincls.py` (-b 256); dino's lr rule is stated per 256 images.
- head init N(0, 0.01²), bias 0: dino `eval_linear.py` LinearClassifier.
- lr swept over {1e-2, 1e-1, 1, 10} and weight decay over {0, 1e-5, 1e-4}: the protocol fixes the optimiser
  but tunes lr per checkpoint (dino: "We recommend tweaking the LR depending on the checkpoint evaluated";
  MoCo's lr 30 and DINO's 1e-3 differ by 4 orders of magnitude because feature scales differ, and
  un-normalised pooled CNN features of norm ~1 need lr ≥ 1); weight decay 0 is dino's and moco's value, the
  two small ones let the sweep regularise small datasets such as BACH and MHIST.
- selection by val top-1, the metric the paper reports.
Where it differs from those implementations, on purpose:
- no train-time augmentation. dino, moco and barlowtwins train the head on RandomResizedCrop +
  horizontal-flip views, extracting features anew every step; here every image is extracted once with the
  eval transform and cached, so the whole lr × weight-decay × seed sweep (36 heads) costs one extraction
  instead of 36 × 100 epochs of backbone passes. This removes a regulariser of the head, which can matter
  on small training sets (BACH, low-label subsets).
- the lr is swept on val instead of fixed (dino 1e-3, moco 30 per 256 images); see above.
- dino's recipe with avgpool_patchtokens concatenates [CLS..., mean] where dino interleaves them: the same
  features in another order.

`eva` — kaiko-ai/eva's offline classification configs as the issue states them: features = the backbone's
pooled output ("pooled": the final-norm CLS token of a ViT, the average pool of a CNN, as eva's timm
backbones return), AdamW lr 3e-4, batch 256,
12,500 steps, best checkpoint by the monitored val metric (eva monitors MulticlassAccuracy with macro average,
i.e. balanced accuracy), cosine decay to 0 over max_steps (eva's CosineAnnealingLR T_max = max_steps), weight
decay 0 (eva's SGD configs set 0.0). Current eva releases use SGD lr 6.25e-4 instead; set optim.optimizer and
optim.lrs for that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from pathssl_cli.console import info
from pathssl_cli.distributed import resolve_device
from pathssl_cli.errors import SpecError
from pathssl_cli.evaluate.common import frozen_features, write_outputs
from pathssl_cli.evaluate.features import POOLED, STAGES, FeatureRecipe
from pathssl_cli.evaluate.logreg import lbfgs_probe
from pathssl_cli.evaluate.metrics import classification_metrics
from pathssl_cli.evaluate.probe import HeadConfig, ProbeSchedule, steps_for_epochs, train_probes
from pathssl_cli.evaluate.standardize import Standardizer
from pathssl_cli.runs import RunDir, claim_run_dir, open_run
from pathssl_cli.specs.evaluate import LinearFeatures, LinearOptim, LinearSpec

if TYPE_CHECKING:
    from pathssl_cli.backbones import Backbone


Pair = tuple[torch.Tensor, torch.Tensor]  # (N, D) features and their (N,) int64 targets


@dataclass(frozen=True)
class LinearPlan:
    optimizer: Literal["sgd", "adamw"]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    epochs: int | None
    steps: int | None
    batch_size: int
    lr_schedule: Literal["cosine", "constant"]
    eval_every: int | None  # None: once per epoch
    select_by: Literal["top1", "balanced_acc"]


PRESETS: dict[str, LinearPlan] = {
    "paper": LinearPlan(
        optimizer="sgd",
        lrs=(1e-2, 1e-1, 1.0, 10.0),
        weight_decays=(0.0, 1e-5, 1e-4),
        epochs=100,
        steps=None,
        batch_size=256,
        lr_schedule="cosine",
        eval_every=None,
        select_by="top1",
    ),
    "eva": LinearPlan(
        optimizer="adamw",
        lrs=(3e-4,),
        weight_decays=(0.0,),
        epochs=None,
        steps=12_500,
        batch_size=256,
        lr_schedule="cosine",
        eval_every=250,
        select_by="balanced_acc",
    ),
}


def resolve_plan(optim: LinearOptim) -> LinearPlan:
    """The preset with every field that `[optim]` sets replaced."""
    base = asdict(PRESETS[optim.preset])
    for name in base:
        value = getattr(optim, name, None)
        if value is not None:
            base[name] = tuple(value) if isinstance(value, list) else value
    if optim.steps is not None:
        base["epochs"] = None
    elif optim.epochs is not None:
        base["steps"] = None
    return LinearPlan(**base)


#: The feature recipe each preset follows when `features.recipe = "preset"` (sources in the module docstring).
PRESET_RECIPES: dict[str, Literal["pooled", "dino"]] = {"paper": "dino", "eva": "pooled"}


def resolve_recipe(features: LinearFeatures, preset: str, backbone: Backbone) -> FeatureRecipe:
    """The recipe for `backbone`: 'dino' takes the last blocks' CLS tokens of a ViT and the average pool of a
    CNN (dino eval_linear.py does the same for torchvision models); 'pooled' the backbone's pooled output;
    'stages' the average of every feature map (any family)."""
    choice = PRESET_RECIPES[preset] if features.recipe == "preset" else features.recipe
    if choice == "stages":
        return STAGES
    if choice == "pooled" or backbone.info.family != "vit":
        return POOLED
    depth = len(getattr(backbone.timm_model, "blocks", ()))
    if features.n_last_blocks > depth:
        raise SpecError(f"features.n_last_blocks = {features.n_last_blocks}, but {backbone.name} has {depth} "
                        f"blocks; use at most {depth}")
    return FeatureRecipe("vit_blocks", features.n_last_blocks, features.avgpool_patchtokens)


def plan_schedule(plan: LinearPlan, n_train: int) -> ProbeSchedule:
    batch = min(plan.batch_size, n_train)
    steps_per_epoch = max(1, -(-n_train // batch))
    steps = plan.steps if plan.steps is not None else steps_for_epochs(plan.epochs or 1, n_train, batch)
    return ProbeSchedule(
        optimizer=plan.optimizer,
        steps=steps,
        batch_size=batch,
        lr_schedule=plan.lr_schedule,
        eval_every=plan.eval_every or steps_per_epoch,
        select_by=plan.select_by,
    )


def run_linear(spec: LinearSpec) -> dict[str, Any]:
    plan = resolve_plan(spec.optim)
    claim_run_dir(spec, spec.run.output_dir)
    with open_run(spec, spec.run.output_dir, seed=spec.run.seeds[0]) as run:
        fset = frozen_features(spec, recipe=lambda b: resolve_recipe(spec.features, spec.optim.preset, b))
        classes = fset.splits["train"].classes
        num_classes = len(classes)
        train, val, test = fset.features["train"], fset.features["val"], fset.features["eval"]
        # Statistics of the training split only, applied alike to every split (evaluate/standardize.py).
        scaler = Standardizer.fit(train.features) if spec.features.normalize else None
        train_x, val_x, test_x = (scaler(f.features) if scaler else f.features for f in (train, val, test))
        if spec.probe.kind == "lbfgs":
            per_seed, first_scores, sweep, probe_settings = lbfgs_probe(
                spec.probe, plan.select_by, (train_x, train.targets), (val_x, val.targets),
                (test_x, test.targets), num_classes, spec.run.seeds, eval_is_val=fset.eval_split == "val")
        else:
            per_seed, first_scores, sweep, probe_settings = _minibatch_probe(
                spec, plan, run, (train_x, train.targets), (val_x, val.targets), (test_x, test.targets),
                num_classes)
        run.write_json("sweep.json", sweep)
        settings = {
            "preset": spec.optim.preset,
            **probe_settings,
            "seeds": spec.run.seeds,
            "extraction_seconds": round(fset.extraction_seconds, 3),
            "feature_dim": int(train.features.shape[1]),
            "feature_recipe": json.loads(fset.recipe.describe()),
            "feature_normalization": scaler.describe() if scaler else None,
        }
        label = "linear" if spec.data.train_subset is None else f"linear[{spec.data.train_subset.stem}]"
        record = write_outputs(
            run,
            spec,
            protocol="linear",
            label=label,
            splits=fset.splits,
            eval_split=fset.eval_split,
            per_seed=per_seed,
            confusion_scores=first_scores,
            variants=None,
            settings=settings,
        )
    top1 = record["metrics"]["top1"]
    info(
        f"linear {spec.data.dataset}: top-1 {100 * top1['mean']:.2f} ± {100 * top1['std']:.2f} "
        f"({fset.eval_split}, {len(per_seed)} seed(s)) → {spec.run.output_dir}"
    )
    return record


def _minibatch_probe(
    spec: LinearSpec, plan: LinearPlan, run: RunDir, train: Pair, val: Pair, evaluation: Pair, num_classes: int
) -> tuple[list[dict[str, Any]], torch.Tensor, list[dict[str, Any]], dict[str, Any]]:
    """The [optim] sweep on (features, targets) pairs: (per-seed rows, the first seed's evaluation scores,
    sweep.json rows, settings)."""
    schedule = plan_schedule(plan, len(train[1]))
    heads = [
        HeadConfig(lr=lr, weight_decay=wd, seed=seed)
        for seed in spec.run.seeds
        for lr in plan.lrs
        for wd in plan.weight_decays
    ]
    info(
        f"linear: {len(heads)} heads ({len(plan.lrs)} lr × {len(plan.weight_decays)} wd × "
        f"{len(spec.run.seeds)} seeds), {schedule.steps} steps of {schedule.batch_size} on "
        f"{len(train[1])} × {train[0].shape[1]} features"
    )
    result = train_probes(
        train[0],
        train[1],
        val[0],
        val[1],
        num_classes,
        heads,
        schedule,
        device=resolve_device(spec.run.device),
    )
    for entry in result.history:
        run.metrics.log(entry.step, train_loss=entry.train_loss, val_best_of_sweep=max(entry.val))

    eval_scores = result.scores(evaluation[0])  # (G, N, C)
    per_seed: list[dict[str, Any]] = []
    first_scores: torch.Tensor | None = None
    for seed in spec.run.seeds:
        members = [g for g, h in enumerate(heads) if h.seed == seed]
        best = max(members, key=lambda g: float(result.best_val[g]))  # first wins a tie: smallest lr, wd
        metrics = classification_metrics(eval_scores[best], evaluation[1], num_classes)
        per_seed.append(
            {
                "seed": seed,
                "lr": heads[best].lr,
                "weight_decay": heads[best].weight_decay,
                f"val_{plan.select_by}": float(result.best_val[best]),
                "best_step": int(result.best_step[best]),
                **metrics,
            }
        )
        if first_scores is None:
            first_scores = eval_scores[best]
    sweep = [
        {
            "lr": h.lr,
            "weight_decay": h.weight_decay,
            "seed": h.seed,
            f"val_{plan.select_by}": float(result.best_val[g]),
            "best_step": int(result.best_step[g]),
        }
        for g, h in enumerate(heads)
    ]
    assert first_scores is not None
    settings = {"probe": "minibatch", **asdict(plan), "steps_run": schedule.steps,
                "eval_every": schedule.eval_every}
    return per_seed, first_scores, sweep, settings
