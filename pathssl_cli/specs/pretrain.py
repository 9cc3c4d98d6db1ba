"""The `pretrain` spec: data stream, backbone, SSL method, augmentation preset, optimiser and run options.

`[method]` is the options model of the method named by `name` (`pathssl_cli.methods`); `[augment]` picks the
view recipe of that method in the `original` or `pathology` preset (`pathssl_cli.augment.views.recipe_for`)
with optional per-field overrides. Settings counted in epochs (as the official recipes count them) use one
pass over the data per epoch (the tiles of `data.tiles`; for `data.slides`, patches covering their tissue once),
or `run.epoch_images` images (1281167 = ImageNet epochs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pathssl_cli.augment.recipes import StainOptions, ViewRecipe, recipe_for
from pathssl_cli.backbones import Network, backbone_info
from pathssl_cli.errors import Problem
from pathssl_cli.methods import MethodOptionsUnion
from pathssl_cli.specs.core import BackboneName, InputPath, OutputPath, PathPattern, Section, SpecModel, WeightsRef
from pathssl_cli.specs.tile import MAGNIFICATION_MPP, SlideReaderName

PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]


class MppRange(Section):
    log_uniform: tuple[float, float] = Field(
        description="[low, high] µm/px: each slide patch's field of view is drawn log-uniformly in it (as "
        "continuous-magnification pre-training does, e.g. [0.25, 2.0]).")

    @model_validator(mode="after")
    def _ordered(self) -> MppRange:
        low, high = self.log_uniform
        if not 0.05 <= low <= high <= 64:
            raise ValueError(f"log_uniform needs 0.05 <= low <= high <= 64 µm/px, got {list(self.log_uniform)}")
        return self


class PretrainData(Section):
    tiles: list[InputPath] = Field(
        default_factory=list, description="Tile stores written by `pathssl tile` (a folder with parts/*.parquet "
        "and shards/) or folders of images (searched recursively); all are mixed into one stream (with "
        "`slides`, in proportion to each one's epoch length).")
    slides: list[PathPattern] = Field(
        default_factory=list, description="Whole slides to cut patches from on the fly, no tile store: files, "
        "globs (`**` allowed) or CSV files with a `path` and an optional `mpp` column (µm/px, overrides the "
        "metadata for that slide), as `pathssl tile` reads them. Relative paths are resolved against the spec "
        "file's folder (CSV paths against the CSV's folder).")
    mpp: list[float | str] | dict[str, float] | MppRange | None = Field(
        None, description="Fields of view of slide patches (µm/px): a list [0.25, 0.5] (equal weights; "
        "'40x'/'20x'/'10x'/'5x' allowed), weights {\"0.25\" = 1, \"0.5\" = 2} (Kang et al.'s multi-FoV) or "
        "{log_uniform = [0.25, 2.0]}. Each slide draws from those it can give (none finer than its level 0). "
        "Unset = [0.5], `pathssl tile`'s default. For tile stores use mpp_weights.")
    mpp_override: float | None = Field(
        None, gt=0, description="Level-0 µm/px of every slide of `slides`, winning over the MPP in its metadata "
        "(`pathssl tile`'s input.mpp_override; a slide CSV's `mpp` column wins over both). Unset: the metadata's; "
        "a slide without MPP is then left out with a warning naming it, never guessed.")
    reader: SlideReaderName = Field(
        "auto", description="Slide library for `slides` ('auto', 'tiffslide', 'openslide', 'dicom'), as "
        "`pathssl tile`'s input.reader; each slide is read by the library that indexed it.")
    coords_dir: OutputPath | None = Field(
        None, description="Folder of the slides' coordinate index (coords/<slide_id>.parquet: tissue grid, "
        "MPP, reader), computed where missing with `pathssl tile`'s tissue detector, or written ahead of time "
        "by `pathssl tile SPEC --coords-only` into that spec's output.dir. Unset = "
        "$XDG_CACHE_HOME/pathssl/coords (~/.cache/pathssl/coords), shared by every run of this user.")
    min_tissue: float = Field(
        0.4, ge=0, le=1, description="Smallest fraction of a slide patch's own pixels that the tissue detector "
        "calls tissue (saturation above that slide's threshold); else the next position is tried. 0.4: on the "
        "CMU-1 sample, 90% of the tiles `pathssl tile` keeps (mask fraction >= 0.5) have >= 0.44, and 75% of "
        "tiles at the tissue border (mask < 0.25) have <= 0.16.")
    patches_per_visit: int = Field(
        16, ge=1, description="Consecutive slide patches read from one slide before the next (amortises "
        "opening it and reuses its decoded tiles); a batch of B mixes B / patches_per_visit visits.")
    open_slides: int = Field(
        8, ge=1, description="Slides in use at a time per rank, and kept open by each DataLoader worker: a "
        "batch mixes patches of this many slides, and each is opened about once per epoch per worker.")
    batch_size: int = Field(
        256, ge=1, description="Global batch: images per optimiser step summed over all ranks (each rank "
                               "gets batch_size / world_size). The lr is scaled from it by the linear "
                               "scaling rule.")
    mpp_weights: dict[str, float] = Field(
        default_factory=dict, description="Fields of view to mix, as {\"mpp\" = weight}, e.g. {\"0.25\" = 1, "
        "\"0.5\" = 1} (µm/px of the store's levels → relative sampling weight); empty = every level, in "
        "proportion to its tile count. Kang et al.'s multi-FoV technique.")
    tile_size: int | None = Field(
        None, ge=8, description="Side (px) every tile is resized to (bilinear, antialiased; a non-square tile "
        "gives its central square first) before the views are cut from it. Set it when sources of different "
        "sides are mixed (224 px LC25000/NCT tiles, 256 px CoNSeP tiles): each source is then rescaled by a "
        "known factor. Unset = the side of the first tile of the first source in `tiles` (stored order, not "
        "seeded), which keeps a single source at its own side.")
    shuffle_buffer: int = Field(
        10_000, ge=1, description="Tiles held in the streaming shuffle buffer (tiles); larger mixes better "
                                  "but costs memory (~150 kB per 224 px tile).")
    workers: int = Field(
        4, ge=0, description="DataLoader processes that read shards and decode JPEG per rank; the "
                             "augmentations run batched on the training device, so a few are enough.")

    def mpp_sampling(self) -> Any:
        """`data.mpp` as a `pathssl_cli.data.slide_stream.MppSampling`."""
        from pathssl_cli.data.fields_of_view import MppSampling

        if isinstance(self.mpp, MppRange):
            return MppSampling(log_uniform=(float(self.mpp.log_uniform[0]), float(self.mpp.log_uniform[1])))
        if isinstance(self.mpp, dict):
            pairs = sorted(self.mpp.items(), key=lambda kv: float(kv[0]))
            return MppSampling(values=tuple(float(k) for k, _ in pairs), weights=tuple(v for _, v in pairs))
        values = tuple(_as_mpp(v) for v in (self.mpp or [0.5]))
        return MppSampling(values=values, weights=(1.0,) * len(values))

    @model_validator(mode="after")
    def _check_sources(self) -> PretrainData:
        if not self.tiles and not self.slides:
            raise ValueError("give data.tiles (tile stores, image folders), data.slides (whole slides), or both")
        if self.mpp is not None and not self.slides:
            raise ValueError("data.mpp sets the fields of view of slide patches; there are no data.slides. For "
                             "a tile store's levels use data.mpp_weights")
        if self.mpp_weights and not self.tiles:
            raise ValueError("data.mpp_weights weights a tile store's levels; there are no data.tiles. For "
                             "slides use data.mpp")
        if isinstance(self.mpp, list):
            if not self.mpp:
                raise ValueError("data.mpp is empty; give at least one field of view")
            for value in self.mpp:
                mpp = _as_mpp(value)
                if not 0.05 <= mpp <= 64:
                    raise ValueError(f"data.mpp: µm/px must lie in [0.05, 64], got {value}")
        if isinstance(self.mpp, dict):
            for key, weight in self.mpp.items():
                try:
                    mpp = float(key)
                except ValueError:
                    raise ValueError(f"data.mpp key {key!r} is not a number of µm/px such as '0.5' (or use "
                                     "{log_uniform = [low, high]})") from None
                if not 0.05 <= mpp <= 64 or weight < 0:
                    raise ValueError(f"data.mpp needs µm/px keys in [0.05, 64] and weights >= 0, got {key}={weight}")
            if sum(self.mpp.values()) <= 0:
                raise ValueError("data.mpp weights are all zero; give one field of view a positive weight")
        return self

    @model_validator(mode="after")
    def _check_weights(self) -> PretrainData:
        for key, weight in self.mpp_weights.items():
            try:
                mpp = float(key)
            except ValueError:
                raise ValueError(f"mpp_weights key {key!r} is not a number of µm/px such as '0.5'") from None
            if mpp <= 0 or weight < 0:
                raise ValueError(f"mpp_weights needs positive µm/px keys and non-negative weights, got "
                                 f"{key}={weight}")
        if self.mpp_weights and sum(self.mpp_weights.values()) <= 0:
            raise ValueError("mpp_weights are all zero; give at least one field of view a positive weight")
        return self


class PretrainModel(Section):
    backbone: BackboneName = Field(
        "resnet50", description="Backbone from `pathssl backbones list`: the paper uses resnet50 (MoCo v2, "
                                "SwAV, Barlow Twins) and vit_small_patch16_224 / vit_small_patch8_224 "
                                "(DINO).")
    weights: WeightsRef = Field(
        "random", description="'random' (the paper pre-trains from scratch) or a local weights file to "
                              "continue from, e.g. another run's backbone.safetensors.")
    weights_network: Network = Field(
        "auto", description="Which network of a checkpoint that holds a teacher and a student (a DINO "
        "checkpoint of pathssl or of facebookresearch/dino) to start from: 'auto' = the teacher, as DINO "
        "evaluates it; 'student'; files with one network (exports, Lunit's release) need 'auto'.")
    img_size: int | None = Field(
        None, ge=16, description="Input side the backbone is built for (px); unset = augment's global view "
                                 "size.")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="Stochastic depth of the trained backbone (timm's rate at the last block, "
        "linear from 0): dino `--drop_path_rate 0.1` for ViT-S (the DINO specs set it); 0 for the ResNet "
        "methods, whose official code has none. EMA teachers and key encoders never drop.")


class PretrainAugment(Section):
    preset: Literal["original", "pathology"] = Field(
        "pathology", description="'original' = the method's own recipe; 'pathology' adds Kang et al.'s "
        "vertical flips, RandStainNA and weaker colour jitter (multi-FoV comes from data.mpp_weights).")
    global_size: int | None = Field(None, ge=8, description="Global view side (px); unset = 224 (every "
                                                            "recipe).")
    local_size: int | None = Field(None, ge=8, description="Local view side (px); unset = 96 (SwAV, DINO).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Any view-recipe field (see `pathssl_cli.augment.views.ViewRecipe`), e.g. "
                    "{brightness = 0.3, stain = {p = 0.5, space = \"hed\"}}; applied on top of the preset.")
    stain_statistics: InputPath | None = Field(
        None, description="A stain_statistics.json from an earlier run to use as is; unset = fit them on "
        "`stain_fit_tiles` tiles of the stream before training (saved in the run).")
    stain_fit_tiles: int = Field(
        1000, ge=2, description="Tiles sampled to fit the RandStainNA statistics; 1000 tiles give stable "
                                "channel means/stds at a few seconds of decoding.")

    def recipe(self, method: str, n_global: int, n_local: int) -> ViewRecipe:
        """The recipe for `method`: the preset, then the method's view counts, then sizes and overrides."""
        clashing = sorted({"n_global", "n_local"} & set(self.overrides))
        if clashing:
            raise ValueError(f"overrides.{clashing[0]}: the number of views is the method's (method."
                             "n_global_crops / n_local_crops for SwAV and DINO; two views otherwise)")
        fields: dict[str, Any] = {"n_global": n_global, "n_local": n_local}
        if self.global_size is not None:
            fields["global_size"] = self.global_size
        if self.local_size is not None:
            fields["local_size"] = self.local_size
        fields.update(self.overrides)
        return recipe_for(method, self.preset, **fields)

    def stain_options(self, method: str) -> StainOptions | None:
        """The recipe's RandStainNA options (space, distribution, components) when it applies RandStainNA."""
        recipe = self.recipe(method, 2, 0)
        return recipe.stain if recipe.stain.p > 0 else None


