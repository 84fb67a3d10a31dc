"""Named ops a schedule spec can refer to (``op: fused_qkv``)."""
from ..registry import Registry

OPS: Registry = Registry("op")
register_op = OPS.register


def list_ops() -> list[str]:
    """Names of every registered op, sorted."""
    return OPS.names()
