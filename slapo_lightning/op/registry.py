"""Named ops a schedule spec can refer to (``op: fused_qkv``)."""
from __future__ import annotations

from typing import Any

from ..registry import Registry

OPS: Registry = Registry("op")


def register_op(name: str, obj: Any = None, *, overwrite: bool = False):
    """Register an op class under ``name`` (usable as a decorator).

    An op is one opaque call in traces (``traced_as_leaf = True``) unless its class says
    otherwise, as ``LinearWithSeparateBias`` does so a flattened trace sees its bias add.
    """

    def add(cls: Any) -> Any:
        if isinstance(cls, type) and not hasattr(cls, "traced_as_leaf"):
            cls.traced_as_leaf = True
        return OPS.register(name, cls, overwrite=overwrite)

    return add if obj is None else add(obj)


def list_ops() -> list[str]:
    """Names of every registered op, sorted."""
    return OPS.names()
