"""A torch.fx tracer that follows Hugging Face transformers code.

Plain ``symbolic_trace`` fails on today's HF modules because their Python code branches on
values (``if attention_mask is not None``, ``q_len > 1``), unpacks shapes
(``(*x.shape[:-1], -1, d)``) and forwards ``**kwargs``. Here every proxy also carries the
*concrete* value it had on example inputs, so such Python-level decisions are taken on real
values while the tensor computation stays symbolic (shapes are still read from the graph at
run time, so the traced module works for any batch and sequence length).

Decisions the trace bakes in are guarded: an optional argument traced as ``None`` asserts it is
still ``None`` (fx's own check), one traced as a tensor refuses ``None``, and keyword arguments
unseen at trace time must be ``None``. Dropout is made train/eval-correct after tracing (see
``make_dropout_follow_training``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import operator
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.proxy import Attribute

from .errors import TraceError

UNKNOWN = type("Unknown", (), {"__repr__": lambda self: "<unknown>"})()


def _concrete(value: Any) -> Any:
    """The concrete value behind a proxy (or a structure of them); UNKNOWN if any part is."""
    if isinstance(value, fx.Proxy):
        return value.node.meta.get("concrete", UNKNOWN)
    if isinstance(value, (list, tuple)):
        items = [_concrete(v) for v in value]
        if any(i is UNKNOWN for i in items):
            return UNKNOWN
        if isinstance(value, torch.Size):
            return torch.Size(items)
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        items = {k: _concrete(v) for k, v in value.items()}
        return UNKNOWN if any(i is UNKNOWN for i in items.values()) else items
    if isinstance(value, slice):
        parts = [_concrete(p) for p in (value.start, value.stop, value.step)]
        return UNKNOWN if UNKNOWN in parts else slice(*parts)
    return value


def _has_proxy(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
    return bool(found)


class ConcreteProxy(fx.Proxy):
    """A proxy that answers Python questions (truth, length, iteration) from its concrete value."""

    def _known(self, what: str) -> Any:
        value = _concrete(self)
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
        return bool(self._known("bool()"))

    def __len__(self) -> int:
        return len(self._known("len()"))

    def __iter__(self):
        value = _concrete(self)
        if value is UNKNOWN:
            return super().__iter__()
        if isinstance(value, dict):
            return iter(value)
        return (self[i] for i in range(len(value)))

    def __index__(self) -> int:
        return operator.index(self._known("int()"))

    def __int__(self) -> int:
        return int(self._known("int()"))

    def __float__(self) -> float:
        return float(self._known("float()"))

    def keys(self):
        value = self._known("**mapping")
        return value.keys()

    def __getattr__(self, name: str) -> "ConcreteAttribute":
        return ConcreteAttribute(self, name)


class ConcreteAttribute(ConcreteProxy, Attribute):
    """``proxy.attr``: created lazily by fx, concrete-aware like every other proxy."""


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
def train_only_probability(p: float, training: bool) -> float:
    """A dropout probability that is zero outside training."""
    return p if training else 0.0


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
        if dataclasses.is_dataclass(a) and isinstance(a, dict) and _has_proxy(dict(a)):
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        try:
            if dataclasses.is_dataclass(a) and not isinstance(a, type) and not _has_proxy(vars(a)):
                raise NotImplementedError
            return super().create_arg(a)
        except NotImplementedError:
            name = f"_slapo_constant_{len(self.constants)}"
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
        if self._executing or not _has_proxy((args, kwargs)):
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
        c_args, c_kwargs = _concrete(args), _concrete(kwargs)
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
                self.first_concrete_error = f"{node.name}: {type(exc).__name__}: {_first_line(exc)}"
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


# -- leaf functions ---------------------------------------------------------------------------------
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
    that ``mask is None`` checks see it, and both outcomes are guarded: a later call that needs
    the other branch raises instead of computing something else.
    """

    def traced(*args, **kwargs):
        found: list[fx.Proxy] = []
        fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
        if not found:
            return fn(*args, **kwargs)
        tracer = found[0].tracer
        proxy = tracer.create_proxy("call_function", fn, args, kwargs)
        value = _concrete(proxy)
        where = f"{tracer.path_for_errors}: {fn.__name__}"
        if value is None:
            tracer.create_proxy("call_function", _assert_none_result,
                                (proxy, f"{where} returned None when traced but a tensor now; "
                                        f"trace with example inputs like the real batches (e.g. with padding)"), {})
            return None
        if isinstance(value, torch.Tensor):
            tracer.create_proxy("call_function", _assert_not_none,
                                (proxy, f"{where} returned a tensor when traced but None now; "
                                        f"trace with example inputs like the real batches (e.g. without padding)"), {})
        return proxy

    return traced