class PretrainOptim(Section):
    name: Literal["lars", "larc", "sgd", "adamw"] = Field(
        "lars", description="LARS (Barlow Twins), LARC = SGD wrapped in apex's LARC (SwAV), SGD (MoCo v2) or "
                            "AdamW (DINO).")
    lr: float = Field(
        0.2, gt=0, description="Peak lr for 256 images per step; multiplied by batch_size / 256 when "
                               "scale_lr (the linear scaling rule all four official repos use).")
    scale_lr: bool = Field(True, description="Scale lr with the batch size by `lr_scaling`.")
    lr_scaling: Literal["linear_256", "sqrt_1024"] = Field(
        "linear_256", description="How `lr` scales with batch_size when scale_lr: 'linear_256' = lr × "
        "batch_size / 256 (MoCo, SwAV, Barlow Twins, DINO); 'sqrt_1024' = lr × √(batch_size / 1024), dinov2 "
        "`optim.scaling_rule: sqrt_wrt_1024` (lr then means the lr of 1024 images per step).")
    final_lr_fraction: float = Field(
        0.0, ge=0, le=1, description="lr at the end of the cosine, as a fraction of the peak: 0 for MoCo "
        "v2, 0.001 for Barlow Twins and SwAV, about 5e-4 for DINO (1e-6 / 0.002).")
    warmup_epochs: float = Field(
        0.0, ge=0, description="Linear warm-up length (epochs); 10 in Barlow Twins, SwAV and DINO, 0 in "
                               "MoCo v2.")
    warmup_start_fraction: float = Field(
        0.0, ge=0, le=1, description="lr at the first warm-up step as a fraction of the peak (SwAV: 0.3 / "
                                     "4.8).")
    weight_decay: float = Field(
        1e-6, ge=0, description="Weight decay at step 0 (not on biases and norms): 1.5e-6 Barlow Twins, "
        "1e-6 SwAV, 1e-4 MoCo v2, 0.04 DINO.")
    weight_decay_end: float | None = Field(
        None, ge=0, description="Weight decay at the end of a cosine schedule (DINO: 0.4); unset = constant.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/LARS momentum; 0.9 in every official recipe.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas; torch defaults, as DINO.")
    lars_eta: float = Field(0.001, gt=0, description="LARS / LARC trust coefficient; 0.001 in Barlow Twins "
                                                     "and SwAV.")
    no_decay_lr_scale: float = Field(
        1.0, gt=0, description="lr multiplier of biases and norms: Barlow Twins trains them at 0.0048 / 0.2 "
                               "= 0.024 of the weights' lr; 1 elsewhere.")

    def peak_lr(self, global_batch: int) -> float:
        from pathssl_cli.optim import scaled_lr

        if not self.scale_lr:
            return self.lr
        if self.lr_scaling == "sqrt_1024":
            return self.lr * (global_batch / 1024) ** 0.5
        return scaled_lr(self.lr, global_batch)


