"""`kind = "segment"`: HoVer-Net nuclei segmentation (train, eval, predict) on a registry backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pathssl_cli.errors import Problem
from pathssl_cli.specs.core import (
    BackboneName,
    InputPath,
    NormalizationSpec,
    OutputPath,
    PathPattern,
    Section,
    SpecModel,
    WeightsRef,
)
from pathssl_cli.specs.tile import SlideReaderName

#: Test-time augmentation of `segment eval`/`predict`; the poses of each are `segment.inference.POSES`.
TTAChoice = Literal["none", "flips", "dihedral"]


class SegmentData(Section):
    format: Literal["pannuke", "consep", "generic"] = Field(
        default="consep",
        description="Dataset layout: 'pannuke' fold folders (images.npy, masks.npy, types.npy), 'consep' "
        "(Images/*.png + Labels/*.mat) or 'generic' (images/ + labels/ [+ types/]). CoNSeP is the paper's "
        "low-label benchmark, hence the default.",
    )
    train: list[InputPath] = Field(
        default_factory=list,
        description="Training folders (PanNuke: fold folders; "
        "the three-fold protocol trains on one or two folds and tests on the rest).",
    )
    val: list[InputPath] = Field(
        default_factory=list,
        description="Validation folders, scored after each epoch "
        "when given (loss only, to keep epochs cheap).",
    )
    test: list[InputPath] = Field(default_factory=list, description="Folders `segment eval` scores.")
    subset: InputPath | None = Field(
        default=None,
        description="Image ids to keep from `train` (a `pathssl subsample` "
        "output, a CSV with an id/name/path column, or one id per line): the paper's "
        "low-label CoNSeP fractions. None = all training images.",
    )
    num_types: int = Field(
        default=0,
        ge=0,
        description="Nucleus types excluding background (PanNuke 5, merged CoNSeP 4). "
        "0 = no type (NC) branch, instance segmentation only.",
    )
    mpp: float = Field(
        default=0.25,
        gt=0,
        description="µm/px of the training images; slides are predicted at this scale unless predict.mpp "
        "says otherwise. CoNSeP and PanNuke are 40x scans at 0.25 µm/px, hence the default.",
    )
    merge_consep_types: bool = Field(
        default=False,
        description="Map CoNSeP's 7 types to HoVer-Net's 4 (3+4 -> epithelial, "
        "5+6+7 -> spindle). Off by default: leave it off for data already merged.",
    )


class SegmentModel(Section):
    backbone: BackboneName = Field(
        default="resnet50", description="Encoder from the backbone registry; ResNet-50 as in the paper."
    )
    weights: WeightsRef = Field(
        default="random",
        description="Encoder weights: 'random' or a local file (e.g. a "
        "`pathssl pretrain` export); never downloaded.",
    )
    normalization: NormalizationSpec = Field(
        default="auto",
        description="Input normalisation stats: 'auto' takes those stored with a pathssl export (or a timm "
        "release's config.json), else ImageNet's; 'lunit_tcga' for Lunit's released weights, which carry none; "
        "'timm' for the architecture's default timm release; or {mean = [...], std = [...]}.",
    )
    mode: Literal["original", "fast", "same"] = Field(
        default="fast",
        description="HoVer-Net size mode: 'original' 270 px in -> 80 px out, 'fast' 256 -> 164 (the "
        "official PanNuke/CoNSeP choice, hence the default), 'same' input_size in and out.",
    )
    input_size: int = Field(default=256, ge=32, description="Patch size in px, used by mode 'same' only.")
    decoder_width: float = Field(
        default=1.0,
        gt=0,
        le=4,
        description="Multiplier of HoVer-Net's decoder channels; 1.0 is "
        "the paper's. Small values (0.25) keep CPU tests fast.",
    )
    encoder_stem: Literal["full", "stride4"] = Field(
        default="full",
        description="'full' = HoVer-Net's encoder: registry ResNets run their stem conv at stride 1 with no "
        "max-pool (weights load unchanged), giving decoder skips at strides 1, 2, 4, 8; ViTs add a light image "
        "stem to their finest maps. 'stride4' = the backbone's own stem (skips at 4-32, about 3x cheaper on a "
        "CPU, coarser boundaries). Default 'full': it is what HoVer-Net was published and evaluated with.",
    )
    checkpoint: InputPath | None = Field(
        default=None,
        description="Trained HoVer-Net for eval/predict; None = "
        "<run.output_dir>/model.pt written by `segment train`.",
    )


class LossWeightsSection(Section):
    np_ce: float = Field(default=1.0, ge=0, description="NP cross-entropy weight (HoVer-Net: 1).")
    np_dice: float = Field(default=1.0, ge=0, description="NP Dice weight (HoVer-Net: 1).")
    hv_mse: float = Field(default=1.0, ge=0, description="HV MSE weight (HoVer-Net: 1).")
    hv_msge: float = Field(
        default=2.0, ge=0, description="HV gradient MSE weight (HoVer-Net paper: 2; its opt.py: 1)."
    )
    tp_ce: float = Field(default=1.0, ge=0, description="NC cross-entropy weight (HoVer-Net: 1).")
    tp_dice: float = Field(default=1.0, ge=0, description="NC Dice weight (HoVer-Net: 1).")


class SegmentTrain(Section):
    phase1_epochs: int = Field(
        default=50, ge=0, description="Epochs with the encoder frozen (HoVer-Net: 50)."
    )
    phase2_epochs: int = Field(
        default=50, ge=0, description="Epochs training the whole network (HoVer-Net: 50)."
    )
    frozen_bn_stats: bool = Field(
        default=False,
        description="Phase 1 keeps the encoder's BatchNorm running statistics as loaded (encoder in "
        "eval mode). Off by default as in HoVer-Net, whose freeze only stops gradients; on for a strict "
        "frozen-encoder ('linear') protocol, where the pre-trained features must stay exactly as they were.",
    )
    batch_size: int = Field(
        default=16, ge=1, description="Patches per step per process in phase 1 (HoVer-Net: 16)."
    )
    phase2_batch_size: int = Field(
        default=4,
        ge=1,
        description="Patches per step per process in phase 2; HoVer-Net drops "
        "to 4 because gradients through the encoder cost memory.",
    )
    lr: float = Field(
        default=1e-4, gt=0, description="Adam learning rate at the start of each phase (HoVer-Net: 1e-4)."
    )
    lr_step_epochs: int = Field(
        default=25, ge=1, description="Epochs between lr decays (HoVer-Net StepLR step 25)."
    )
    lr_gamma: float = Field(
        default=0.1, gt=0, le=1, description="Factor of each lr decay (StepLR default 0.1)."
    )
    steps_per_epoch: int | None = Field(
        default=None,
        ge=1,
        description="Cap on steps per epoch (quick runs, CPU tests); None = one pass over the patches.",
    )
    augment: Literal["hovernet", "dihedral"] = Field(
        default="hovernet",
        description="'hovernet' = the official HoVer-Net augmentations (affine scale 0.8-1.2 per axis, "
        "shear 5 deg, any rotation, 1 % translation, flips; blur, median blur or noise; hue, saturation, "
        "brightness and contrast jitter; see pathssl_cli.augment.nuclei), the paper's recipe and the default. "
        "'dihedral' = flips and 90-degree rotations only (the `flips`/`rotations` fields), cheaper and weaker.",
    )
    flips: bool = Field(
        default=True, description="augment = 'dihedral': random horizontal flips (with rotations: all 8 poses)."
    )
    rotations: bool = Field(default=True, description="augment = 'dihedral': random 90-degree rotations.")
    stain: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="HED stain jitter σ (Tellez et al. 2018): each stain's optical density od -> "
        "od * U(1-σ, 1+σ) + U(-σ, σ), the offset in OD = -ln(I) (pathssl_cli.augment.stain.hed_jitter, the same "
        "op and units as evaluate's hed_sigma and pretrain's hed_jitter). 0.05 is Tellez's 'HED-light'; 0 = off.",
    )
    target_context: int = Field(
        default=0,
        ge=0,
        description="Px of label context per side around each training patch for the HV targets: a nucleus "
        "cut by the patch border gets the HV map of its whole shape, as in HoVer-Net (targets computed on "
        "the input, cropped to the smaller output). Matters in mode 'same', where input = output; 0 = none "
        "(cut nuclei centred on their visible part). Needs augment = 'dihedral'.",
    )
    loss: LossWeightsSection = Field(default_factory=LossWeightsSection, description="Loss term weights.")
    workers: int = Field(default=2, ge=0, description="DataLoader worker processes.")
    image_cache_mb: float = Field(
        default=256,
        ge=0,
        description="MiB of decoded images each data process keeps per split (least recently used first out), "
        "so the patches cut from one image decode it once: 2.6x faster patches on the CoNSeP tiles "
        "(benchmarks/segment_step.py). The total is up to 2 splits x (workers or 1) x this; 256 holds ~30 "
        "full 1000 px CoNSeP images with their maps. 0 = decode every time.",
    )

    @model_validator(mode="after")
    def _context_needs_dihedral(self) -> SegmentTrain:
        if self.target_context and self.augment == "hovernet":
            raise ValueError("train.target_context needs augment = 'dihedral' (the affine warp crops the maps "
                             "to the input size)")
        return self


class PostprocSection(Section):
    """HoVer-Net's marker-controlled watershed (pathssl_cli.segment.postproc). The defaults are the official
    `__proc_np_hv` values, tuned on HoVer-Net's own fully trained 40x models: keep them unless validation
    data (never the test set) says otherwise for a given model."""

    np_thresh: float = Field(
        default=0.5, gt=0, lt=1,
        description="NP probability at or above which a pixel is nucleus (official 0.5: the argmax of two "
        "classes).",
    )
    marker_thresh: float = Field(
        default=0.4, gt=0, lt=1,
        description="Normalised HV-gradient strength (0-1, min-max over the processed window) at or above "
        "which a foreground pixel is a boundary, not a marker; lower splits more (official 0.4).",
    )
    sobel_ksize: int = Field(
        default=21, ge=1, le=31,
        description="Sobel kernel size in px (odd) for the HV gradients; official 21 at 40x (0.25 µm/px).",
    )
    min_size: int = Field(
        default=10, ge=0,
        description="Foreground blobs and markers under this many px are dropped (official 10 at 40x).",
    )

    @model_validator(mode="after")
    def _odd_kernel(self) -> PostprocSection:
        if self.sobel_ksize % 2 == 0:
            raise ValueError(f"sobel_ksize must be odd (OpenCV Sobel), got {self.sobel_ksize}")
        return self


class SegmentPredict(Section):
    inputs: list[PathPattern] = Field(
        default_factory=list,
        description="Images (png/jpg/tif) or slides (svs/tiff/ndpi/...; globs allowed) to segment.",
    )
    region: tuple[int, int, int, int] | None = Field(
        default=None,
        description="Slide region x, y, width, height in "
        "level-0 px; None = the whole image or slide level 0.",
    )
    reader: SlideReaderName = Field(
        default="auto",
        description="Slide library for slide inputs: 'auto' tries tiffslide, then OpenSlide (extra "
        "'openslide'), then wsidicom (extra 'dicom'); recorded in run.json.",
    )

    mpp: float | None = Field(
        default=None,
        gt=0,
        description="µm/px at which slides are segmented (read by `pathssl tile`'s level-selection and "
        "resampling rules; outputs stay in level-0 coordinates). None = data.mpp, the training data's scale. "
        "Image files (png/jpg/small tif) are taken to be at the model's scale already.",
    )
    mpp_override: float | None = Field(
        default=None,
        gt=0,
        description="Level-0 µm/px of every slide, winning over its metadata's MPP (as `pathssl tile`'s "
        "input.mpp_override; recorded as the MPP's source). None = the metadata's MPP; a slide without one "
        "fails with a clear error.",
    )
    tissue_only: bool = Field(
        default=True,
        description="Segment only chunks holding tissue by `pathssl tile`'s detector (glass is skipped and "
        "costs nothing); false = every chunk of the region.",
    )
    chunk_size: int = Field(
        default=2048,
        ge=64,
        description="Output px per side post-processed at once: bounds memory "
        "whatever the slide size; rounded up to a multiple of the model output size.",
    )
    chunk_margin: int = Field(
        default=64,
        ge=16,
        description="Context px around each chunk for post-processing; must "
        "exceed the largest nucleus diameter so border nuclei are whole in their owner.",
    )
    batch_size: int = Field(default=8, ge=1, description="Patches per forward pass.")
    trim: int | None = Field(
        default=None, ge=0, description="Output px dropped per patch side, patches overlapping to match. "
        "None = 1/8 of the output for mode 'same' (which has no context of its own; its tile borders would "
        "show as seams) and 0 for 'original'/'fast', whose outputs are already the centre of their input.")
    tta: TTAChoice = Field(
        default="none", description="Test-time augmentation: the network's outputs averaged over 'flips' (4 "
        "poses: mirrors and the half turn) or 'dihedral' (all 8 flips and quarter turns), HV maps transformed "
        "as vectors; costs 4x or 8x the network time. 'none' = one pass, as HoVer-Net's published inference. "
        "Used by `segment eval` and `segment predict` alike.")
    map_format: Literal["npy", "tif"] = Field(
        default="npy", description="Instance map file: .npy (memory-mapped) or tiled .tif (int32)."
    )
    overlay: bool = Field(
        default=True,
        description="Write an overlay PNG with contours coloured by type (skipped above "
        "overlay_max_px per side to keep memory bounded).",
    )
    overlay_max_px: int = Field(default=8192, ge=256, description="Largest overlay side in px.")
    postproc: PostprocSection = Field(
        default_factory=PostprocSection,
        description="Watershed post-processing, used by `segment predict` and `segment eval` alike.",
    )


class SegmentRun(Section):
    output_dir: OutputPath = Field(
        default=Path("runs/segment"),
        description="Run directory (model.pt, checkpoints, metrics, predictions).",
    )
    seed: int = Field(default=0, description="Seed of initialisation and data order.")
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="bf16",
        description="Autocast precision on GPU (CPU always runs fp32); bf16 needs no loss scaling.",
    )
    resume: bool = Field(
        default=True, description="Continue from <output_dir>/checkpoints/last.pt when present."
    )
    channels_last: bool = Field(
        default=True,
        description="NHWC memory layout for training and inference: oneDNN's CPU convolutions and GPU tensor "
        "cores are faster on it (HoVer-Net training steps 1.4x faster on CPU: benchmarks/segment_step.py). "
        "Same maths up to float rounding; false = PyTorch's default NCHW.",
    )


class SegmentSpec(SpecModel):
    kind: Literal["segment"] = "segment"
    data: SegmentData = Field(default_factory=SegmentData, description="Dataset layout, splits, types.")
    model: SegmentModel = Field(default_factory=SegmentModel, description="Encoder and HoVer-Net mode.")
    train: SegmentTrain = Field(default_factory=SegmentTrain, description="Two-phase schedule, losses.")
    predict: SegmentPredict = Field(default_factory=SegmentPredict, description="Whole-image inference.")
    run: SegmentRun = Field(default_factory=SegmentRun, description="Output, seed, device, precision.")

    @model_validator(mode="after")
    def _types_consistent(self) -> SegmentSpec:
        if self.data.format == "pannuke" and self.data.num_types not in (0, 5):
            raise ValueError(f"data.num_types = {self.data.num_types}, but PanNuke has 5 types; use 5 or 0")
        if self.data.merge_consep_types and self.data.num_types not in (0, 4):
            raise ValueError(
                f"data.merge_consep_types gives 4 types but data.num_types = {self.data.num_types}"
            )
        return self

    def check_inputs(self) -> list[Problem]:
        from pathssl_cli.segment.datasets import check_sources

        problems: list[Problem] = []
        # The source file is attached only after these checks, so problems name the field alone.
        for split in ("train", "val", "test"):
            problems += check_sources(self.data.format, getattr(self.data, split), f"data.{split}")
        return problems
