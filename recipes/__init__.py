"""Training recipes: one run per model size (tiny, mini, flash, 1t), the source of configs/<name>.yaml.

A recipe (recipes/recipe.py) holds the Trainer, LingModule and LingDataModule arguments of its run,
checked against their signatures, plus its token budget, its GPU memory and the stages it leaves out;
the model's own settings (MTP weight, init std, ...) come from its preset. recipes/report.py builds
the real sizes as the Ling 2.0 report trains them, each on a layout on which every stage it ships fits
80 GB H100s by the memory estimate (`python -m recipes.describe <name>` shows it; a stage that fits no
layout is left out of the config, with the reason). `python -m recipes.export` writes the configs.
"""

from __future__ import annotations

import copy

from recipes.flash import FLASH
from recipes.mini import MINI
from recipes.one_t import ONE_T
from recipes.recipe import Recipe, RecipeError
from recipes.report import ramp_samples, report_recipe
from recipes.tiny import TINY

RECIPES: dict[str, Recipe] = {"tiny": TINY, "mini": MINI, "flash": FLASH, "1t": ONE_T}


def get_recipe(name: str) -> Recipe:
    """A copy of the recipe registered under `name` (case-insensitive), safe to modify."""
    key = str(name).lower()
    if key not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return copy.deepcopy(RECIPES[key])


__all__ = ["RECIPES", "Recipe", "RecipeError", "get_recipe", "ramp_samples", "report_recipe"]
