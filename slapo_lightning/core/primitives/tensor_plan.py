"""Tensor-parallel plans read off a module's dataflow, and the check that a sharded module still
computes what it did.

``megatron``: Megatron-LM's pairing, found without naming any module. Trace the layer flat (its
Linears stay calls) and follow which values are sharded: a Linear reading a whole (replicated)
value is colwise, its output sharded on the last dimension; anything computed from a sharded
value is sharded; a Linear reading a sharded value is rowwise and makes it whole again (one
all-reduce). A colwise candidate whose sharded value would reach the layer's output without a
rowwise Linear in between stays whole. In a decoder layer this gives q/k/v colwise and the output
projection rowwise, gate/up colwise and down rowwise; a router or a Linear of another shape of
dataflow is left alone.

The dataflow says which Linears pair up, not that the code between them works on local heads
(a norm over all of q's features does not), so ``parallelize`` runs every sharded module on its
recorded input before and after and keeps the sharding only if the outputs agree.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ...errors import NoMatch
from ...registry import Registry
from ...tolerances import DEFAULT_ATOL, DEFAULT_RTOL
from ..snapshot import ModelSnapshot
from ..tracer import CallArgs, trace_graph
from ..tracer.proxies import first_line
from ..tracer.specialise import TraceOptions
from ..verify import whole_tensor
from .trace import is_op_leaf

LOW_PRECISION = (1.6e-2, 1e-2)
"""rtol, atol for 16-bit outputs: a sharded sum rounds differently from the whole one."""

TENSOR_PLANS: Registry = Registry("tensor-parallel plan")
"""Name -> ``fn(sch) -> [{child path: style}, ...]`` (``parallelize(plan=<name>)``): groups of
Linears each sharded, checked and kept (or left whole) on its own."""


def register_tensor_plan(name: str, derive: Callable[[Any], list[dict[str, str]]]) -> None:
    TENSOR_PLANS.register(name, derive)


def megatron_plan(sch) -> list[dict[str, str]]:
    """Colwise / rowwise Linears of ``sch.mod`` by its dataflow (module docstring), one plan per
    group of Linears that pair up (attention, MLP), so each can be kept or left whole on its own;
    NoMatch when there is no pair."""
    graph = _layer_graph(sch)
    modules = dict(sch.mod.named_modules())
    linears = {n for n in graph.nodes if n.op == "call_module" and type(modules.get(n.target)) is nn.Linear}
    colwise = set(linears)
    while True:
        rowwise, leaking = _propagate(graph, linears, colwise)
        if not leaking:
            break
        colwise -= leaking
    order = {node: index for index, node in enumerate(graph.nodes)}  # every rank shards in one order
    plans = [{n.target: "colwise" if n in cols else "rowwise" for n in sorted(cols | rows, key=order.__getitem__)}
             for cols, rows in _pair_groups(rowwise)]
    targets = [t for plan in plans for t in plan]
    if not plans or len(targets) != len(set(targets)):  # none, or one module called both ways
        raise NoMatch("its dataflow has no Linear whose sharded output another Linear makes whole again")
    return plans


def _pair_groups(rowwise: dict[fx.Node, frozenset]) -> list[tuple[set, set]]:
    """Rowwise Linears that make the same colwise ones whole belong together."""
    groups: list[tuple[set, set]] = []
    for row, cols in rowwise.items():
        joined = [g for g in groups if g[0] & cols]
        merged = (set(cols).union(*(g[0] for g in joined)), {row}.union(*(g[1] for g in joined)))
        groups = [g for g in groups if g not in joined] + [merged]
    return groups


def _layer_graph(sch) -> fx.Graph:
    module = sch.mod
    if isinstance(module, fx.GraphModule):
        return module.graph
    example = sch.example_inputs()
    if example is None:
        raise NoMatch("it was never called during the example run, so its dataflow is unknown")
    leaves = tuple(name for name, m in module.named_modules() if name and is_op_leaf(m))
    before = set(module.__dict__)
    try:
        graph, _ = trace_graph(module, example, TraceOptions(True, leaves, {}, sch.path))
    except Exception as exc:  # noqa: BLE001 - any reason it cannot be traced means no plan from its dataflow
        raise NoMatch(f"its dataflow cannot be traced ({first_line(exc)})") from None
    finally:
        for name in set(module.__dict__) - before:  # the trace's constants
            del module.__dict__[name]
    return graph


def _propagate(graph: fx.Graph, linears: set[fx.Node], colwise: set[fx.Node]):
    """Which colwise Linears' sharded outputs each node carries; returns the rowwise Linears (with
    the colwise ones they make whole) and the colwise ones whose shards leak."""
    carried: dict[fx.Node, frozenset] = {}
    rowwise: dict[fx.Node, frozenset] = {}
    leaking: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = frozenset().union(*(carried.get(i, frozenset()) for i in node.all_input_nodes))
        if node in linears and inputs:
            rowwise[node] = inputs
            carried[node] = frozenset()
        elif node in colwise:
            carried[node] = frozenset({node})
        elif node.op == "output":
            leaking |= inputs
        else:
            carried[node] = inputs
    return rowwise, leaking


register_tensor_plan("megatron", megatron_plan)


def keep_if_same_outputs(sch, shard: Callable[[], None], mesh, what: str) -> None:
    """Run ``shard()`` on ``sch.mod``; if the module's outputs on its recorded input change (or it
    fails), put the module back as it was and raise NoMatch saying so. Every rank decides alike."""
    example = sch.example_inputs()
    if example is None:
        shard()
        return
    module = sch.mod
    undo = ModelSnapshot(module)
    expected = _outputs(module, example)
    problem = None
    try:
        shard()
        problem = _difference(expected, _outputs(module, example))
    except Exception as exc:  # noqa: BLE001 - a sharding the module's code cannot run is refused like a wrong one
        problem = f"{type(exc).__name__}: {first_line(exc)}"
    if _any_rank(problem is not None, mesh):
        undo.restore()
        raise NoMatch(f"sharded by {what} it computes something else on its example input "
                      f"({problem or 'on another rank'}); it is left whole")


def _outputs(module: nn.Module, example) -> list[torch.Tensor]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = _call(module, example)
    finally:
        for m, mode in modes.items():
            m.training = mode
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return [whole_tensor(t) for t in leaves]


def _call(module: nn.Module, example):
    """``module`` on an example as the schedule records them: a call's (args, kwargs), a dict of
    keyword arguments (the root's batch), a tuple of positional ones or one tensor."""
    if isinstance(example, CallArgs):
        return module(*example.args, **example.kwargs)
    if isinstance(example, dict):
        return module(**example)
    return module(*example) if isinstance(example, (tuple, list)) else module(example)


def _difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if len(expected) != len(got):
        return f"{len(got)} output tensors instead of {len(expected)}"
    for index, (want, have) in enumerate(zip(expected, got)):
        if want.shape != have.shape:
            return f"output {index} has shape {tuple(have.shape)} instead of {tuple(want.shape)}"
        rtol, atol = LOW_PRECISION if want.dtype in (torch.float16, torch.bfloat16) else (DEFAULT_RTOL, DEFAULT_ATOL)
        if want.is_floating_point() and not torch.allclose(have, want, rtol=rtol, atol=atol):
            return f"output {index} differs by up to {(have - want).abs().max().item():.3g}"
    return None


def _any_rank(flag: bool, mesh) -> bool:
    import torch.distributed as dist

    decided = torch.tensor([int(flag)])
    dist.all_reduce(decided, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return bool(decided.item())
