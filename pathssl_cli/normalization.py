"""Input normalisation choices, shared by the backbone registry and the spec models (torch-free, at the bottom).

A backbone's inputs are RGB images scaled to [0, 1], then normalised per channel with (x − mean) / std; the
statistics must be the ones its weights were trained with, or features and accuracies shift silently.
"""

from __future__ import annotations

from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lunit's TCGA-pretrained release (Kang et al. 2023, github.com/lunit-io/benchmark-ssl).
LUNIT_TCGA_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_TCGA_STD = (0.21716536, 0.26081574, 0.20723464)
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "lunit_tcga": (LUNIT_TCGA_MEAN, LUNIT_TCGA_STD),
}
#: Named input normalisations: 'auto' (statistics stored with the weights, a timm release's config.json, else
#: ImageNet's), 'imagenet', 'lunit_tcga', or 'timm' (the architecture's default timm release, e.g. mean = std =
#: 0.5 for vit_small_patch16_224).
Normalization = Literal["auto", "imagenet", "lunit_tcga", "timm"]
