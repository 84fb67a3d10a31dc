"""The ``slapo-train`` command: Hydra entry point, up-front checks of what the user typed, and the
one-line error report (exit code 2) for every mistake."""
from .train import EXIT_USER_ERROR, main, train

__all__ = ["EXIT_USER_ERROR", "main", "train"]