class PretrainRun(Section):
    output_dir: OutputPath = Field(description="Run directory: checkpoints/, backbone.safetensors, "
                                               "metrics.jsonl, loss_curve.png, stain_statistics.json, "
                                               "spec.toml, run.json.")
    seed: int = Field(0, description="Seeds model init, the data order and the views; same seed = same run.")
    precision: PrecisionChoice = Field(
        "auto", description="'auto' = bf16 autocast on CUDA and fp32 on CPU; 'fp16' adds a GradScaler; "
                            "'bf16' on CPU trains 1.6-2.4× faster on recent CPUs at bf16's lower precision.")
    channels_last: bool = Field(False, description="NHWC memory format; faster for CNNs on GPUs with tensor "
                                                   "cores.")
    compile: bool = Field(False, description="torch.compile the method's forward; pays a compile time up "
                                             "front.")
    epochs: float | None = Field(
        None, gt=0, description="Training length in epochs (see epoch_images); set this or `steps`.")
    steps: int | None = Field(
        None, ge=1, description="Training length in optimiser steps; set this or `epochs`. The paper trains "
                                "200 ImageNet-epoch equivalents: 200 × 1,281,167 images / batch_size steps.")
    epoch_images: int | None = Field(
        None, ge=1, description="Images that make one epoch for every epoch-counted setting (run.epochs, "
        "optim.warmup_epochs, the methods' warm-ups and freezes); unset = one pass over the tiles. 1281167 "
        "counts in ImageNet epochs, as Kang et al. (200 ImageNet epochs) and the official recipes do.")
    checkpoint_every: int = Field(
        500, ge=1, description="Steps between checkpoints (checkpoints/last.pt, written atomically); the "
                               "end of the run always writes one.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl records.")
    resume: bool = Field(
        False, description="Continue from output_dir/checkpoints/last.pt exactly where it stopped (same "
        "weights, optimiser, RNG and data position); false refuses to overwrite a run that has checkpoints.")
    device: str = Field("auto", description="'auto' (this rank's GPU when present), 'cpu', 'cuda' or "
                                            "'cuda:N'.")

    @model_validator(mode="after")
    def _one_length(self) -> PretrainRun:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of run.epochs and run.steps")
        return self


