"""Protocol versions: one integer per command for what pathssl computes from a given spec and inputs.

The spec digest cannot see a change of pathssl itself: a field added with a default that changes what is
computed leaves old spec.toml files matching (a field added later at its default is deliberately not a
difference, `rule._drop_new_defaults`), and a fix changes results without any field. So each command has a
version, recorded in run.json's `fingerprints.protocol`; a run recorded under another version (or under none:
run.json files written before versions existed) is stale.

Bump a command's version in the same commit as the change, by adding a line to its HISTORY below: the commit
and what now differs. Bump for a default or a fix that changes a result of a spec that did not change; do not
bump for speed-ups, new fields whose default keeps the old computation, or new options.

The versions before fingerprints existed were assigned afterwards (issue 20) from `git log`; no run.json holds
them, so they document why a run of that era is not comparable.
"""

from __future__ import annotations

_TIMM_RELEASE = ("9590f30: model.normalization = 'auto' takes a timm release's mean/std from the config.json beside "
                 "the weights (the ImageNet ViT-S/16 release was fed ImageNet's statistics instead of 0.5)")

#: command -> {version: why}. The newest version of each command is its current one.
HISTORY: dict[str, dict[int, str]] = {
    "tile": {
        1: "tile stores with parts/ and shards/ (the tiler resumes slide by slide by its own rules)",
        2: "931ca54: an explicit input.mpp_override wins over the slide's metadata",
    },
    "pretrain": {
        1: "the first SSL training loop",
        2: "ac9c567: DINO exports its EMA teacher (was the student); RandStainNA std_hyper defaults to -0.3; "
           "initial weights from a DINO checkpoint take its teacher",
        3: "85d55ad: Barlow Twins under DDP uses the official raw all_reduce gradient by default",
        4: "c55a39d: the 'pathology' preset's RandStainNA draws templates from a Gaussian mixture (was one Gaussian)",
        5: "808d81b: weight decay and LARS/LARC follow each method's official code (SwAV: LARC over every "
           "parameter; MoCo v2 and SwAV decay biases and norms)",
        6: _TIMM_RELEASE,
        7: "6493f23: patches streamed from slides (data.slides) whose JPEG level is 2, 4 or 8 times finer than "
           "needed are decoded at that scale by libjpeg's scaled IDCT (was a full decode, then area resizing): "
           "the pixels a spec with slides trains on differ by about a grey level on average",
        8: "DINOv2's teacher-temperature warm-up, when longer than the run, keeps its per-step rate and is cut at "
           "the run's end (it was compressed into the run, reaching teacher_temp early); DINO and DINOv2 warn",
    },
    "linear": {
        1: "4c50b7a: pooled features; a DINO checkpoints/last.pt was evaluated through its student",
        2: "ac9c567: model.weights_network = 'auto' evaluates a DINO checkpoint's teacher (dino eval_linear.py)",
        3: "7291fb8: [features] recipe: under the 'paper' preset a ViT's features are the CLS tokens of its last "
           "4 blocks (dino eval_linear.py, 1536-d for ViT-S) instead of the pooled CLS token (384-d)",
        4: _TIMM_RELEASE,
    },
    "finetune": {
        1: "e48c309: the first fine-tuning protocol",
        2: "ac9c567: a DINO checkpoint starts from its teacher (was the student)",
        3: _TIMM_RELEASE,
    },
    "knn": {
        1: "4c50b7a: the first kNN protocol",
        2: "ac9c567: a DINO checkpoint is evaluated through its teacher (was the student)",
        3: "8067496: the neighbours are the whole training partition (train + a val carved out of it, as dino "
           "eval_knn.py) and scores are vote fractions (AUROC ranked a saturated softmax before)",
        4: _TIMM_RELEASE,
    },
    "subsample": {1: "the first seeded, stratified, nested subsets"},
    "segment train": {
        1: "30a2188: the first HoVer-Net training",
        2: "a028ce3 / ac9c567: HoVer-Net's full-resolution encoder stem by default; a DINO checkpoint's teacher "
           "initialises the encoder",
        3: "a337605: HoVer-Net's official augmentations (train.augment = 'hovernet') by default",
        4: _TIMM_RELEASE,
    },
    "segment eval": {
        1: "30a2188: the first evaluation",
        2: "cd022a9: predict.trim defaults to 1/8 of the output for mode 'same' (tile seams before)",
    },
    "segment predict": {
        1: "the chunked whole-slide prediction",
        2: "5f124a7 / 931ca54: pyramid levels are read in their own pixels (tiffslide read level pixel l-1 at "
           "downsample 2.000337); an explicit mpp_override wins over the slide's metadata",
    },
}


def protocol_version(command: str) -> int | None:
    """The current version of `command`; None for a command without one (a spec kind used only in tests)."""
    history = HISTORY.get(command)
    return max(history) if history else None


def why_version(command: str, version: int) -> str:
    return HISTORY.get(command, {}).get(version, "")
