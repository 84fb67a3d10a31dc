"""``sch.replace(new, target)``: swap a whole module, one subgraph, or several sharing an input.

Everything that can fail (argument binding, placement) is checked before the graph changes, so a
failing replace leaves the model as it was. A subgraph replacement holds in every specialisation
of a traced module (``core.edits``): the same op instance, called from each variant's graph.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch.fx as fx
from torch import nn

from ...errors import ReplaceError
from ..pattern import Subgraph
from ..edits import PatternEdit, apply_everywhere
from ..state_keys import alias_split_state, keep_original_keys, moved_keys, supports_split_state, tensor_keys
from ..tracer import forward_signature
from .registry import register_primitive


def unique_child_name(parent: nn.Module, base: str) -> str:
    """``<base>_<n>`` with the first free ``n``."""
    n = 0
    while hasattr(parent, f"{base}_{n}"):
        n += 1
    return f"{base}_{n}"


def as_subgraph_list(target: Any) -> list[Subgraph]:
    if isinstance(target, Subgraph):
        return [target]
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, Subgraph) for t in target):
        return list(target)
    raise ReplaceError(f"replace target must be a subgraph or a list of subgraphs from find(), got {type(target).__name__}"
                       + (" (empty: the pattern matched nothing)" if isinstance(target, (list, tuple)) and not target else ""))


def bind_arguments(new: nn.Module, param_names: list[str], inputs: list[Any],
                   concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """Bind pattern parameters to ``new.forward``: by name, then in order; ``concrete_args`` fill the rest."""
    sig = forward_signature(new)
    where = f"{type(new).__name__}.forward{sig}"
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    values = dict(zip(param_names, inputs))
    bound: dict[str, Any] = {}
    for name, value in (concrete_args or {}).items():
        if name not in sig.parameters and not takes_kwargs:
            raise ReplaceError(f"concrete_args {name!r} is not a parameter of {where}")
        bound[name] = value
    leftover = []
    for name in param_names:
        if any(p.name == name for p in params) and name not in bound:
            bound[name] = values[name]
        else:
            leftover.append(name)
    free = [p for p in params if p.name not in bound and p.kind is not p.KEYWORD_ONLY]
    for name in leftover:
        if not free:
            raise ReplaceError(f"pattern argument {name!r} does not bind to {where}: no parameter left")
        bound[free.pop(0).name] = values[name]
    missing = [p.name for p in params if p.name not in bound and p.default is inspect.Parameter.empty]
    if missing:
        raise ReplaceError(f"{where} needs {', '.join(missing)}, which the subgraph does not provide; "
                           f"pass them in concrete_args")
    return bound


def _insertion_point(graph: fx.Graph, subgraphs: list[Subgraph], bound: dict[str, Any]) -> fx.Node:
    """The node before which the new call goes: after every input, before every outside user."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = {n for sg in subgraphs for n in sg.nodes}
    inputs = [v for v in bound.values() if isinstance(v, fx.Node)]
    last_input = max((order[n] for n in inputs), default=-1)
    users = [u for sg in subgraphs for out in sg.outputs for u in out.users if u not in members]
    first_user = min((order[u] for u in users), default=len(order) - 1)
    if last_input >= first_user:
        raise ReplaceError("cannot place the replacement: an input is computed after a use of the subgraph's output")
    return list(graph.nodes)[first_user]


def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the replaced nodes (last first)."""
    for node in reversed(nodes):
        if not node.users:
            gm.graph.erase_node(node)


def _erase_unread_attributes(gm: fx.GraphModule) -> None:
    """A parameter a subgraph read (a flattened norm's ``weight``) may live in the replacement now;
    its ``get_attr`` left unread would keep the old child called, and its key in the state_dict."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def _check_same_graph(gm: fx.GraphModule, subgraphs: list[Subgraph], path: str) -> None:
    for sg in subgraphs:
        if any(node.graph is not gm.graph or node._erased for node in sg.nodes):
            raise ReplaceError(f"a subgraph does not belong to the current graph of {path or '<root>'} "
                               f"(found in another module, or already replaced); call find() again")


@register_primitive("replace")
def replace(sch, new: nn.Module, target: Any = None, name: str | None = None,
            concrete_args: dict[str, Any] | None = None) -> nn.Module:
    """Replace the module (``target=None``), a subgraph, or subgraphs sharing inputs by ``new``."""
    if not isinstance(new, nn.Module):
        raise ReplaceError(f"replace expects an nn.Module, got {type(new).__name__}")
    new.train(sch.mod.training)  # a fresh op would otherwise run dropout inside an eval-mode model
    if target is None:
        keys_before = tensor_keys(sch.mod)
        sch.replace_module(new)
        keep_original_keys(new, moved_keys(keys_before, new))
        return new
    gm = sch.mod
    if not isinstance(gm, fx.GraphModule):
        raise ReplaceError(f"{sch.path or '<root>'} is not traced; call trace() or find() first")
    subgraphs = as_subgraph_list(target)
    _check_same_graph(gm, subgraphs, sch.path)
    child_name = name or unique_child_name(gm, type(new).__name__)
    if hasattr(gm, child_name) and getattr(gm, child_name) is not new:
        raise ReplaceError(f"{sch.path or '<root>'} already has a child named {child_name!r}")
    edit = PatternEdit(f"replace -> {type(new).__name__} ({child_name})", [sg.origin for sg in subgraphs],
                       functools.partial(replace_in_graph, child_name=child_name, concrete_args=concrete_args,
                                         path=sch.path))
    apply_everywhere(gm, edit, lambda: replace_in_graph(gm, subgraphs, child_name, concrete_args, sch.path, new=new))
    return new


def replace_in_graph(gm: fx.GraphModule, subgraphs: list[Subgraph], child_name: str,
                     concrete_args: dict[str, Any] | None, path: str, new: nn.Module | None = None) -> None:
    """Call ``gm.<child_name>`` (``new`` added as that child if given) in place of ``subgraphs``
    in ``gm``'s active graph."""
    module = new if new is not None else gm.get_submodule(child_name)
    first = subgraphs[0]
    if any(list(sg.inputs) != list(first.inputs) for sg in subgraphs[1:]):
        raise ReplaceError("horizontal replace needs subgraphs that share their inputs")
    if len(subgraphs) > 1 and any(len(sg.outputs) != 1 for sg in subgraphs):
        raise ReplaceError("horizontal replace needs subgraphs with one output each")
    bound = bind_arguments(module, first.param_names, first.inputs, concrete_args)
    anchor = _insertion_point(gm.graph, subgraphs, bound)
    original_modules = [[n.target for n in sg.nodes if n.op == "call_module"] for sg in subgraphs]
    first_time = not hasattr(gm, child_name)
    if first_time:
        gm.add_submodule(child_name, module)
    with gm.graph.inserting_before(anchor):
        call = gm.graph.call_module(child_name, kwargs=bound)
        outputs = [out for sg in subgraphs for out in sg.outputs]
        if len(outputs) == 1:
            outputs[0].replace_all_uses_with(call)
        else:
            for i, out in enumerate(outputs):
                out.replace_all_uses_with(gm.graph.call_function(operator.getitem, (call, i)))
    _erase(gm, sorted({n for sg in subgraphs for n in sg.nodes}, key=list(gm.graph.nodes).index))
    _erase_unread_attributes(gm)
    if first_time and len(subgraphs) > 1 and supports_split_state(module) and all(len(m) == 1 for m in original_modules):
        alias_split_state(gm, child_name, [m[0] for m in original_modules])
    gm.graph.lint()
    gm.recompile()
