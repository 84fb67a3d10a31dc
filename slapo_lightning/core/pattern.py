"""Patterns and a dataflow-aware subgraph matcher.

A pattern is a plain Python function traced with torch.fx. Matching builds on fx's
``SubgraphMatcher`` (connected, self-contained, non-overlapping matches) and widens what counts
as "the same op": aliases (``torch.matmul`` / ``@`` / ``Tensor.matmul``), a functional call
against the equivalent module call (``F.dropout`` matches an ``nn.Dropout`` call), and
``call_module(regex, ...)`` against module calls whose path matches.
"""
from __future__ import annotations

import inspect
import itertools
import math
import operator
import re
import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from ..errors import PatternError


def call_module(regex: str, *args: Any, **kwargs: Any) -> Any:
    """In a pattern: a call of any submodule whose path matches ``regex``.

    Records itself when traced (whatever name or closure the pattern reaches it by).
    """
    proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        raise PatternError("call_module() only has a meaning inside a pattern passed to find()")
    return proxy.tracer.create_proxy("call_function", call_module, (regex, *args), kwargs)


FUNCTION_ALIASES: dict[Any, Any] = {
    operator.matmul: torch.matmul,
    torch.dropout: F.dropout,
    torch.softmax: F.softmax,
    torch.add: operator.add,
    torch.mul: operator.mul,
    torch.div: operator.truediv,
    torch.sub: operator.sub,
    torch.relu: F.relu,
    torch.nn.functional.tanh: torch.tanh,
}
"""Functions that compute the same thing with the same argument order."""

METHOD_FUNCTIONS: dict[str, Any] = {
    "matmul": torch.matmul,
    "softmax": F.softmax,
    "transpose": torch.transpose,
    "permute": torch.permute,
    "reshape": torch.reshape,
    "add": operator.add,
    "mul": operator.mul,
    "div": operator.truediv,
    "relu": F.relu,
    "tanh": torch.tanh,
}
"""Tensor methods equal to a function taking the tensor first."""

MODULE_FUNCTIONS: dict[type, Any] = {
    nn.Dropout: F.dropout,
    nn.LayerNorm: F.layer_norm,
    nn.GELU: F.gelu,
    nn.ReLU: F.relu,
    nn.Linear: F.linear,
    nn.Embedding: F.embedding,
    nn.Softmax: F.softmax,
    nn.Tanh: torch.tanh,
    nn.SiLU: F.silu,
}
"""Module classes whose call equals a functional op (hyper-parameters live in the module)."""

LOOSE_LITERALS = {F.dropout}
"""Functions matched on their input alone: a dropout is a dropout whatever its probability."""


def _swapped_dims(args: list[Any], rank: int | None) -> list[Any]:
    """``transpose(x, a, b)`` is ``transpose(x, b, a)``, and a negative dim is ``rank + dim``."""
    if len(args) != 3 or not all(isinstance(d, int) for d in args[1:]):
        return args
    return [args[0], *sorted(d + rank if d < 0 and rank is not None else d for d in args[1:])]


ARGUMENT_SPELLINGS: dict[Any, Callable[[list[Any], int | None], list[Any]]] = {torch.transpose: _swapped_dims}
"""Canonical function -> ``fn(args, rank of the first argument or None)`` giving one spelling of
equivalent arguments (``transpose(-1, -2)`` and ``transpose(2, 3)`` on a 4-d tensor)."""


def register_equivalent_module(module_cls: type, fn: Callable) -> None:
    """Let pattern calls of ``fn`` match calls of ``module_cls`` instances."""
    MODULE_FUNCTIONS[module_cls] = fn


def _register_hf_activations() -> None:
    try:
        from transformers import activations
    except ImportError:
        return
    if hasattr(activations, "GELUActivation"):
        register_equivalent_module(activations.GELUActivation, F.gelu)


_register_hf_activations()


