"""Guards: what a trace decided, checked on every call.

A trace takes Python-level decisions on its example inputs. Those that depend only on the kind
of each argument (None or a tensor, a flag's value, a tensor's dtype, device and rank) form the
*call key*, computed before a graph runs. Decisions taken inside (a mask builder returning
None, ``q_len > 1``, ``len(x)``) are guard nodes in the graph that raise ``GuardMiss`` when a
call would take the other branch; the traced module then tries its next specialisation.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
import torch.fx as fx


class GuardMiss(Exception):
    """A call left the specialisation it ran in (internal: the dispatcher catches it)."""

    def __init__(self, decision: str):
        super().__init__(decision)
        self.decision = decision


def records_itself_when_traced(fn: Callable) -> Callable:
    """Functions the tracer inserts into graphs: tracing a traced module again records them as
    calls instead of running them on proxies."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        found: list[fx.Proxy] = []
        fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
        if found:
            return found[0].tracer.create_proxy("call_function", call, args, kwargs)
        return fn(*args, **kwargs)

    return call


@records_itself_when_traced
def expect_truth(value: Any, expected: bool, decision: str) -> None:
    if bool(value) is not expected:
        raise GuardMiss(decision)


@records_itself_when_traced
def expect_equal(value: Any, expected: Any, decision: str) -> None:
    if value != expected:
        raise GuardMiss(decision)


@records_itself_when_traced
def expect_none(value: Any, decision: str) -> None:
    if value is not None:
        raise GuardMiss(decision)


@records_itself_when_traced
def expect_not_none(value: Any, decision: str) -> None:
    if value is None:
        raise GuardMiss(decision)


GUARDS = (expect_truth, expect_equal, expect_none, expect_not_none)
for _guard in GUARDS:
    torch.fx.node._side_effectful_functions.add(_guard)


def has_internal_guards(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and n.target in GUARDS for n in graph.nodes)


def guard_decisions(graph: fx.Graph) -> list[str]:
    """What each guard of ``graph`` checks, in graph order (for reports and errors)."""
    return [n.args[-1] for n in graph.nodes if n.op == "call_function" and n.target in GUARDS]


# -- the call key ---------------------------------------------------------------------------------

def _kind(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device.type, value.dim())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_kind(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _kind(v)) for k, v in value.items()))
    return ("object", type(value).__qualname__)


def _any_proxy(values: dict) -> bool:
    found: list = []
    fx.node.map_aggregate(list(values.values()), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
    return bool(found)


def _concrete_or_self(value: Any) -> Any:
    """Under a re-trace the arguments are proxies; their key is that of their concrete value."""
    from .proxies import UNKNOWN, concrete

    known = concrete(value)
    return value if known is UNKNOWN else known


class CallKey:
    """Computes the key of a call to one module's forward: the kinds of its arguments, with
    defaults filled in (passing ``x=None`` or leaving it out is the same call), plus the
    autocast state and the module's parameter dtype (both change the dtypes code sees)."""

    def __init__(self, signature: inspect.Signature):
        params = list(signature.parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.var_positional = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
        self.defaults = {p.name: p.default for p in params
                         if p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        values = dict(self.defaults)
        values.update(zip(self.positional, args))
        if len(args) > len(self.positional):
            values[self.var_positional or "*"] = args[len(self.positional):]
        values.update(kwargs)
        if _any_proxy(values):
            values = {name: _concrete_or_self(v) for name, v in values.items()}
        arguments = tuple(sorted((name, _kind(v)) for name, v in values.items() if v is not None))
        return arguments, _autocast_state(), _parameter_dtype(module)


def _autocast_state() -> tuple:
    state = []
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            state.append((device, torch.get_autocast_dtype(device)))
    return tuple(state)


def _parameter_dtype(module: torch.nn.Module) -> Any:
    for p in module.parameters():
        return p.dtype
    return None


def describe_key(key: tuple) -> str:
    """``attention_mask=tensor(float32, 4-d), use_cache=False`` for a key."""
    arguments, autocast, dtype = key
    parts = []
    for name, kind in arguments:
        parts.append(f"{name}={_describe_kind(kind)}")
    if autocast:
        parts.append("autocast=" + ",".join(f"{d}:{str(t).replace('torch.', '')}" for d, t in autocast))
    return ", ".join(parts) or "(no arguments)"


def _describe_kind(kind: Any) -> str:
    if isinstance(kind, tuple) and kind and kind[0] == "tensor":
        return f"tensor({str(kind[1]).replace('torch.', '')}, {kind[3]}-d)"
    if isinstance(kind, tuple) and kind and kind[0] in ("tuple", "list"):
        return "(" + ", ".join(_describe_kind(k) for k in kind[1]) + ")"
    if isinstance(kind, tuple) and kind and kind[0] == "object":
        return kind[1]
    return repr(kind)


def absent_arguments(key: tuple, signature: inspect.Signature) -> list[str]:
    """Optional parameters that are None under ``key`` (shown so 'mask absent' reads as such)."""
    present = {name for name, _ in key[0]}
    return [name for name, p in signature.parameters.items()
            if p.default is None and name not in present and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def changing_parts(keys: list[tuple]) -> list[str]:
    """The argument names (or autocast/dtype) whose kind differs between ``keys``."""
    names: dict[str, set] = {}
    for arguments, autocast, dtype in keys:
        present = dict(arguments)
        for name in {n for k in keys for n, _ in k[0]}:
            names.setdefault(name, set()).add(repr(present.get(name)))
        names.setdefault("autocast", set()).add(repr(autocast))
        names.setdefault("parameter dtype", set()).add(repr(dtype))
    return sorted(name for name, kinds in names.items() if len(kinds) > 1)
