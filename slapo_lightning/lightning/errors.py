"""Errors in a recipe's configuration (model preset, data path, tokenizer...), in the project's family."""
from __future__ import annotations

from ..errors import ScheduleError


class RecipeError(ScheduleError, ValueError):
    """A configuration value that cannot work; the message names the key and the valid choices."""
