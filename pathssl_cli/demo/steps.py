"""`pathssl demo`: the whole study on synthetic data, through the same specs and code paths as the real commands.

Every step writes its spec into `<out>/specs/` (copy and edit them for real data), loads it with `load_spec`
exactly as the CLI does, and calls the command's `run_*` function. Sizes are chosen so the whole chain runs in a
few minutes on 2 CPU cores and unchanged on a GPU ("auto" device).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from pathssl_cli.console import info
from pathssl_cli.demo.state import DemoState
from pathssl_cli.errors import WorkFailed
from pathssl_cli.specs import SpecModel, load_spec

BACKBONE = "resnet_tiny"  # 0.4M parameters: pre-training takes about a minute on 2 CPU cores
TILE_PX = 64  # tiles, views and evaluation images: small enough for a CPU, large enough to show texture


def write_spec(state: DemoState, name: str, spec: dict[str, Any]) -> SpecModel:
    """Write a spec the user can copy, then load it exactly as `pathssl <command> SPEC` would."""
    path = state.specs / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `pathssl demo`; run it again with the matching pathssl command, e.g. on real data.\n"
    path.write_text(header + tomli_w.dumps(spec))
    return load_spec(path)


def rel(state: DemoState, target: Path) -> str:
    """Paths in demo specs are relative to the specs folder, so the demo folder can be moved as a whole."""
    import os

    return os.path.relpath(target, state.specs)


def step(state: DemoState, number: int, title: str, action: Callable[[], Any]) -> Any:
    info(f"[{number}/7] {title}")
    begin = time.perf_counter()
    result = action()
    state.timings[title] = time.perf_counter() - begin
    info(f"      done in {state.timings[title]:.0f} s")
    return result


# --------------------------------------------------------------------------------------------------- steps
def make_data(state: DemoState) -> None:
    from pathssl_cli.synthetic_sets import write_consep_like, write_slides, write_two_site_folder

    write_slides(state.data / "slides", count=2, size=3072, mpp=0.25, seed=0)
    write_two_site_folder(state.data / "labelled", n_per_class=40, size=TILE_PX, seed=1)
    write_consep_like(state.data / "nuclei" / "train", n_images=24, size=128, seed=2)
    write_consep_like(state.data / "nuclei" / "test", n_images=4, size=128, seed=3)


def tile(state: DemoState) -> Path:
    from pathssl_cli.tiling.tiler import run_tile

    store = state.runs / "tiles"
    spec = write_spec(state, "tile", {
        "kind": "tile",
        "input": {"slides": [rel(state, state.data / "slides" / "*.tif")]},
        "tiles": {"mpp": [0.5, 1.0], "size": TILE_PX, "min_tissue": 0.5},
        "output": {"dir": rel(state, store)},
        "run": {"workers": 2},
    })
    state.results["tile"] = run_tile(spec)  # type: ignore[arg-type]
    return store


def pretrain(state: DemoState, store: Path) -> Path:
    from pathssl_cli.pretrain import run_pretrain

    run_dir = state.runs / f"pretrain_{state.method}"
    spec = write_spec(state, "pretrain", {
        "kind": "pretrain",
        "data": {"tiles": [rel(state, store)], "batch_size": 32, "workers": 0,
                 "mpp_weights": {"0.5": 0.5, "1.0": 0.5}},
        "model": {"backbone": BACKBONE, "img_size": TILE_PX},
        "method": TINY_METHODS[state.method],
        "augment": {"preset": "pathology", "global_size": TILE_PX, "local_size": 32, "stain_fit_tiles": 128},
        "optim": TINY_OPTIMS[state.method],
        "run": {"output_dir": rel(state, run_dir), "steps": METHOD_STEPS[state.method], "seed": 0,
                "checkpoint_every": 50, "log_every": 5},
    })
    state.results["pretrain"] = run_pretrain(spec)  # type: ignore[arg-type]
    return run_dir


# Method and optimiser settings mirror specs/pretrain/tiny_<method>.toml (heads and EMA scaled to a short CPU run;
# each value's source is cited there).
TINY_METHODS: dict[str, dict[str, Any]] = {
    "mocov2": {"name": "mocov2", "hidden_dim": 128, "out_dim": 64, "queue_size": 512, "temperature": 0.2,
               "momentum": 0.99},
    "swav": {"name": "swav", "hidden_dim": 128, "out_dim": 64, "n_prototypes": 32, "temperature": 0.1,
             "epsilon": 0.05, "sinkhorn_iterations": 3, "n_global_crops": 2, "n_local_crops": 2,
             "queue_length": 0, "freeze_prototypes_epochs": 1.0},
    "barlow_twins": {"name": "barlow_twins", "projector_dims": [256, 256, 256], "lambd": 0.0051},
    "dino": {"name": "dino", "out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 64, "n_global_crops": 2,
             "n_local_crops": 2, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07,
             "warmup_teacher_temp_epochs": 3, "momentum_teacher": 0.99, "freeze_last_layer_epochs": 1,
             "clip_grad": 3.0},
}
TINY_OPTIMS: dict[str, dict[str, Any]] = {
    "mocov2": {"name": "sgd", "lr": 0.06, "weight_decay": 1e-4, "warmup_epochs": 0.5},
    "swav": {"name": "lars", "lr": 0.6, "final_lr_fraction": 0.001, "warmup_epochs": 1, "weight_decay": 1e-6},
    "barlow_twins": {"name": "lars", "lr": 0.2, "no_decay_lr_scale": 0.024, "final_lr_fraction": 0.001,
                     "warmup_epochs": 1, "weight_decay": 1.5e-6},
    "dino": {"name": "adamw", "lr": 0.004, "final_lr_fraction": 0.0005, "warmup_epochs": 1,
             "weight_decay": 0.04, "weight_decay_end": 0.4},
}
# DINO's ViT-style multi-crop costs about twice the others per step on a CPU.
METHOD_STEPS = {"mocov2": 300, "swav": 240, "barlow_twins": 300, "dino": 160}


def evaluate(state: DemoState, backbone: Path) -> dict[str, Path]:
    from pathssl_cli.evaluate.knn import run_knn
    from pathssl_cli.evaluate.linear import run_linear

    runs: dict[str, Path] = {}
    for label, weights in (("pretrained", rel(state, backbone)), ("random", "random")):
        common = {"data": {"dataset": "folder", "root": rel(state, state.data / "labelled")},
                  "model": {"backbone": BACKBONE, "weights": weights, "img_size": TILE_PX}}
        linear_dir = state.runs / f"linear_{label}"
        spec = write_spec(state, f"linear_{label}", {
            "kind": "linear", **common,
            "optim": {"preset": "paper", "lrs": [0.1, 1.0], "weight_decays": [0.0, 1e-4], "epochs": 30,
                      "batch_size": 64},
            "run": {"output_dir": rel(state, linear_dir), "seeds": [0, 1, 2], "workers": 0, "batch_size": 64}})
        state.results[f"linear_{label}"] = run_linear(spec)  # type: ignore[arg-type]
        knn_dir = state.runs / f"knn_{label}"
        spec = write_spec(state, f"knn_{label}", {
            "kind": "knn", **common, "knn": {"k": [20, 200], "temperature": 0.07},
            "run": {"output_dir": rel(state, knn_dir), "seeds": [0], "workers": 0, "batch_size": 64}})
        state.results[f"knn_{label}"] = run_knn(spec)  # type: ignore[arg-type]
        runs[f"linear_{label}"], runs[f"knn_{label}"] = linear_dir, knn_dir
    return runs


def low_label(state: DemoState, backbone: Path) -> Path:
    from pathssl_cli.data.subsample import run_subsample
    from pathssl_cli.evaluate.finetune import run_finetune

    subsets = state.runs / "subsets"
    data = {"dataset": "folder", "root": rel(state, state.data / "labelled")}
    spec = write_spec(state, "subsample", {"kind": "subsample", "data": data,
                                           "subsample": {"fractions": [0.1, 0.5, 1.0], "seed": 0},
                                           "run": {"output_dir": rel(state, subsets)}})
    written = run_subsample(spec)  # type: ignore[arg-type]
    state.results["subsample"] = written
    subset_file = _subset_file(subsets, 0.1)
    finetune_dir = state.runs / "finetune_10pct"
    spec = write_spec(state, "finetune_10pct", {
        "kind": "finetune", "data": {**data, "train_subset": rel(state, subset_file)},
        "model": {"backbone": BACKBONE, "weights": rel(state, backbone), "img_size": TILE_PX},
        "optim": {"lr": 1e-3, "epochs": 15, "batch_size": 8, "patience": 5},
        "run": {"output_dir": rel(state, finetune_dir), "seeds": [0], "workers": 0, "batch_size": 64}})
    state.results["finetune_10pct"] = run_finetune(spec)  # type: ignore[arg-type]
    return finetune_dir


def _subset_file(folder: Path, fraction: float) -> Path:
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".csv", ".txt")
                        and (f"{fraction * 100:g}pct" in p.name or f"{fraction:g}" in p.name))
    if not candidates:
        raise WorkFailed(f"subsample wrote no subset file for fraction {fraction} in {folder}")
    return candidates[0]


def segment(state: DemoState, backbone: Path) -> dict[str, Any]:
    from pathssl_cli.segment.predict import run_segment_predict
    from pathssl_cli.segment.score import run_score
    from pathssl_cli.segment.train import run_segment_train

    run_dir = state.runs / "segment"
    nuclei = state.data / "nuclei"
    spec = write_spec(state, "segment", {
        "kind": "segment",
        "data": {"format": "consep", "train": [rel(state, nuclei / "train")], "val": [rel(state, nuclei / "test")],
                 "test": [rel(state, nuclei / "test")], "num_types": 5},
        "model": {"backbone": BACKBONE, "weights": rel(state, backbone), "mode": "same", "input_size": 64,
                  "decoder_width": 0.25, "encoder_stem": "stride4"},
        # stride4 stem and dihedral poses: HoVer-Net's full-resolution stem and affine augmentation cost ~5x per
        # CPU step, more than a two-minute demo on synthetic nuclei can spend (specs/segment/ keep the published
        # ones).
        "train": {"augment": "dihedral", "phase1_epochs": 3, "phase2_epochs": 6, "batch_size": 8,
                  "phase2_batch_size": 8, "lr": 2e-3, "lr_step_epochs": 6, "steps_per_epoch": 15, "workers": 0},
        "predict": {"inputs": [rel(state, nuclei / "test" / "Images" / "*.png")]},
        "run": {"output_dir": rel(state, run_dir)},
    })
    state.results["segment_train"] = run_segment_train(spec)  # type: ignore[arg-type]
    state.results["segment_predict"] = run_segment_predict(spec)  # type: ignore[arg-type]
    scores = run_score(nuclei / "test", run_dir / "predictions", fmt="consep", as_json=False,
                       out_csv=run_dir / "scores.csv")
    state.results["segment_score"] = scores
    return scores


# --------------------------------------------------------------------------------------------------- driver
def run_demo(out: str | Path = "pathssl-demo", method: str = "mocov2") -> dict[str, Any]:
    """Run the whole study on synthetic data into `out`; returns the key numbers (also in summary.json)."""
    from pathssl_cli.demo.report import summarise, write_report

    state = DemoState(out=Path(out).resolve(), method=method)
    state.out.mkdir(parents=True, exist_ok=True)
    info(f"pathssl demo → {state.out} (method: {method}, synthetic data only)")
    step(state, 1, "generate synthetic slides, labelled tiles and nuclei", lambda: make_data(state))
    store = step(state, 2, "tile slides at 0.5 and 1.0 µm/px", lambda: tile(state))
    run_dir = step(state, 3, f"pretrain resnet_tiny with {method} (pathology preset)",
                   lambda: pretrain(state, store))
    backbone = run_dir / "backbone.safetensors"
    eval_runs = step(state, 4, "evaluate linear + kNN: pretrained vs random init",
                     lambda: evaluate(state, backbone))
    finetune_dir = step(state, 5, "subsample + low-label fine-tune (10% of labels)",
                        lambda: low_label(state, backbone))
    step(state, 6, "segment: HoVer-Net train → predict → score", lambda: segment(state, backbone))
    summary = step(state, 7, "report", lambda: write_report(state, store, run_dir, eval_runs, finetune_dir))
    (state.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    info(summarise(summary, state.out / "report.md"))
    return summary
