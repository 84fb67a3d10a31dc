"""``sch.fuse(subgraph)``: pull a subgraph into one module and hand it to a compiler.

Module calls inside the subgraph are first rewritten in functional form with their parameters
read by the parent (``get_attr``), so the fused module owns no state: state_dict keys stay
where they were and the compiler sees one pure function. ``training`` is passed in from the
parent, so dropout in a fused region follows ``.train()`` / ``.eval()``.
"""
from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from ...errors import FuseError
from ...registry import Registry
from ..edits import PatternEdit, apply_everywhere
from .registry import register_primitive
from .replace import as_subgraph_list, unique_child_name

COMPILERS: Registry = Registry("fusion compiler")


@COMPILERS.register("inductor")
def _inductor(gm: fx.GraphModule) -> Callable:
    return torch.compile(gm, backend="inductor")


@COMPILERS.register("TorchScript")
def _torchscript(gm: fx.GraphModule) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(gm)


class FusedModule(nn.Module):
    """A fused region: the extracted graph plus its compiled form (built on first call)."""

    def __init__(self, graph_module: fx.GraphModule, compiler: str | None):
        super().__init__()
        self.graph_module = graph_module
        self.compiler = compiler

    def forward(self, *args: Any) -> Any:
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            compiled = self.graph_module if self.compiler is None else COMPILERS.get(self.compiler)(self.graph_module)
            self.__dict__["_compiled"] = compiled
        return compiled(*args)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_compiled", None)
        return state

    def extra_repr(self) -> str:
        return f"compiler={self.compiler!r}"


FUNCTIONAL_FORMS: dict[type, Callable] = {}
"""Module class -> ``fn(graph, node, module, param, training) -> node`` building its functional call."""


def functional_form(*classes: type):
    def register(fn: Callable) -> Callable:
        for cls in classes:
            FUNCTIONAL_FORMS[cls] = fn
        return fn

    return register


@functional_form(nn.Dropout)
def _dropout(graph, node, module, param, training):
    return graph.call_function(F.dropout, (node.args[0],), {"p": module.p, "training": training(), "inplace": False})


@functional_form(nn.LayerNorm)
def _layer_norm(graph, node, module, param, training):
    return graph.call_function(F.layer_norm, (node.args[0], tuple(module.normalized_shape)),
                               {"weight": param("weight"), "bias": param("bias"), "eps": module.eps})


@functional_form(nn.Linear)
def _linear(graph, node, module, param, training):
    return graph.call_function(F.linear, (node.args[0], param("weight"), param("bias")))


@functional_form(nn.GELU)
def _gelu(graph, node, module, param, training):
    return graph.call_function(F.gelu, (node.args[0],), {"approximate": module.approximate})


@functional_form(nn.ReLU)
def _relu(graph, node, module, param, training):
    return graph.call_function(F.relu, (node.args[0],))


@functional_form(nn.Tanh)
def _tanh(graph, node, module, param, training):
    return graph.call_function(torch.tanh, (node.args[0],))


def _functionalize(gm: fx.GraphModule, nodes: list[fx.Node], path: str) -> list[fx.Node]:
    """Rewrite module calls among ``nodes`` as functional calls; return the new node list."""
    graph = gm.graph
    result = []
    for node in nodes:
        if node.op != "call_module":
            result.append(node)
            continue
        module = gm.get_submodule(node.target)
        build = FUNCTIONAL_FORMS.get(type(module))
        if build is None:
            raise FuseError(f"fuse in {path or '<root>'}: cannot inline module {node.target!r} of type "
                            f"{type(module).__name__}; inlinable: {', '.join(c.__name__ for c in FUNCTIONAL_FORMS)}")
        if node.kwargs or len(node.args) != 1:
            raise FuseError(f"fuse in {path or '<root>'}: module call {node.target!r} takes extra arguments")
        first = next(n for n in graph.nodes if n.op != "placeholder")

        def param(name, target=node.target, module=module):
            if getattr(module, name, None) is None:
                return None
            with graph.inserting_before(first):
                return graph.get_attr(f"{target}.{name}")

        def training():
            with graph.inserting_before(first), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return graph.get_attr("training")

        with graph.inserting_before(node):
            new = build(graph, node, module, param, training)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        result.append(new)
    return result


def _annotate_flags(sub_gm: fx.GraphModule, inputs: tuple[fx.Node, ...]) -> None:
    """Type the ``training`` input as bool (TorchScript would infer Tensor)."""
    placeholders = [n for n in sub_gm.graph.nodes if n.op == "placeholder"]
    for source, placeholder in zip(inputs, placeholders):
        if source.op == "get_attr" and source.target == "training":
            placeholder.type = bool
    sub_gm.recompile()


@register_primitive("fuse")
def fuse(sch, subgraph: Any, compiler: str | None = "inductor", name: str = "FusedModule") -> list[FusedModule]:
    """Fuse each subgraph into a child ``<name>_<n>`` compiled with ``compiler`` (None: just group);
    in every specialisation of a traced module."""
    gm = sch.mod
    if not isinstance(gm, fx.GraphModule):
        raise FuseError(f"{sch.path or '<root>'} is not traced; call trace() first")
    if compiler is not None:
        COMPILERS.get(compiler)
    subgraphs = as_subgraph_list(subgraph)
    for sg in subgraphs:
        if any(n.graph is not gm.graph or n._erased for n in sg.nodes):
            raise FuseError(f"a subgraph does not belong to the current graph of {sch.path or '<root>'}; call find() again")
    action = functools.partial(fuse_in_graph, compiler=compiler, name=name, path=sch.path)
    edit = PatternEdit(f"fuse ({name}, {compiler})", [sg.origin for sg in subgraphs], action)
    return apply_everywhere(gm, edit, lambda: action(gm, subgraphs)).value


def fuse_in_graph(gm: fx.GraphModule, subgraphs: list, compiler: str | None, name: str, path: str) -> list[FusedModule]:
    """Fuse ``subgraphs`` of ``gm``'s active graph into new children."""
    fused = []
    for sg in subgraphs:
        nodes = _functionalize(gm, sg.nodes, path)
        child_name = unique_child_name(gm, name)
        sub_gm, inputs, outputs = fuse_as_graphmodule(gm, nodes, child_name)
        _annotate_flags(sub_gm, inputs)
        module = FusedModule(sub_gm, compiler)
        gm.add_submodule(child_name, module)
        with gm.graph.inserting_after(nodes[-1]):
            call = gm.graph.call_module(child_name, tuple(inputs))
        with gm.graph.inserting_after(call):
            if len(outputs) == 1:
                outputs[0].replace_all_uses_with(call)
            else:
                for i, out in enumerate(outputs):
                    out.replace_all_uses_with(gm.graph.call_function(operator.getitem, (call, i)))
        for node in reversed(nodes):
            gm.graph.erase_node(node)
        fused.append(module)
    gm.graph.lint()
    gm.recompile()
    return fused
