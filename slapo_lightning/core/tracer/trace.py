"""Tracing entry point: the first specialisation of a module, and every later one.

``trace_module`` traces a module on its example inputs (and on further variants, e.g. the same
batch with and without padding) and returns a ``TracedModule`` holding one specialisation per
distinct set of decisions. ``trace_graph`` is the one tracing routine both use.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ...errors import TraceError
from .guards import has_internal_guards
from .inputs import CallArgs, bind_examples
from .leaves import leaf_functions_patched
from .proxies import HFTracer, first_line
from .specialise import Specialisation, SpecialisationState, TracedModule, TraceOptions
from .state import adopt_state
from .training import make_dropout_follow_training, training_defaults

RecordedCalls = dict[str, list[CallArgs]]


def trace_graph(module: nn.Module, example_inputs: Any, options: TraceOptions) -> tuple[fx.Graph, RecordedCalls]:
    """Trace ``module`` (in train mode, RNG untouched) on one example into a graph.

    Returns the graph and the concrete inputs each leaf submodule was called with (so a
    hierarchical trace can trace the children next). Constants the graph references are left as
    attributes of ``module`` for the caller to move.
    """
    tracer = HFTracer(flatten=options.flatten, leaves=options.leaves, path=options.path)
    frozen: dict[str, Any] = {}
    if example_inputs is not None:
        tracer.examples, frozen = bind_examples(module, example_inputs)
    for name, value in training_defaults(module).items():
        frozen.pop(name, None)
        tracer.examples[name] = value
    frozen.update(options.concrete_args or {})
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.random.fork_rng(devices=[]), leaf_functions_patched():
            module.train()
            graph = tracer.trace(module, concrete_args=frozen or None)
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"cannot trace {options.path or '<root>'} ({type(module).__name__}): "
                         f"{type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    _drop_concrete_values(graph)
    _rename_shadowing_nodes(graph)
    _restore_parameter_names(graph, frozen)
    _drop_input_none_asserts(graph)
    make_dropout_follow_training(graph)
    graph.__dict__["_slapo_constants"] = dict(tracer.constants)
    calls = {target: [CallArgs(*call)] for target, call in tracer.recorded_calls.items()}
    return graph, calls


def _trace_for_state(source: nn.Module, example: Any, options: TraceOptions) -> tuple[fx.Graph, RecordedCalls]:
    """``trace_graph`` for a specialisation made at run time: the call's own values decide, not
    the ``concrete_args`` the first trace was given."""
    return trace_graph(source, example, TraceOptions(options.flatten, options.leaves, {}, options.path))


def trace_module(
    module: nn.Module,
    *,
    flatten: bool = False,
    leaves: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
    variants: Sequence[Any] = (),
    path: str = "",
) -> tuple[TracedModule, RecordedCalls]:
    """Trace ``module`` into a ``TracedModule``: one specialisation for ``example_inputs`` and
    one for each of ``variants`` that decides differently.

    Returns the traced module and, per leaf child, the distinct inputs it was called with.
    """
    options = TraceOptions(flatten=flatten, leaves=tuple(leaves), concrete_args=dict(concrete_args or {}), path=path)
    graph, calls = trace_graph(module, example_inputs, options)
    constants = graph.__dict__.get("_slapo_constants", {})
    gm = TracedModule(module, graph, class_name=type(module).__name__)
    first_code = gm.__dict__.pop("_slapo_first_code")
    adopt_state(module, gm)
    gm.training = module.training
    state = SpecialisationState(module, options, _trace_for_state)
    gm.__dict__["_slapo_state"] = state
    gm.install_dispatcher(module)
    first = Specialisation(_key_of(state, module, example_inputs), graph, "", code=first_code)
    first.label = state.label(first.key)
    first.internal_guards = has_internal_guards(graph)
    state.specs.append(first)
    state.by_key.setdefault(first.key, []).append(first)
    gm.__dict__["_slapo_active"] = first
    for variant in variants:
        key = _key_of(state, module, variant)
        v_graph, v_calls = trace_graph(module, variant, options)
        if state.duplicate(key, v_graph):
            continue
        gm.add_specialisation(Specialisation(key, v_graph, state.label(key)), module)
        for target, found in v_calls.items():
            calls.setdefault(target, []).extend(found)
    gm._activate(first)
    for name in constants:
        module.__dict__.pop(name, None)
    return gm, calls


def _key_of(state: SpecialisationState, module: nn.Module, example: Any) -> tuple:
    """The call key of an example call, with the trace's ``concrete_args`` as given values."""
    if isinstance(example, CallArgs):
        args, kwargs = tuple(example.args), dict(example.kwargs)
    elif isinstance(example, dict):
        args, kwargs = (), dict(example)
    elif example is None:
        args, kwargs = (), {}
    else:
        args, kwargs = tuple(example), {}
    kwargs.update(state.options.concrete_args)
    return state.call_key(module, args, kwargs)


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


def _rename_shadowing_nodes(graph: fx.Graph) -> None:
    """A call of HF's child named ``self`` (BertAttention.self) would shadow ``self`` in the code."""
    for node in graph.nodes:
        if node.name == "self":
            node._rename("self_module")



def _drop_input_none_asserts(graph: fx.Graph) -> None:
    """fx asserts that arguments traced as None stay None; the call key decides that already."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is fx._symbolic_trace._assert_is_none:
            graph.erase_node(node)