_leaf_locations: dict[tuple[int, int], list[tuple[dict, Callable]]] = {}


def _where_leaf_functions_are_imported() -> list[tuple[dict, Callable]]:
    """(module namespace, function) pairs; cached until modules are loaded or leaves added."""
    import sys

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
def _leaf_functions_patched():
    """Swap leaf functions for their tracing stand-ins wherever a loaded module imported them."""
    locations = _where_leaf_functions_are_imported()
    for namespace, fn in locations:
        namespace[fn.__name__] = _leaf_call(fn)
    try:
        yield
    finally:
        for namespace, fn in locations:
            namespace[fn.__name__] = fn


# -- example inputs ---------------------------------------------------------------------------------
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


# -- guards and train/eval correctness -------------------------------------------------------------
@records_itself_when_traced
def _assert_not_none(value: Any, message: str) -> None:
    if value is None:
        raise TraceError(message)


@records_itself_when_traced
def _assert_none_result(value: Any, message: str) -> None:
    if value is not None:
        raise TraceError(message)


@records_itself_when_traced
def _assert_no_new_kwargs(kwargs: dict, seen: tuple, message: str) -> None:
    unexpected = [k for k, v in kwargs.items() if k not in seen and v is not None]
    if unexpected:
        raise TraceError(f"{message}: {', '.join(sorted(unexpected))}")


for _guard in (_assert_not_none, _assert_none_result, _assert_no_new_kwargs):
    torch.fx.node._side_effectful_functions.add(_guard)


def add_input_guards(graph: fx.Graph, examples: dict[str, Any], module: nn.Module, path: str) -> None:
    """Refuse calls whose optional inputs differ in kind from the ones the trace saw."""
    sig = forward_signature(module)
    placeholders = {n.target.lstrip("*"): n for n in graph.nodes if n.op == "placeholder"}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        for name, param in sig.parameters.items():
            node = placeholders.get(name)
            if node is None:
                continue
            if param.kind is param.VAR_KEYWORD:
                seen = tuple(sorted(examples.get(name, {})))
                graph.call_function(
                    _assert_no_new_kwargs,
                    (node, seen, f"{path or '<root>'} was traced without these keyword arguments; "
                                 f"re-trace with example_inputs that include them"),
                )
            elif param.default is None and isinstance(examples.get(name), torch.Tensor):
                graph.call_function(
                    _assert_not_none,
                    (node, f"{path or '<root>'} was traced with a tensor for {name!r} but got None; "
                           f"re-trace with example_inputs where {name} is None"),
                )


TRAIN_ONLY_ARGUMENTS: dict[Callable, tuple[str, int, str]] = {
    F.dropout: ("training", 2, "flag"),
    F.dropout1d: ("training", 2, "flag"),
    F.dropout2d: ("training", 2, "flag"),
    F.dropout3d: ("training", 2, "flag"),
    F.alpha_dropout: ("training", 2, "flag"),
    F.feature_alpha_dropout: ("training", 2, "flag"),
    torch.dropout: ("train", 2, "flag"),
    F.scaled_dot_product_attention: ("dropout_p", 4, "probability"),
}
"""Functions with an argument that must follow the module's train/eval state: (name, position, kind)."""


def make_dropout_follow_training(gm: fx.GraphModule) -> None:
    """Tie every functional dropout in ``gm`` to ``gm.training``.

    The trace runs in train mode so HF's ``p = 0.0 if not self.training else self.dropout.p``
    records the real probability; afterwards the baked ``training=True`` (or ``dropout_p``)
    is rewired to read ``self.training`` at run time, so ``.eval()`` turns dropout off again.
    """
    graph = gm.graph
    training = None
    for node in list(graph.nodes):
        rule = TRAIN_ONLY_ARGUMENTS.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        name, position, kind = rule
        if training is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                training = graph.get_attr("training")
        if kind == "flag":
            traced_flag = node.args[position] if len(node.args) > position else node.kwargs.get(name, True)
            if traced_flag is not True:  # dropout the code turned off stays off
                continue
            if len(node.args) > position:
                node.update_arg(position, training)
            else:
                node.update_kwarg(name, training)
        else:
            p = node.args[position] if len(node.args) > position else node.kwargs.get(name, 0.0)
            already_gated = isinstance(p, fx.Node) and p.target is train_only_probability
            if not isinstance(p, (fx.Node, float, int)) or p == 0 or already_gated:
                continue
            with graph.inserting_before(node):
                gated = graph.call_function(train_only_probability, (p, training))
            if len(node.args) > position:
                node.update_arg(position, gated)
            else:
                node.update_kwarg(name, gated)
    gm.recompile()


