"""Proxies that carry concrete values, and the tracer that makes them.

Plain ``symbolic_trace`` fails on today's HF modules because their Python code branches on
values (``if attention_mask is not None``, ``q_len > 1``), unpacks shapes
(``(*x.shape[:-1], -1, d)``) and forwards ``**kwargs``. Here every proxy also carries the
*concrete* value it had on example inputs, so such Python-level decisions are taken on real
values while the tensor computation stays symbolic (shapes are still read from the graph at
run time, so the traced module works for any batch and sequence length). Each decision is
recorded as a guard (``guards.py``), so a call that would decide otherwise gets its own trace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import Attribute

from ...errors import TraceError
from .guards import expect_equal, expect_truth

UNKNOWN = type("Unknown", (), {"__repr__": lambda self: "<unknown>"})()


def concrete(value: Any) -> Any:
    """The concrete value behind a proxy (or a structure of them); UNKNOWN if any part is."""
    if isinstance(value, fx.Proxy):
        return value.node.meta.get("concrete", UNKNOWN)
    if isinstance(value, (list, tuple)):
        items = [concrete(v) for v in value]
        if any(i is UNKNOWN for i in items):
            return UNKNOWN
        if isinstance(value, torch.Size):
            return torch.Size(items)
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        items = {k: concrete(v) for k, v in value.items()}
        return UNKNOWN if any(i is UNKNOWN for i in items.values()) else items
    if isinstance(value, slice):
        parts = [concrete(p) for p in (value.start, value.stop, value.step)]
        return UNKNOWN if UNKNOWN in parts else slice(*parts)
    return value


def has_proxy(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
    return bool(found)


class ConcreteProxy(fx.Proxy):
    """A proxy that answers Python questions (truth, length, iteration) from its concrete value."""

    def _known(self, what: str) -> Any:
        value = concrete(self)
        if value is UNKNOWN:
            cause = self.tracer.first_concrete_error
            raise TraceError(
                f"{self.tracer.path_for_errors}: `{what}` on traced value {self.node.name!r} needs a "
                f"concrete value; "
                + (f"computing it failed earlier ({cause})" if cause else
                   "pass example_inputs to trace() so data-dependent Python can be resolved")
            )
        return value

    def __bool__(self) -> bool:
        value = bool(self._known("bool()"))
        self.tracer.create_proxy("call_function", expect_truth, (self, value, self._decision(f"bool is {value}")), {})
        return value

    def __len__(self) -> int:
        value = len(self._known("len()"))
        length = self.tracer.create_proxy("call_function", len, (self,), {})
        self.tracer.create_proxy("call_function", expect_equal, (length, value, self._decision(f"len is {value}")), {})
        return value

    def _decision(self, what: str) -> str:
        return f"{self.tracer.path_for_errors}: {self.node.name} {what}"

    def _guarded_number(self, convert, what: str):
        value = convert(self._known(what))
        self.tracer.create_proxy("call_function", expect_equal, (self, value, self._decision(f"== {value}")), {})
        return value

    def __iter__(self):
        value = concrete(self)
        if value is UNKNOWN:
            return super().__iter__()
        if isinstance(value, dict):
            return iter(value)
        return (self[i] for i in range(len(value)))

    def __index__(self) -> int:
        return self._guarded_number(operator.index, "int()")

    def __int__(self) -> int:
        return self._guarded_number(int, "int()")

    def __float__(self) -> float:
        return self._guarded_number(float, "float()")

    def keys(self):
        value = self._known("**mapping")
        return value.keys()

    def __getattr__(self, name: str) -> Any:
        if name in STATIC_TENSOR_ATTRIBUTES:
            value = concrete(self)
            if isinstance(value, torch.Tensor):  # fixed by the call key (dtypes, devices, autocast)
                return getattr(value, name)
        return ConcreteAttribute(self, name)


STATIC_TENSOR_ATTRIBUTES = frozenset({"dtype", "device", "is_cuda", "is_floating_point", "layout"})
"""Tensor attributes answered with real values: code passes them to ``torch.finfo`` and friends,
which take no proxies, and they cannot change without changing the call key."""


class ConcreteAttribute(ConcreteProxy, Attribute):
    """``proxy.attr``: created lazily by fx, concrete-aware like every other proxy."""


_CONSTANT_NUMBERS = itertools.count()
"""Constant attributes are numbered across traces: several traces of one module share its holder."""


class HFTracer(fx.Tracer):
    """fx tracer with concrete values, selectable leaves and HF-friendly defaults.

    ``flatten=False``: every submodule call is a leaf ``call_module`` node and its inputs are
    recorded (``recorded_calls``) so the caller can trace the child with them.
    ``flatten=True``: only torch.nn built-ins and ``leaves`` stay leaves; the rest is inlined.
    """

    def __init__(self, flatten: bool, leaves: Iterable[Any] = (), path: str = ""):
        super().__init__(autowrap_modules=(math,), autowrap_functions=())
        self.flatten = flatten
        self.leaf_types = tuple(l for l in leaves if isinstance(l, type))
        self.leaf_names = {l for l in leaves if isinstance(l, str)}
        self.path_for_errors = path or "<root>"
        self.examples: dict[str, Any] = {}
        self.recorded_calls: dict[str, tuple[tuple, dict]] = {}
        self.constants: dict[str, Any] = {}
        self.first_concrete_error: str | None = None
        self._executing = 0
        self.proxy_buffer_attributes = True

    def create_arg(self, a: Any) -> Any:
        """Objects fx cannot print, and dataclasses (an HF config passed to a mask builder),
        are referenced as attributes: fx would otherwise rebuild a dataclass from its fields on
        every call, dropping state that is not a field."""
        if dataclasses.is_dataclass(a) and isinstance(a, dict) and has_proxy(dict(a)):
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        try:
            if dataclasses.is_dataclass(a) and not isinstance(a, type) and not has_proxy(vars(a)):
                raise NotImplementedError
            return super().create_arg(a)
        except NotImplementedError:
            name = f"_slapo_constant_{next(_CONSTANT_NUMBERS)}"
            self.constants[name] = a
            setattr(self.root, name, a)
            return self.create_node("get_attr", name, (), {})

    # -- leaves -------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        if not self.flatten:
            return True
        return super().is_leaf_module(m, qualname)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders come from the undecorated signature; the call still goes through HF's
        decorators (they fill kwargs from the config and shape the output)."""
        unwrapped = inspect.unwrap(root_fn)
        fn, args = super().create_args_for_root(unwrapped, is_module, concrete_args)
        if unwrapped is root_fn:
            return fn, args
        params = list(inspect.signature(unwrapped).parameters.values())

        def call_decorated(*values):
            positional, keyword, extra = [values[0]], {}, {}
            for param, value in zip(params[1:], values[1:]):
                if param.kind is param.VAR_KEYWORD:
                    extra = {k: value[k] for k in value.keys()}
                elif param.kind is param.VAR_POSITIONAL:
                    positional.extend(value)
                else:
                    keyword[param.name] = value
            keyword.update({k: v for k, v in extra.items() if k not in keyword})
            return root_fn(*positional, **keyword)

        return call_decorated, args

    # -- concrete execution -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _execute(self):
        """Run real code while fx's patches are active: modules and parameters act normally."""
        self._executing += 1
        try:
            yield
        finally:
            self._executing -= 1

    def call_module(self, m, forward, args, kwargs):
        if self._executing or not has_proxy((args, kwargs)):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._executing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["concrete"] = self._evaluate(kind, target, args, kwargs, proxy.node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict, node: fx.Node) -> Any:
        if kind == "placeholder":
            return self.examples.get(target.lstrip("*"), UNKNOWN)
        if kind == "get_attr":
            try:
                with self._execute():
                    return _fetch(self.root, target)
            except AttributeError:
                return UNKNOWN
        if kind == "output":
            return UNKNOWN
        c_args, c_kwargs = concrete(args), concrete(kwargs)
        if c_args is UNKNOWN or c_kwargs is UNKNOWN:
            return UNKNOWN
        try:
            with self._execute(), torch.no_grad():
                if kind == "call_function":
                    return target(*c_args, **c_kwargs)
                if kind == "call_method":
                    return getattr(c_args[0], target)(*c_args[1:], **c_kwargs)
                if kind == "call_module":
                    module = self.root.get_submodule(target)
                    self.recorded_calls.setdefault(target, (c_args, c_kwargs))
                    return _run_module_for_shapes(module, c_args, c_kwargs)
        except Exception as exc:  # the symbolic graph is still right; only the value is lost
            if self.first_concrete_error is None:
                self.first_concrete_error = f"{node.name}: {type(exc).__name__}: {first_line(exc)}"
        return UNKNOWN


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run_module_for_shapes(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run a leaf for its output value; in eval mode so dropout/batch-norm state is untouched."""
    was_training = module.training
    module.eval()
    try:
        return module(*args, **kwargs)
    finally:
        module.train(was_training)




def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
