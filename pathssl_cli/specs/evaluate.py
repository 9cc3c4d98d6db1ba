"""Specs of the downstream protocols: `linear`, `finetune` and `knn` (`pathssl evaluate ...`).

All three share `[data]` (the dataset section of `pathssl_cli.specs.data`), `[model]` (which backbone and
which weights) and `[run]` (where, which seeds, which device); each adds its own options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pathssl_cli.backbones import Network
from pathssl_cli.errors import Problem
from pathssl_cli.specs.core import BackboneName, NormalizationSpec, OutputPath, Section, SpecModel, WeightsRef
from pathssl_cli.specs.data import DataSection

Precision = Literal["fp32", "bf16", "fp16"]


class ModelSection(Section):
    backbone: BackboneName = Field(
        default="resnet50",
        description="Backbone name from `pathssl backbones list`. Default: the paper's ResNet-50.",
    )
    weights: WeightsRef = Field(
        default="random",
        description="'random', or a local weights file: a `pathssl pretrain` export "
        "(backbone.safetensors), a pretrain checkpoint (checkpoints/last.pt), an official DINO checkpoint, "
        "Lunit's release, or timm/torchvision weights. Never downloaded.",
    )
    weights_network: Network = Field(
        default="auto",
        description="Which network of a checkpoint holding a teacher and a student (DINO) to evaluate: 'auto' "
        "= the teacher, as DINO's eval_linear/eval_knn (`--checkpoint_key teacher`); or 'student'. Files "
        "with one network (exports, Lunit's release, dino's *_pretrain.pth) need 'auto'.",
    )
    normalization: NormalizationSpec = Field(
        default="auto",
        description="Input mean/std: 'auto' uses the statistics stored with a pathssl export or, for a timm "
        "release, its config.json beside the weights, else ImageNet's; 'timm' = the architecture's default "
        "timm release (mean = std = 0.5 for vit_small_patch16_224); Lunit's TCGA release needs 'lunit_tcga'; "
        "or explicit {mean = [r, g, b], std = [r, g, b]} on [0, 1] inputs.",
    )
    img_size: int | None = Field(
        default=None,
        ge=16,
        description="Input side in px; unset = the size stored with the weights, else the "
        "backbone's default (224 for the paper's backbones). Images are resized to it.",
    )


class RunSection(Section):
    output_dir: OutputPath = Field(description="Run directory: metrics.json, per-class CSV, confusion PNG.")
    seeds: list[int] = Field(
        default=[0, 1, 2],
        min_length=1,
        description="One training per seed, reported as mean ± std (3 by default: eva runs 5, the paper "
        "reports single runs). The first seed also seeds a random-weights backbone.",
    )
    device: str = Field(default="auto", description="'auto' (GPU when present), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Precision = Field(
        default="fp32",
        description="Autocast precision for the backbone: 'bf16' halves GPU time; fp32 by default so "
        "CPU runs and cached features are exact.",
    )
    workers: int = Field(
        default=2, ge=0, description="DataLoader worker processes that decode and resize images."
    )
    batch_size: int = Field(
        default=128, ge=1, description="Images per forward pass during feature extraction."
    )
    feature_cache: OutputPath | None = Field(
        default=None,
        description="Folder of cached features shared by runs; unset = '<output_dir>/../feature_cache', "
        "so runs written next to each other reuse each other's features.",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"run.seeds repeats a seed ({seeds}); a repeated seed repeats the same run")
        return seeds

    def cache_dir(self) -> Path:
        return (
            Path(self.feature_cache) if self.feature_cache else Path(self.output_dir).parent / "feature_cache"
        )


# ---------------------------------------------------------------------------------------------------- linear
class LinearOptim(Section):
    """Unset fields take the preset's value (see `pathssl_cli.evaluate.linear.PRESETS` for sources)."""

    preset: Literal["paper", "eva"] = Field(
        default="paper",
        description="'paper': SGD + momentum, 100 epochs, cosine (the standard linear protocol that "
        "Kang et al. follow); 'eva': AdamW lr 3e-4, batch 256, 12,500 steps (kaiko-ai/eva).",
    )
    optimizer: Literal["sgd", "adamw"] | None = Field(
        default=None, description="Overrides the preset's optimiser."
    )
    lrs: list[float] | None = Field(
        default=None, description="Learning rates swept on val (per the batch size used)."
    )
    weight_decays: list[float] | None = Field(default=None, description="Weight decays swept on val.")
    epochs: int | None = Field(
        default=None, ge=1, description="Passes over the training features (paper preset)."
    )
    steps: int | None = Field(
        default=None, ge=1, description="Minibatch steps; when set it wins over epochs (eva)."
    )
    batch_size: int | None = Field(default=None, ge=1, description="Features per minibatch step.")
    lr_schedule: Literal["cosine", "constant"] | None = Field(
        default=None, description="Per-step lr multiplier."
    )
    eval_every: int | None = Field(default=None, ge=1, description="Validate every N steps; best val kept.")
    select_by: Literal["top1", "balanced_acc"] | None = Field(
        default=None, description="Validation metric that picks the checkpoint and the lr/wd."
    )

    @model_validator(mode="after")
    def _positive_grids(self) -> LinearOptim:
        if self.lrs is not None and (not self.lrs or any(v <= 0 for v in self.lrs)):
            raise ValueError("optim.lrs must be a non-empty list of positive learning rates")
        if self.weight_decays is not None and (
            not self.weight_decays or any(v < 0 for v in self.weight_decays)
        ):
            raise ValueError("optim.weight_decays must be a non-empty list of non-negative values")
        return self


