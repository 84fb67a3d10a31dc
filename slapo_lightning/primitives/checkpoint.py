"""``sch.checkpoint()``: recompute a module's (or subgraph's) activations in backward."""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from .fuse import fuse
from .registry import register_primitive


def _wrap(module: nn.Module) -> nn.Module:
    """torch's non-reentrant checkpoint wrapper: any inputs, kwargs, and unchanged state_dict keys."""
    if isinstance(module, CheckpointWrapper):
        return module
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


@register_primitive("checkpoint")
def checkpoint(sch, subgraph: Any = None) -> nn.Module | list[nn.Module]:
    """Checkpoint the whole module, or group each subgraph into a checkpointed child."""
    if subgraph is None:
        wrapped = _wrap(sch.mod)
        sch.replace_module(wrapped)
        return wrapped
    groups = fuse(sch, subgraph, compiler=None, name="Checkpoint")
    gm = sch.mod
    wrapped = []
    for name, child in list(gm.named_children()):
        if any(child is g for g in groups):
            setattr(gm, name, _wrap(child))
            wrapped.append(getattr(gm, name))
    gm.recompile()
    return wrapped
