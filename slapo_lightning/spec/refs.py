"""Resolve what a spec names: a registered name, or an import path (``pkg.mod:attr``) for
user-defined patterns, ops and pass functions."""
from __future__ import annotations

from typing import Any

from ..errors import RegistryError, SpecError
from ..registry import Registry, import_object


def is_import_path(ref: str) -> bool:
    return ":" in ref or "." in ref


def resolve(ref: Any, registry: Registry, what: str) -> Any:
    """``registry[ref]`` or the object at import path ``ref``; SpecError naming the valid names."""
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"{what} must be a registered name or an import path 'pkg.module:attr', got {ref!r}")
    if ref in registry:
        return registry.get(ref)
    if is_import_path(ref):
        try:
            return import_object(ref)
        except RegistryError as exc:
            raise SpecError(f"{what} {exc}") from None
    try:
        registry.get(ref)
    except RegistryError as exc:
        raise SpecError(f"{exc} (or an import path 'pkg.module:attr')") from None
    raise AssertionError("unreachable")
