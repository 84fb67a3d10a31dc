"""Example inputs: binding them to a module's signature for tracing."""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from torch import nn

from ...errors import TraceError


class CallArgs(NamedTuple):
    """Positional and keyword arguments of one recorded call, usable as ``example_inputs``."""

    args: tuple
    kwargs: dict


def forward_signature(module: nn.Module) -> inspect.Signature:
    """Signature of ``module.forward`` without ``self``, seen through HF's decorators."""
    forward = module.forward
    sig = inspect.signature(inspect.unwrap(forward))
    params = list(sig.parameters.values())
    if inspect.ismethod(forward) and params and params[0].name == "self":
        sig = sig.replace(parameters=params[1:])
    return sig


def bind_examples(module: nn.Module, example_inputs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bind example inputs to ``fn``'s signature.

    Returns ``(examples, concrete_args)``: values for the parameters that stay graph inputs,
    and the optional parameters the examples do not mention, frozen to their defaults.
    """
    sig = forward_signature(module)
    if isinstance(example_inputs, CallArgs):
        args, kwargs = tuple(example_inputs.args), dict(example_inputs.kwargs)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"example_inputs do not fit the signature {sig}: {exc}") from None
    examples: dict[str, Any] = {}
    concrete_args: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if param.kind is param.VAR_POSITIONAL:
            if bound.arguments.get(name):
                raise TraceError(f"cannot trace with extra positional arguments for *{name}")
            continue
        if param.kind is param.VAR_KEYWORD:
            examples[name] = dict(bound.arguments.get(name, {}))
            continue
        if name in bound.arguments:
            value = bound.arguments[name]
            if value is None or isinstance(value, (bool, int, float, str)):
                concrete_args[name] = value
            else:
                examples[name] = value
        elif param.default is not param.empty:
            concrete_args[name] = param.default
        else:
            raise TraceError(f"example_inputs lack the required argument {name!r} of {sig}")
    return examples, concrete_args
