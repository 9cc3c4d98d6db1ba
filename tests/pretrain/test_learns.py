"""Evidence that pre-training learns: a few hundred CPU steps on synthetic textures raise kNN accuracy on
held-out tiles clearly above the same backbone at random initialisation.

The held-out task: classify tissue textures by kNN (k = 5, cosine) against a gallery of clean tiles, from
query tiles seen under a stain shift (each query's RGB channels scaled by U(0.85, 1.15), as between scanners
or labs). On clean tiles alone the synthetic textures are separable by colour, so even random features reach
~98%; the shift leaves texture as the cue, which is what self-supervision with colour and stain augmentation
teaches.

The held-out set has 200 tiles per texture (600 gallery, 600 queries): with the former 40 per class (120
queries) one query was 0.8 points and the gains differed by up to 6 points from those on 600 queries (seed 0 on
120 queries: MoCo v2 +0.142, Barlow Twins +0.125, SwAV +0.108, DINO +0.025), so a few tiles decided a margin.
Measured on 600 queries (seed-0 random init 0.655; pre-training
seeds 0 / 1 / 2 with `run.seed`, 200 steps, 1 thread, the steps of `_learns`): MoCo v2 +0.097 / +0.115 /
+0.132, SwAV +0.095 / +0.068 / +0.092, Barlow Twins +0.065 / +0.035 / +0.070. The margins sit below the worst
seed and at or above ~1.5 standard errors of a paired difference on 600 queries (~2 points). DINO's student
(its ViT's random init 0.710) gains +0.002 / +0.000 / -0.013, and +0.005 after 600 steps: tiny_dino does not
learn this task (its former +5 points were 120-query noise), so its case fails until its recipe learns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pathssl_cli.backbones import create_backbone
from pathssl_cli.pretrain import run_pretrain
from pathssl_cli.specs import load_spec
from pathssl_cli.synthetic import labelled_tiles, write_image_folder

SPECS = Path(__file__).resolve().parents[2] / "specs" / "pretrain"
SIZE = 32
K = 5
HELD_OUT_PER_CLASS = 200  # held-out tiles per texture, half gallery, half queries (see the docstring)


def knn_accuracy(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, k: int = K) -> float:
    """Majority vote of the k most cosine-similar gallery tiles (features already L2-normalised)."""
    neighbours = (queries @ gallery.T).topk(k, dim=1).indices
    predicted = torch.mode(gallery_labels[neighbours], dim=1).values
    return float((predicted == query_labels).float().mean())


def test_knn_accuracy_by_hand() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.9]]), dim=1)
    # nearest 1: class 0, class 1, and for [1, 0.9] the closest is [0.9, 0.1]... -> class 0 (cos .79 vs .74)
    assert knn_accuracy(gallery, labels, queries, torch.tensor([0, 1, 0]), k=1) == 1.0
    assert knn_accuracy(gallery, labels, queries, torch.tensor([1, 1, 1]), k=1) == pytest.approx(1 / 3)


def _features(backbone_name: str, weights: str | Path, images: np.ndarray, network: str = "auto") -> torch.Tensor:
    torch.manual_seed(0)  # the random-init baseline is the run's own initialisation (seed 0)
    backbone = create_backbone(backbone_name, weights, img_size=SIZE, network=network).eval()  # type: ignore[arg-type]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(backbone.mean).view(1, 3, 1, 1)) / torch.tensor(backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.nn.functional.normalize(backbone(x), dim=1)


def shifted_knn(backbone_name: str, weights: str | Path, network: str = "auto") -> float:
    images, labels = labelled_tiles(HELD_OUT_PER_CLASS, SIZE, seed=123)  # held out: the training folder uses seed 0
    gains = np.random.default_rng(5).uniform(0.85, 1.15, (len(images), 1, 1, 3))
    shifted = np.clip(images * gains, 0, 255).astype(np.uint8)
    y = torch.from_numpy(labels)
    gallery, queries = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    return knn_accuracy(_features(backbone_name, weights, images[gallery], network), y[gallery],
                        _features(backbone_name, weights, shifted[queries], network), y[queries])


@pytest.fixture(scope="module")
def texture_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("textures"), 32, SIZE, seed=0, splits=("train",))


def _learns(method: str, steps: int, margin: float, folder: Path, out: Path) -> None:
    spec = load_spec(SPECS / f"tiny_{method}.toml", [
        f'data.tiles=["{folder}"]', f"run.output_dir={out}", f"run.steps={steps}",
        f"augment.global_size={SIZE}",
        "run.checkpoint_every=100000"])  # the end of the run still writes checkpoints/last.pt
    run_pretrain(spec)  # type: ignore[arg-type]
    name = spec.model.backbone  # type: ignore[attr-defined]
    # What training changed is the student's (the optimiser's) network. DINO exports its EMA teacher, which
    # lags the student by ~1 / (1 - momentum) steps and barely moves in 200 tiny steps (measured: random
    # 0.725, teacher 0.733, student 0.775), so the student is read from the full checkpoint.
    weights = out / ("checkpoints/last.pt" if method == "dino" else "backbone.safetensors")
    random_init = shifted_knn(name, "random")
    trained = shifted_knn(name, weights, "student" if method == "dino" else "auto")
    print(f"{method}: kNN under stain shift, random init {random_init:.3f} -> trained {trained:.3f}")
    assert trained >= random_init + margin, (method, random_init, trained)


def test_mocov2_learns(texture_folder: Path, tmp_path: Path) -> None:
    _learns("mocov2", 200, 0.06, texture_folder, tmp_path / "mocov2")


@pytest.mark.slow  # 1-4 min each on 2 cores; together with MoCo v2 they exceed this area's test budget
@pytest.mark.parametrize("method", ["swav", "barlow_twins", pytest.param("dino", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="tiny_dino does not learn this task in 200 CPU steps (student gains +0.002 / +0.000 / -0.013 over "
           "seeds 0-2, module docstring); strict: the day it clears the margin this case fails until the mark "
           "goes"))])
def test_other_methods_learn(method: str, texture_folder: Path, tmp_path: Path) -> None:
    # Margins from the measured gains (module docstring). DINO's ViT sees 4x4 patches of these 32 px tiles and
    # measurably learns nothing in 200 steps: 0.03 is the margin a learning recipe must clear, not one it clears.
    margins = {"swav": 0.05, "barlow_twins": 0.03, "dino": 0.03}
    _learns(method, 200, margins[method], texture_folder, tmp_path / method)
