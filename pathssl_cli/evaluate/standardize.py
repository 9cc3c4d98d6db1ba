"""`features.normalize`: standardise every feature dimension with the training split's statistics.

A linear probe trained by gradient steps on raw features measures their scale as much as their content: one
learning rate must suit every dimension, and features whose dimensions differ by orders of magnitude (a random
CNN's pooled maps, a ViT's unnormalised tokens) train badly at any single rate. MAE's linear probe removes
this with a BatchNorm without affine parameters in front of the head (He et al., "Masked Autoencoders Are
Scalable Vision Learners", CVPR 2022, §A.2: `BatchNorm1d(affine=False, eps=1e-6)`), i.e. it standardises
each dimension with statistics of the training data; scikit-learn's StandardScaler before a
LogisticRegression is the same thing for L-BFGS probes.

Here the mean and standard deviation (ddof 0, as BatchNorm and StandardScaler normalise) are computed once
on the training split's cached features, in float64, and the same affine map is applied to train, val and
the evaluation split: nothing is ever estimated on val or test, which would leak their distribution into
the probe. A dimension that is constant on the training split is centred but not scaled (StandardScaler's
convention) instead of dividing by ~0, which would turn float noise on other splits into huge values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# A dimension whose std is below this fraction of its mean's magnitude is float32 rounding of one value
# (float32 keeps 24 bits, ~6e-8 relative); an exactly zero std is constant too.
_CONSTANT_RELATIVE_STD = 1e-6


@dataclass(frozen=True)
class Standardizer:
    """x ↦ (x − mean) / scale, per dimension, fitted on training features only."""

    mean: torch.Tensor  # (D,) float64
    scale: torch.Tensor  # (D,) float64, 1 where the training split is constant
    n_fit: int  # training items the statistics come from
    constant_dims: int  # dimensions left unscaled

    @classmethod
    def fit(cls, train: torch.Tensor) -> Standardizer:
        """Statistics of (N, D) training features (N ≥ 1)."""
        if train.ndim != 2 or train.shape[0] < 1:
            raise ValueError(f"expected (N ≥ 1, D) training features, got {tuple(train.shape)}")
        x = train.double()
        mean = x.mean(dim=0)
        std = (x - mean).square().mean(dim=0).sqrt()  # two passes: no cancellation for large means
        constant = std <= _CONSTANT_RELATIVE_STD * mean.abs()
        scale = torch.where(constant, torch.ones_like(std), std)
        return cls(mean=mean, scale=scale, n_fit=int(x.shape[0]), constant_dims=int(constant.sum()))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features of any split, standardised with the training statistics, as float32."""
        return ((features.double() - self.mean) / self.scale).float()

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the normalisation."""
        return {
            "method": "standardize",
            "statistics_from": "train",
            "n_fit": self.n_fit,
            "ddof": 0,
            "constant_dims": self.constant_dims,
        }
