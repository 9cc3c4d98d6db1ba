"""Batched SSL view generation: recipes (`views`), tensor ops (`ops`) and stain augmentation (`stain`)."""

from pathssl_cli.augment.recipes import ViewRecipe, recipe_for
from pathssl_cli.augment.stain import StainStats, fit_stain_stats
from pathssl_cli.augment.views import BatchViews

__all__ = ["BatchViews", "StainStats", "ViewRecipe", "fit_stain_stats", "recipe_for"]
