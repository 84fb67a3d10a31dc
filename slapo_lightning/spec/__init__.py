"""Schedule specs: passes of primitive calls from a dict, YAML file or Hydra config.

``apply_schedule(model, spec)`` checks the spec, applies it all-or-nothing and returns a
``Report``; ``verify_schedule`` checks a scheduled model against the original and names the
first pass that breaks equivalence. Patterns and ops are referenced by name (``PATTERNS`` and
the op library's ``OPS``, also reachable as ``OP_FACTORIES``) or by import path;
``register_pattern`` and ``register_op_factory`` add names.
"""
from . import builtin_patterns  # noqa: F401  (registration)
from .apply import apply_schedule
from .bisect import first_breaking_pass, verify_schedule
from .schema import PassSpec, ScheduleSpec, StepSpec, load_spec, parse_spec
from .ops import OP_FACTORIES, Built, Match, op_names, register_op_factory
from .patterns import PATTERNS, PatternSpec, Variant, register_pattern
from .steps import STEPS, step_names

__all__ = [
    "OP_FACTORIES", "PATTERNS", "STEPS", "Built", "Match", "PassSpec", "PatternSpec", "ScheduleSpec", "StepSpec",
    "Variant", "apply_schedule", "first_breaking_pass", "load_spec", "op_names", "parse_spec",
    "register_op_factory", "register_pattern", "step_names", "verify_schedule",
]
