"""A name -> object registry shared by primitives, ops, patterns and attention backends."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import RegistryError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered under unique names; lookups of unknown names list the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""

        def add(item: T) -> T:
            if name in self._items and not overwrite and self._items[name] is not item:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(unknown(self.kind, name, sorted(self._items))) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


def import_object(path: str) -> object:
    """Import ``pkg.mod:attr`` or ``pkg.mod.attr``; raise RegistryError naming the path on failure."""
    import importlib

    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, ValueError) as exc:
        raise RegistryError(f"cannot import {path!r}: {exc}") from None