class PretrainSpec(SpecModel):
    kind: Literal["pretrain"] = "pretrain"
    data: PretrainData
    model: PretrainModel = Field(default_factory=PretrainModel)
    method: MethodOptionsUnion = Field(description="The SSL method: name = mocov2 | swav | barlow_twins | "
                                                   "dino | dinov2, with its options beside it.")
    augment: PretrainAugment = Field(default_factory=PretrainAugment)
    optim: PretrainOptim = Field(default_factory=PretrainOptim)
    run: PretrainRun

    @model_validator(mode="after")
    def _cross_checks(self) -> PretrainSpec:
        n_global, n_local = view_counts(self.method)
        try:
            self.augment.recipe(self.method.name, n_global, n_local)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ValueError(f"augment: {_first_line(exc)}") from None
        if self.optim.weight_decay_end is not None and self.optim.weight_decay_end < 0:
            raise ValueError("optim.weight_decay_end must be >= 0")
        if self.method.name == "dinov2" and backbone_info(self.model.backbone).family != "vit":
            raise ValueError(f"model.backbone = {self.model.backbone!r} is not a ViT: dinov2 masks patch tokens; "
                             "use a ViT such as vit_small_patch16_dinov2 or vit_tiny_reg4")
        return self

    def check_inputs(self) -> list[Problem]:
        where = f"{self.source_file}: " if self.source_file else ""
        problems = []
        if self.data.slides:
            problems += _slide_problems(self.data.slides, f"{where}data.slides")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.data.batch_size % world:
            problems.append(Problem(f"{where}data.batch_size", f"{self.data.batch_size} images per step "
                                                               "cannot be "
                                    f"split evenly over {world} processes; use a multiple of {world}"))
        return problems


