"""Linear layers split so that schedules can fuse what follows the matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import refuse_distributed
from ..errors import OpError
from .matching import whole_module
from .registry import register_op


@register_op("linear_with_separate_bias")
class LinearWithSeparateBias(nn.Linear):
    """``nn.Linear`` whose bias add is a separate op, so ``x @ W.T`` and ``+ b`` trace as two nodes.

    Built by ``decompose`` from an existing Linear: the very same Parameter objects are reused, so
    optimizers, tied weights and state_dict keys are unaffected.
    """

    traced_as_leaf = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearWithSeparateBias":
        refuse_distributed("decompose", [linear])
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    @classmethod
    def from_match(cls, match) -> "LinearWithSeparateBias":
        """The replaced ``nn.Linear`` with its bias add as a separate op (same Parameters)."""
        module = whole_module(match, "linear_with_separate_bias")
        if type(module) is not nn.Linear:
            raise OpError(f"linear_with_separate_bias replaces an nn.Linear, got {type(module).__name__}")
        return cls.from_linear(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        return out if self.bias is None else out + self.bias