class LinearFeatures(Section):
    """The feature recipe: which outputs of the frozen backbone the linear head sees (part of the cache key),
    and whether they are standardised before the probe (applied to the cached features, not part of the key)."""

    recipe: Literal["preset", "pooled", "dino", "dinov2", "stages"] = Field(
        default="preset",
        description="'preset' = the optim.preset's protocol ('paper': 'dino', each family's official recipe; "
        "'eva': 'pooled'); 'pooled' = the backbone's pooled output (CNN global average pool, ViT final-norm "
        "CLS; eva); 'dino' = dino eval_linear.py: ViTs concatenate the CLS tokens of the last n_last_blocks "
        "blocks (+ mean patch token), CNNs use the average pool as dino does for torchvision models; 'dinov2' = "
        "the last block's CLS token concatenated with the mean of its patch tokens (registers excluded), the "
        "probe of dinov2 eval/linear.py (n = 1, avgpool) and of the pathology foundation models trained with "
        "it (CNNs: the average pool); 'stages' = "
        "the global average of every stage's feature map (ResNet stages 1-4, a ViT's map blocks), concatenated: "
        "early-stage texture and colour statistics for small CPU backbones (resnet_tiny: 368-d, not 96).",
    )
    n_last_blocks: int = Field(
        default=4, ge=1,
        description="Blocks whose CLS tokens are concatenated under 'dino' (ViTs); dino `--n_last_blocks 4` for "
        "ViT-S (1 for ViT-B).",
    )
    avgpool_patchtokens: bool = Field(
        default=False,
        description="Also concatenate the mean patch token of the last block under 'dino' (ViTs); dino "
        "`--avgpool_patchtokens false` for ViT-S (true for ViT-B).",
    )
    normalize: bool = Field(
        default=False,
        description="Standardise every feature dimension with the training split's mean and std (ddof 0) before "
        "the probe, the same map for val and test, as MAE's linear probe does with a BatchNorm without affine "
        "parameters (pathssl_cli.evaluate.standardize). The probe then measures what the features encode, not "
        "their scale. Off by default: the paper's protocol trains on raw features.",
    )