class Origin(NamedTuple):
    """How a match was found: the ``index``-th of ``total`` matches of ``pattern`` (function or
    node predicate) in one ``find`` call (``search``). An edit of it can be made again on another
    trace of the same code."""

    pattern: Callable
    index: int
    total: int
    search: int
    predicate: bool


_SEARCHES = itertools.count()


class Subgraph(list):
    """A match: ``[(parent_path, node), ...]`` in graph order, plus how it binds to the pattern.

    ``inputs`` are the graph values bound to the pattern's parameters (``param_names`` order);
    ``outputs`` the graph nodes the pattern returns.
    """

    def __init__(self, path: str, nodes: list[fx.Node], inputs: list[Any], outputs: list[fx.Node],
                 param_names: list[str], origin: "Origin | None" = None):
        super().__init__((path, n) for n in nodes)
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        self.param_names = param_names
        self.origin = origin

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for _, n in self]


_PATTERN_GRAPHS: "weakref.WeakKeyDictionary[Callable, tuple[tuple, fx.Graph]]" = weakref.WeakKeyDictionary()
"""Traced patterns by function: a schedule matches one pattern in every layer, and tracing it
anew each time was a third of applying the BERT-large schedule. The matcher only reads them."""


def _pattern_identity(fn: Callable) -> tuple:
    """What a pattern's graph depends on besides the function object: its code, defaults, closure."""
    cells = tuple(id(cell.cell_contents) for cell in getattr(fn, "__closure__", None) or ())
    return id(getattr(fn, "__code__", None)), id(getattr(fn, "__defaults__", None)), cells


def trace_pattern(fn: Callable) -> fx.Graph:
    """Trace a pattern function (math functions kept as calls, like in the model's trace)."""
    identity = _pattern_identity(fn)
    cached = _PATTERN_GRAPHS.get(fn) if _weakly_referable(fn) else None
    if cached is not None and cached[0] == identity:
        return cached[1]
    try:
        tracer = fx.Tracer(autowrap_modules=(math,))
        graph = tracer.trace(fn)
    except Exception as exc:
        raise PatternError(f"cannot trace pattern {getattr(fn, '__name__', fn)!r}: {exc}") from None
    graph.eliminate_dead_code()
    if _weakly_referable(fn):
        _PATTERN_GRAPHS[fn] = (identity, graph)
    return graph


def _weakly_referable(fn: Callable) -> bool:
    try:
        weakref.ref(fn)
    except TypeError:
        return False
    return True


def _canonical(node: fx.Node, owner: nn.Module | None) -> Any:
    if node.op == "call_function":
        return FUNCTION_ALIASES.get(node.target, node.target)
    if node.op == "call_method":
        return METHOD_FUNCTIONS.get(node.target, ("method", node.target))
    if node.op == "call_module" and owner is not None:
        module = owner.get_submodule(node.target)
        return MODULE_FUNCTIONS.get(type(module), ("module", type(module)))
    return (node.op, node.target)


