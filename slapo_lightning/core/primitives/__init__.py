"""Schedule primitives; importing this package registers them."""
from . import checkpoint, decompose, find, fuse, parallel, replace, tensor_plan, trace  # noqa: F401  (registration)
from .registry import PRIMITIVES, list_primitives, register_primitive

__all__ = ["PRIMITIVES", "list_primitives", "register_primitive"]