# -- entry point ------------------------------------------------------------------------------------
def trace_module(
    module: nn.Module,
    *,
    flatten: bool = False,
    leaves: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
    path: str = "",
) -> tuple[fx.GraphModule, dict[str, tuple[tuple, dict]]]:
    """Trace ``module`` (in train mode, RNG untouched) into a GraphModule.

    Returns the GraphModule and the concrete inputs each leaf submodule was called with (so a
    hierarchical trace can trace the children next).
    """
    tracer = HFTracer(flatten=flatten, leaves=leaves, path=path)
    frozen: dict[str, Any] = {}
    if example_inputs is not None:
        tracer.examples, frozen = bind_examples(module, example_inputs)
    for name, value in training_defaults(module).items():
        frozen.pop(name, None)
        tracer.examples[name] = value
    frozen.update(concrete_args or {})
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.random.fork_rng(devices=[]), _leaf_functions_patched():
            module.train()
            graph = tracer.trace(module, concrete_args=frozen or None)
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"cannot trace {path or '<root>'} ({type(module).__name__}): "
                         f"{type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    _drop_concrete_values(graph)
    _rename_shadowing_nodes(graph)
    _restore_parameter_names(graph, frozen)
    _guards_in_our_family(graph, path)
    add_input_guards(graph, tracer.examples, module, path)
    gm = TracedModule(module, graph, class_name=type(module).__name__)
    for name in tracer.constants:
        delattr(module, name)
    _adopt_state(module, gm)
    gm.training = module.training
    make_dropout_follow_training(gm)
    return gm, tracer.recorded_calls


def training_defaults(module: nn.Module) -> dict[str, Any]:
    """Values the trace assumes (unguarded) for arguments a training graph ignores.

    HF's KV cache belongs to generation, never to a static training graph.
    """
    return {"use_cache": False} if "use_cache" in forward_signature(module).parameters else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _drop_concrete_values(graph: fx.Graph) -> None:
    for node in graph.nodes:
        node.meta.pop("concrete", None)


def _restore_parameter_names(graph: fx.Graph, frozen: dict[str, Any]) -> None:
    """fx names frozen parameters ``<name>_1`` in the signature; HF callers pass them by keyword."""
    for node in graph.nodes:
        if node.op == "placeholder":
            base = node.target.rpartition("_")[0]
            if base in frozen and node.target == f"{base}_1":
                node.target = base


def _guards_in_our_family(graph: fx.Graph, path: str) -> None:
    """fx's own "specialised to None" asserts raise TraceError naming the module, like ours."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is fx._symbolic_trace._assert_is_none:
            value, message = node.args
            name = message.split(" has been specialized")[0]
            node.target = _assert_none_result
            node.args = (value, f"{path or '<root>'} was traced with {name}=None but got a value; "
                                f"re-trace with example_inputs that include {name}")


def _rename_shadowing_nodes(graph: fx.Graph) -> None:
    """A call of HF's child named ``self`` (BertAttention.self) would shadow ``self`` in the code."""
    for node in graph.nodes:
        if node.name == "self":
            node._rename("self_module")


class TracedModule(fx.GraphModule):
    """A GraphModule that keeps all of its module's state through ``copy.deepcopy``.

    fx's own deepcopy rebuilds the module from what the graph references, which would drop
    unused children, buffer persistence and state-dict hooks.
    """

    def __deepcopy__(self, memo):
        fake = nn.Module()
        fake.__dict__ = copy.deepcopy(self.__dict__, memo)
        copied = TracedModule(fake, fake.__dict__["_graph"], class_name=self.__class__.__name__)
        copied.__dict__.update(fake.__dict__)
        return copied


def _adopt_state(module: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the original children, parameters and buffers (same objects, same order).

    GraphModule's constructor rebuilds only what the graph references, as generic modules; a
    schedule must keep every state_dict key, non-persistent buffers and the original classes.
    Plain tensor attributes the graph reads become non-persistent buffers (no new keys).
    """
    traced_constants = {name: buf for name, buf in gm._buffers.items()
                        if name not in module._buffers and "." not in name and buf is not None}
    gm._modules = type(module._modules)(module._modules)
    gm._parameters = type(module._parameters)(module._parameters)
    gm._buffers = type(module._buffers)(module._buffers)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, value in traced_constants.items():
        gm.register_buffer(name, value, persistent=False)
    for hook in module._state_dict_hooks.values():
        gm.register_state_dict_post_hook(hook)
    for hook in module._load_state_dict_pre_hooks.values():
        gm.register_load_state_dict_pre_hook(getattr(hook, "hook", hook))  # unwrap: it points at the old module
    if hasattr(module, "config"):
        gm.config = module.config
