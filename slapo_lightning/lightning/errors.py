"""Errors in a recipe's configuration (model preset, data path, tokenizer...), in the project's family.

``RecipeError`` lives in ``slapo_lightning.errors`` (the data package raises it too and must not
depend on this package); it is re-exported here so existing imports keep working.
"""
from __future__ import annotations

from ..errors import RecipeError

__all__ = ["RecipeError"]