class LinearProbe(Section):
    """Which classifier is fitted on the frozen features (sources in pathssl_cli.evaluate.logreg)."""

    kind: Literal["minibatch", "lbfgs"] = Field(
        default="minibatch",
        description="'minibatch': the [optim] sweep, SGD or AdamW heads trained on minibatches with the "
        "preset's protocol (the paper's); 'lbfgs': multinomial logistic regression fitted full-batch by L-BFGS "
        "(scikit-learn), its L2 strength chosen on val from `cs` and refit on train + val, as DINOv2's "
        "log_regression.py evaluates (UNI uses the same solver). It is deterministic: one fit serves every "
        "seed. Of [optim] only preset and select_by apply to it.",
    )
    cs: list[float] | None = Field(
        default=None,
        description="'lbfgs': inverse L2 strengths C tried on val (objective C·Σ cross-entropy + ½‖W‖², "
        "scikit-learn's C). Unset = DINOv2's 45 values 10^linspace(-6, 5, 45).",
    )
    max_iter: int = Field(
        default=1000, ge=1,
        description="'lbfgs': L-BFGS iterations per fit at most; DINOv2's, CLIP's and UNI's 1,000.",
    )
    refit: bool = Field(
        default=True,
        description="'lbfgs': refit the chosen C on train + val before scoring the evaluation split, as DINOv2 "
        "and UNI do (never when the evaluation split is val). False scores the model fitted on train alone.",
    )

    @model_validator(mode="after")
    def _positive_cs(self) -> LinearProbe:
        if self.cs is not None and (not self.cs or any(c <= 0 for c in self.cs)):
            raise ValueError("probe.cs must be a non-empty list of positive inverse L2 strengths, e.g. "
                             "[0.01, 0.1, 1.0]")
        return self


#: [optim] fields that only the minibatch probe reads (the L-BFGS probe uses preset and select_by).
MINIBATCH_ONLY = ("optimizer", "lrs", "weight_decays", "epochs", "steps", "batch_size", "lr_schedule",
                  "eval_every")
#: [probe] fields that only the L-BFGS probe reads.
LBFGS_ONLY = ("cs", "max_iter", "refit")


class LinearSpec(SpecModel):
    kind: Literal["linear"] = "linear"
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection, description="Backbone and weights to evaluate.")
    optim: LinearOptim = Field(default_factory=LinearOptim, description="Linear-probe training and sweep.")
    features: LinearFeatures = Field(
        default_factory=LinearFeatures, description="Feature recipe: `features.recipe = \"dino\"` or "
        "\"pooled\" in one line; by default the preset's.")
    probe: LinearProbe = Field(
        default_factory=LinearProbe, description="The classifier: the [optim] minibatch sweep or L-BFGS.")
    run: RunSection

    @model_validator(mode="after")
    def _options_of_the_chosen_probe(self) -> LinearSpec:
        if self.probe.kind == "lbfgs":
            stray = [f"optim.{name}" for name in MINIBATCH_ONLY if getattr(self.optim, name) is not None]
            other = "minibatch"
        else:
            stray = [f"probe.{name}" for name in LBFGS_ONLY if name in self.probe.model_fields_set]
            other = "lbfgs"
        if stray:
            raise ValueError(f"{', '.join(stray)} only apply when probe.kind = \"{other}\", but probe.kind = "
                             f"\"{self.probe.kind}\" would ignore them; remove them, or set probe.kind = "
                             f"\"{other}\"")
        return self

    def check_inputs(self) -> list[Problem]:
        return _data_problems(self.data, ("train", "val"))


# ------------------------------------------------------------------------------------------------------- knn
class KnnSection(Section):
    k: list[Annotated[int, Field(ge=1)]] = Field(
        default=[20, 200],
        min_length=1,
        description="Neighbour counts; DINO's eval_knn reports 20 (its best) and 200.",
    )
    temperature: float = Field(
        default=0.07, gt=0, description="T in the vote weight exp(cos / T); DINO's 0.07."
    )