class DataflowMatcher(SubgraphMatcher):
    """``SubgraphMatcher`` with op equivalences and ``call_module`` regexes."""

    def __init__(self, pattern: fx.Graph, owner: nn.Module):
        try:
            super().__init__(pattern, match_output=False, match_placeholder=False,
                             remove_overlapping_matches=True, ignore_literals=False)
        except (ValueError, AssertionError) as exc:
            raise PatternError(f"invalid pattern: {exc}") from None
        self.owner = owner

    def _mode(self, pn: fx.Node, gn: fx.Node) -> str:
        if pn.op == "call_function" and pn.target is call_module:
            return "regex"
        if gn.op == "call_module" and pn.op != "call_module":
            return "primary"
        if pn.op == "call_function" and _canonical(pn, None) in LOOSE_LITERALS:
            return "primary"
        if _canonical(pn, None) in ARGUMENT_SPELLINGS:
            return "aliased"
        if pn.op != gn.op or _canonical(pn, None) is not pn.target:
            return "aliased"
        return "exact"

    def _nodes_are_equal(self, pn: fx.Node, gn: fx.Node, node_name_match: str = "") -> bool:
        if pn.op == "placeholder":
            return True
        if pn.op == "output" or gn.op in ("placeholder", "output", "get_attr"):
            return pn.op == gn.op
        if pn.op == "call_function" and pn.target is call_module:
            regex = pn.args[0]
            return gn.op == "call_module" and (
                re.fullmatch(regex, gn.target) is not None
                or re.fullmatch(regex, gn.target.rsplit(".", 1)[-1]) is not None
            )
        return _canonical(pn, None) == _canonical(gn, self.owner)

    def _match_nodes(self, pn: fx.Node, gn: fx.Node, match: InternalMatch, node_name_match: str = "") -> bool:
        mode = "exact" if pn.op == "placeholder" else self._mode(pn, gn)
        if mode == "exact":
            return super()._match_nodes(pn, gn, match, node_name_match)
        if pn in match.nodes_map:
            return match.nodes_map[pn] == gn
        if gn in match.nodes_map.values() or not self._nodes_are_equal(pn, gn):
            return False
        saved = dict(match.nodes_map)
        match.nodes_map[pn] = gn
        if mode == "regex":
            p_args, g_args = list(pn.args[1:]) + list(pn.kwargs.values()), list(gn.args) + list(gn.kwargs.values())
        elif mode == "primary":
            p_args, g_args = list(pn.args[:1]), list(gn.args[:1])
        else:
            p_args, g_args = list(pn.args) + list(pn.kwargs.values()), list(gn.args) + list(gn.kwargs.values())
            spelling = ARGUMENT_SPELLINGS.get(_canonical(pn, None))
            if spelling is not None:
                rank = tensor_rank(g_args[0]) if g_args else None
                p_args, g_args = spelling(p_args, rank), spelling(g_args, rank)
        if len(p_args) == len(g_args) and all(self._match_value(a, b, match) for a, b in zip(p_args, g_args)):
            return True
        match.nodes_map.clear()
        match.nodes_map.update(saved)
        return False

    def _match_value(self, a: Any, b: Any, match: InternalMatch) -> bool:
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return self._match_nodes(a, b, match)
        if isinstance(a, fx.Node) and _reads_static_attribute(a) and isinstance(b, (torch.dtype, torch.device)):
            return True  # the trace answers ``x.dtype`` with the value (fixed by the call key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(self._match_value(x, y, match) for x, y in zip(a, b))
        return self._match_literals(a, b, match)

    def _match_literals(self, pn: Any, gn: Any, match: InternalMatch) -> bool:
        """Values inside a ``slice`` or a dict are dataflow too (``x[..., : x.shape[-1] // 2]``)."""
        if isinstance(pn, slice) and isinstance(gn, slice):
            return all(self._match_value(a, b, match) for a, b in
                       zip((pn.start, pn.stop, pn.step), (gn.start, gn.stop, gn.step)))
        if isinstance(pn, dict) and isinstance(gn, dict):
            return list(pn) == list(gn) and all(self._match_value(pn[k], gn[k], match) for k in pn)
        return super()._match_literals(pn, gn, match)


_SAME_RANK_METHODS = {"transpose", "contiguous", "to", "type", "float", "half", "bfloat16", "neg", "softmax",
                      "type_as", "masked_fill", "pow", "sqrt", "rsqrt", "tanh", "exp"}
_SAME_RANK_FUNCTIONS = {torch.transpose, F.softmax, F.dropout, torch.dropout, torch.tanh, torch.rsqrt, operator.neg,
                        F.silu, F.gelu, F.relu, torch.softmax}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.matmul,
                operator.matmul, torch.where}
_SHAPE_METHODS = {"view", "reshape", "expand", "permute", "new_zeros", "new_ones"}


