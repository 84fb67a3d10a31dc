"""Registry of schedule primitives; ``Schedule`` exposes each as a method."""
from __future__ import annotations

from typing import Callable

from ...registry import Registry

PRIMITIVES: Registry = Registry("primitive")


def register_primitive(name: str, fn: Callable | None = None, *, overwrite: bool = False):
    """Register ``fn(sch, *args, **kwargs)`` as ``sch.<name>(...)``; usable as a decorator."""
    return PRIMITIVES.register(name, fn, overwrite=overwrite)


def list_primitives() -> list[str]:
    return PRIMITIVES.names()
