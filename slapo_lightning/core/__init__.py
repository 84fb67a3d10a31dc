"""The scheduling core: the schedule tree, tracing with guarded specialisations, patterns,
primitives, verification and state-key preservation. It knows no trainer, no spec and no op
registry; data flows into it from ``spec`` and ``lightning``."""
from . import primitives  # noqa: F401  (primitives register themselves)
from .build import build
from .primitives import list_primitives, register_primitive
from .schedule import Schedule, create_schedule
from .tracer import TracedModule, register_leaf_function
from .verify import verify

__all__ = ["Schedule", "TracedModule", "build", "create_schedule", "list_primitives", "register_leaf_function",
           "register_primitive", "verify"]
