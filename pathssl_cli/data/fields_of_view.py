"""Fields of view (µm/px) of patches cut from slides: a weighted list, or log-uniform on a range, and what each
slide can give of them under `pathssl tile`'s rule (never finer than its level 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathssl_cli.tiling.slide import MPP_TOLERANCE


@dataclass(frozen=True)
class MppSampling:
    """Fields of view (µm/px) of slide patches: a weighted list, or log-uniform on [low, high]."""

    values: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    log_uniform: tuple[float, float] | None = None

    def expected_square(self) -> float:
        """E[mpp²]: the mean patch area is size² × this (µm²)."""
        if self.log_uniform is not None:
            low, high = self.log_uniform
            if math.isclose(low, high):
                return low * low
            return (high * high - low * low) / (2 * math.log(high / low))
        w = np.asarray(self.weights, np.float64)
        return float(np.dot(w / w.sum(), np.square(self.values)))

    def widest(self) -> float:
        return self.log_uniform[1] if self.log_uniform is not None else max(self.values)

    def for_slide(self, base_mpp: float, side: int,
                  size: int) -> tuple[np.ndarray, np.ndarray] | tuple[float, float] | None:
        """What a slide whose shorter side is `side` level-0 px can give: (values, probabilities), (low, high),
        or None. A field of view finer than level 0 (beyond `pathssl tile`'s 2% tolerance) or wider than the
        slide is left out."""
        finest = base_mpp / (1 + MPP_TOLERANCE)
        widest = side * base_mpp / size
        if self.log_uniform is not None:
            low, high = max(self.log_uniform[0], finest), min(self.log_uniform[1], widest)
            return (low, high) if low <= high else None
        values = np.asarray(self.values, np.float64)
        ok = (values >= finest) & (values <= widest) & (np.asarray(self.weights) > 0)
        if not ok.any():
            return None
        weights = np.where(ok, self.weights, 0.0)
        return values, weights / weights.sum()

    @staticmethod
    def draw(rng: np.random.Generator, n: int, feasible: Any) -> np.ndarray:
        if isinstance(feasible, tuple) and isinstance(feasible[0], float):
            low, high = feasible
            return np.exp(rng.uniform(math.log(low), math.log(high), size=n))
        values, probabilities = feasible
        return values[rng.choice(len(values), size=n, p=probabilities)]