def tensor_rank(value: Any, depth: int = 32) -> int | None:
    """The number of dimensions of a graph value, read off the ops that made it (``view(b, s, -1, d)``,
    ``transpose``, elementwise ops, indexing, module calls); None where the graph does not say."""
    if not isinstance(value, fx.Node) or depth == 0:
        return None
    args, target = value.args, value.target
    if value.op == "call_method" and target in _SHAPE_METHODS and len(args) > 1:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return len(shape)
    if value.op == "call_method" and target == "unsqueeze" or target is torch.unsqueeze:
        inner = tensor_rank(args[0], depth - 1)
        return None if inner is None else inner + 1
    if (value.op == "call_method" and target in _SAME_RANK_METHODS) or target in _SAME_RANK_FUNCTIONS \
            or value.op == "call_module":
        return tensor_rank(args[0], depth - 1) if args else None
    if target in _ELEMENTWISE or (value.op == "call_method" and target in ("mul", "add", "sub", "div")):
        ranks = [tensor_rank(a, depth - 1) for a in args if isinstance(a, fx.Node)]
        known = [r for r in ranks if r is not None]
        return max(known) if known and len(known) == len(ranks) else None
    if target is operator.getitem and isinstance(args[1], tuple) and Ellipsis not in args[1]:
        inner = tensor_rank(args[0], depth - 1)
        if inner is None:
            return None
        return inner + sum(i is None for i in args[1]) - sum(isinstance(i, int) for i in args[1])
    return None


def _reads_static_attribute(node: fx.Node) -> bool:
    """``x.dtype`` / ``x.device`` in a pattern (plain fx records them as ``getattr`` calls)."""
    return (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in ("dtype", "device"))


def find_subgraphs(gm: fx.GraphModule, path: str, pattern_fn: Callable) -> list[Subgraph]:
    """All matches of ``pattern_fn`` in ``gm``'s graph, in topological order."""
    pattern = trace_pattern(pattern_fn)
    param_names = [n.target for n in pattern.nodes if n.op == "placeholder"]
    matcher = DataflowMatcher(pattern, gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found = []
    try:
        matches = matcher.match(gm.graph)
    except KeyError as exc:
        raise PatternError(f"pattern {getattr(pattern_fn, '__name__', pattern_fn)!r}: parameter {exc} is held "
                           f"inside a module call in the graph (e.g. a Linear's weight), so it cannot be bound; "
                           f"drop it from the pattern") from None
    for m in matches:
        nodes = sorted((gn for pn, gn in m.nodes_map.items() if pn.op not in ("placeholder", "output")),
                       key=order.__getitem__)
        found.append(Subgraph(path, nodes, list(m.placeholder_nodes), list(m.returning_nodes), param_names))
    found.sort(key=lambda sg: order[sg.nodes[0]])
    return found


def find_nodes(gm: fx.GraphModule, path: str, predicate: Callable[[fx.Node], bool]) -> list[Subgraph]:
    """Single-node subgraphs for every node ``predicate`` accepts."""
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and predicate(node):
            inputs = list(node.all_input_nodes)
            found.append(Subgraph(path, [node], inputs, [node], [f"arg{i}" for i in range(len(inputs))]))
    return found


def find_matches(gm: fx.GraphModule, pattern: Callable, predicate: bool | None = None) -> list[Subgraph]:
    """One ``find``: matches of a pattern function or node predicate in ``gm``'s (active) graph,
    with paths relative to ``gm`` (``''``), each knowing its origin."""
    predicate = is_node_predicate(pattern) if predicate is None else predicate
    found = find_nodes(gm, "", pattern) if predicate else find_subgraphs(gm, "", pattern)
    search = next(_SEARCHES)
    for index, sg in enumerate(found):
        sg.origin = Origin(pattern, index, len(found), search, predicate)
    return found


def is_node_predicate(fn: Callable) -> bool:
    """A one-parameter callable annotated ``fx.Node`` (or whose parameter is called ``node``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and (params[0].annotation in (fx.Node, "fx.Node", "Node") or params[0].name == "node")


__all__ = ["call_module", "Origin", "Subgraph", "find_matches", "DataflowMatcher", "find_subgraphs", "find_nodes",
           "register_equivalent_module", "tensor_rank", "trace_pattern"]
