"""Ops and tensor parallelism: an op that rebuilds modules from their weights (merging Linears,
splitting a bias off, reusing a Conv1D pair) would take a DTensor shard for the whole weight, or
drop the hooks torch's parallel styles put on the module. Such ops refuse DTensor weights at
apply time; a spec pass that uses them says ``unless_parallel: tensor_parallel``. An op handed
DTensors at call time (the fused cross-entropy given a vocabulary-parallel head) gathers them."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import OpError


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def refuse_distributed(op: str, modules: Iterable[nn.Module]) -> None:
    """OpError when a module the op rebuilds holds DTensor (tensor-parallel) parameters."""
    for module in modules:
        if any(_is_dtensor(p) for p in module.parameters()):
            raise OpError(f"{op}: {type(module).__name__} holds tensor-parallel (DTensor, sharded by tensor parallelism or FSDP) weights; {op} needs whole "
                          f"weights. Apply it before the parallel passes, or mark its pass "
                          f"unless_parallel: tensor_parallel so the original code runs under tensor parallelism")


def whole(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each DTensor gathered into a plain tensor (differentiably: its gradient goes back to the
    shards), the rest as they are. Right where every rank of the mesh computes the same thing
    from them, as the ranks of one tensor-parallel group do for the LM head and its loss."""
    return tuple(t.full_tensor() if t is not None and _is_dtensor(t) else t for t in tensors)
