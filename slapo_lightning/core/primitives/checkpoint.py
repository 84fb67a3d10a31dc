"""``sch.checkpoint()``: recompute a module's (or subgraph's) activations in backward."""
from __future__ import annotations

import functools
from typing import Any

import torch.fx as fx
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from ...errors import ScheduleError
from ..edits import PatternEdit, apply_everywhere
from .fuse import fuse_in_graph
from .registry import register_primitive
from .replace import as_subgraph_list


def _wrap(module: nn.Module) -> nn.Module:
    """torch's non-reentrant checkpoint wrapper: any inputs, kwargs, and unchanged state_dict keys."""
    if isinstance(module, CheckpointWrapper):
        return module
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


@register_primitive("checkpoint")
def checkpoint(sch, subgraph: Any = None) -> nn.Module | list[nn.Module]:
    """Checkpoint the whole module, or group each subgraph into a checkpointed child (in every
    specialisation of a traced module)."""
    if subgraph is None:
        wrapped = _wrap(sch.mod)
        sch.replace_module(wrapped)
        return wrapped
    gm = sch.mod
    if not isinstance(gm, fx.GraphModule):
        raise ScheduleError(f"checkpoint of a subgraph: {sch.path or '<root>'} is not traced; call trace() first")
    subgraphs = as_subgraph_list(subgraph)
    action = functools.partial(checkpoint_in_graph, path=sch.path)
    edit = PatternEdit("checkpoint", [sg.origin for sg in subgraphs], action)
    return apply_everywhere(gm, edit, lambda: action(gm, subgraphs)).value


def checkpoint_in_graph(gm: fx.GraphModule, subgraphs: list, path: str) -> list[nn.Module]:
    groups = fuse_in_graph(gm, subgraphs, compiler=None, name="Checkpoint", path=path)
    wrapped = []
    for name, child in list(gm.named_children()):
        if any(child is g for g in groups):
            setattr(gm, name, _wrap(child))
            wrapped.append(getattr(gm, name))
    gm.recompile()
    return wrapped
