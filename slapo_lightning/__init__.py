"""slapo_lightning: Slapo-style schedules for PyTorch Lightning and Hugging Face models.

``import slapo_lightning as slapo`` gives the scheduling API of the Slapo tutorials
(``create_schedule``, ``build``, ``verify``, ``pattern.call_module``, ``op.attention``),
``apply_schedule`` for schedule specs, and ``ScheduleCallback`` for Lightning.
"""
from . import core, op, pattern  # noqa: F401  (primitives register themselves)
from .core import build, create_schedule, list_primitives, register_leaf_function, register_primitive, verify
from .core.schedule import Schedule
from .errors import (
    BackendError,
    CheckpointMismatchError,
    FuseError,
    PathError,
    PatternError,
    ReplaceError,
    ScheduleError,
    SpecError,
    TraceError,
    VerificationError,
)

__version__ = "0.1.0"

_LAZY = {
    "apply_schedule": ("slapo_lightning.spec", "apply_schedule"),
    "ScheduleCallback": ("slapo_lightning.lightning.callback", "ScheduleCallback"),
}


def __getattr__(name: str):
    """Spec and Lightning pieces load on first use, so the core imports without Lightning."""
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'slapo_lightning' has no attribute {name!r}")


__all__ = [
    "BackendError", "CheckpointMismatchError", "FuseError", "PathError", "PatternError", "ReplaceError",
    "Schedule", "ScheduleCallback", "ScheduleError", "SpecError", "TraceError", "VerificationError",
    "apply_schedule", "build", "create_schedule", "list_primitives", "op", "pattern", "register_leaf_function",
    "register_primitive", "verify",
]