def _as_mpp(value: float | str) -> float:
    if isinstance(value, str):
        if value.lower() not in MAGNIFICATION_MPP:
            raise ValueError(f"data.mpp: unknown magnification {value!r}; use µm/px or one of "
                             f"{', '.join(MAGNIFICATION_MPP)}")
        return MAGNIFICATION_MPP[value.lower()]
    return float(value)


def view_counts(options: Any) -> tuple[int, int]:
    """(global, local) views the method consumes; two-view methods have no n_*_crops options."""
    return int(getattr(options, "n_global_crops", 2)), int(getattr(options, "n_local_crops", 0))


def _slide_problems(items: list[str], where: str) -> list[Problem]:
    """A path without glob characters names one file that must exist; a pattern must match at least one."""
    import re

    from pathssl_cli.specs.tile import resolve_slide_items

    missing = [Problem(f"{where}[{i}]", f"file not found: {item}. Fix the path, or use a glob pattern or a CSV "
                       "list for slides that may be absent.")
               for i, item in enumerate(items) if not re.search(r"[*?\[]", item) and not Path(item).exists()]
    if missing:
        return missing
    try:
        found = resolve_slide_items(items)
    except (ValueError, OSError) as exc:
        return [Problem(where, str(exc))]
    return [] if found else [Problem(where, f"no slide matched {items}. Check the paths or glob patterns.")]


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors)
    return str(exc).splitlines()[0]