class KnnFeatures(Section):
    """Which outputs of the frozen backbone the neighbours are searched in (part of the feature cache key)."""

    recipe: Literal["pooled", "dinov2", "stages"] = Field(
        default="pooled",
        description="'pooled' = the backbone's pooled output (CNN average pool, ViT final-norm CLS), what dino "
        "eval_knn.py searches; 'dinov2' = a ViT's last-block CLS token ⊕ mean patch token (CNNs: the average "
        "pool); 'stages' = every stage's global average, concatenated (resnet_tiny: 368-d), as the linear "
        "probe's recipe of the same name. Features are L2-normalised before the cosine search either way.",
    )


class KnnSpec(SpecModel):
    kind: Literal["knn"] = "knn"
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection, description="Backbone and weights to evaluate.")
    knn: KnnSection = Field(default_factory=KnnSection, description="Neighbour counts and temperature.")
    features: KnnFeatures = Field(default_factory=KnnFeatures, description="Feature recipe: `features.recipe "
                                  "= \"stages\"` for small CPU backbones.")
    run: RunSection

    def check_inputs(self) -> list[Problem]:
        return _data_problems(self.data, ("train",))


# -------------------------------------------------------------------------------------------------- finetune
class FinetuneOptim(Section):
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw",
        description="AdamW, the usual choice for fine-tuning ViTs and ResNets alike (BEiT/MAE recipe).",
    )
    lr: float = Field(
        default=1e-4,
        gt=0,
        description="Peak lr of the backbone's last layer for `batch_size` images; "
        "the new head uses `head_lr_scale` × this.",
    )
    head_lr_scale: float = Field(
        default=10.0,
        gt=0,
        description="The head starts from zero knowledge; a larger lr lets "
        "it catch up with the pretrained body (common transfer-learning practice).",
    )
    weight_decay: float = Field(
        default=0.05,
        ge=0,
        description="AdamW weight decay (not on biases and norms); MAE's fine-tuning value.",
    )
    layer_decay: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Layer-wise lr decay for ViTs (BEiT/MAE: 0.65-0.75): block i of L gets "
        "lr × decay^(L - i). Unset = one lr for the whole backbone. Ignored (with a warning) for CNNs.",
    )
    epochs: int = Field(default=30, ge=1, description="Maximum epochs; early stopping usually ends sooner.")
    warmup_epochs: float = Field(default=1.0, ge=0, description="Linear warm-up before the cosine decay.")
    batch_size: int = Field(default=64, ge=1, description="Images per step (per process under torchrun).")
    patience: int = Field(default=5, ge=1, description="Epochs without a better val score before stopping.")
    select_by: Literal["top1", "balanced_acc"] = Field(
        default="top1", description="Val metric for the best checkpoint."
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")


class FinetuneAugment(Section):
    hflip: bool = Field(default=True, description="Random horizontal flips: tissue has no left/right.")
    vflip: bool = Field(
        default=True, description="Random vertical flips: tissue has no up/down either (Kang et al.)."
    )
    rotate90: bool = Field(
        default=True, description="Random multiples of 90°: the rest of the dihedral group."
    )
    stain: Literal["none", "hed"] = Field(
        default="hed", description="'hed' = HED jitter (Tellez et al. 2019) from pathssl_cli.augment.stain."
    )
    hed_sigma: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="HED jitter strength: α ~ U(1-σ, 1+σ), β ~ U(-σ, σ) in optical density (-ln I), the units "
        "of every command (pathssl_cli.augment.stain.hed_jitter); 0.05 is Tellez's 'HED-light'.",
    )


class FinetuneSpec(SpecModel):
    kind: Literal["finetune"] = "finetune"
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection, description="Backbone and weights to evaluate.")
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim, description="Fine-tuning optimisation.")
    augment: FinetuneAugment = Field(default_factory=FinetuneAugment, description="Training augmentations.")
    run: RunSection

    def check_inputs(self) -> list[Problem]:
        return _data_problems(self.data, ("train", "val"))


def _data_problems(data: DataSection, splits: tuple[str, ...]) -> list[Problem]:
    from pathssl_cli.data.benchmarks import layout_problems

    return layout_problems(data, splits)  # type: ignore[arg-type]
