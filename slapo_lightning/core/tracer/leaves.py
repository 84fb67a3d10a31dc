"""Leaf functions: calls recorded as one node and run for real at call time.

Hugging Face's mask builders (``create_causal_mask`` and friends) decide from the real mask
whether one is needed at all; tracing through them would freeze that decision. As leaves they
run on every call, and whether they returned None is a guarded decision of the trace.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Callable

import torch
import torch.fx as fx

from .guards import expect_none, expect_not_none
from .proxies import concrete

LEAF_FUNCTIONS: list[Callable] = []
"""Functions recorded as one call node and run for real at call time (HF's mask builders)."""


def register_leaf_function(fn: Callable) -> Callable:
    """Keep ``fn`` opaque in traces: one node, executed at run time with the real inputs."""
    if fn not in LEAF_FUNCTIONS:
        LEAF_FUNCTIONS.append(fn)
    return fn


def _register_hf_mask_builders() -> None:
    try:
        from transformers import masking_utils
    except ImportError:
        return
    for name, fn in vars(masking_utils).items():
        if name.startswith("create_") and name.endswith("mask") and inspect.isfunction(fn):
            register_leaf_function(fn)


_register_hf_mask_builders()


def _leaf_call(fn: Callable) -> Callable:
    """Stand-in for a leaf function while tracing.

    A ``None`` result (HF's "no mask needed, use is_causal") is returned as a real ``None`` so
    that ``mask is None`` checks see it; either outcome is guarded, so a call that needs the
    other branch gets its own specialisation.
    """

    def traced(*args, **kwargs):
        found: list[fx.Proxy] = []
        fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
        if not found:
            return fn(*args, **kwargs)
        tracer = found[0].tracer
        proxy = tracer.create_proxy("call_function", fn, args, kwargs)
        value = concrete(proxy)
        where = f"{tracer.path_for_errors}: {fn.__name__}"
        if value is None:
            tracer.create_proxy("call_function", expect_none, (proxy, f"{where} returned None"), {})
            return None
        if isinstance(value, torch.Tensor):
            tracer.create_proxy("call_function", expect_not_none, (proxy, f"{where} returned a tensor"), {})
        return proxy

    return traced


_leaf_locations: dict[tuple[int, int], list[tuple[dict, Callable]]] = {}


def _where_leaf_functions_are_imported() -> list[tuple[dict, Callable]]:
    """(module namespace, function) pairs; cached until modules are loaded or leaves added."""
    key = (len(sys.modules), len(LEAF_FUNCTIONS))
    if key not in _leaf_locations:
        _leaf_locations.clear()
        found = []
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if isinstance(namespace, dict):
                found.extend((namespace, fn) for fn in LEAF_FUNCTIONS if namespace.get(fn.__name__) is fn)
        _leaf_locations[key] = found
    return _leaf_locations[key]


@contextlib.contextmanager
def leaf_functions_patched():
    """Swap leaf functions for their tracing stand-ins wherever a loaded module imported them."""
    locations = _where_leaf_functions_are_imported()
    for namespace, fn in locations:
        namespace[fn.__name__] = _leaf_call(fn)
    try:
        yield
    finally:
        for namespace, fn in locations:
            namespace[fn.__name__] = fn


