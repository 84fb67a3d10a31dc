"""``sch.decompose()``: split a Linear's bias add from its matmul."""
from __future__ import annotations

from torch import nn

from ...errors import ScheduleError
from ...op.linear import LinearWithSeparateBias
from .registry import register_primitive


@register_primitive("decompose")
def decompose(sch) -> LinearWithSeparateBias:
    """Replace an ``nn.Linear`` by ``LinearWithSeparateBias`` holding the same Parameters."""
    module = sch.mod
    if isinstance(module, LinearWithSeparateBias):
        return module
    if type(module) is not nn.Linear:
        raise ScheduleError(f"decompose: {sch.path or '<root>'} is a {type(module).__name__}, expected nn.Linear")
    new = LinearWithSeparateBias.from_linear(module)
    sch.replace_module(new)
    return new
