"""Autocast for ops written as ``torch.autograd.Function``.

Autocast casts the inputs of each matmul it sees, but a Function's hand-written backward runs
outside autocast and would then meet mixed dtypes. So the op does what autocast would have done
to its matmuls once, up front (cast the floating inputs to the autocast dtype), and runs the
Function with autocast off. Gradients flow back through the casts to the original dtypes.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for ``device_type``, else as they are."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, enabled=False)
