"""Elementwise chains that follow a matmul, as single ops: bias + GELU and
bias + dropout + residual + LayerNorm.

On CPU they run as plain PyTorch (the reference itself). On CUDA the same functions go through
``torch.compile`` (see ``compiled.py``), which fuses each chain into one kernel forward and one
backward instead of a memory pass per op.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .compiled import compiled_on_cuda
from .dropout import fast_dropout
from ..errors import OpError, unknown
from .registry import register_op

GELU_APPROXIMATIONS = ("none", "tanh")
AUTO = "auto"

HF_GELU_NAMES: dict[str, str] = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_python_tanh": "tanh",
    "gelu_fast": "tanh",
}
"""transformers' ACT2FN names of the GELUs, and the ``F.gelu`` approximation each computes.
The tanh formulas written out in Python (``gelu_new``, ``gelu_python_tanh``, ``gelu_fast``) agree
with ``F.gelu(approximate="tanh")`` up to float rounding (a few ulp)."""

HF_GELU_CLASSES: dict[str, str] = {
    "GELUActivation": "none",
    "NewGELUActivation": "tanh",
    "GELUTanh": "tanh",
    "PytorchGELUTanh": "tanh",
    "FastGELUActivation": "tanh",
}
"""The same, keyed by the class name of transformers' activation modules (no transformers import)."""


def gelu_approximate_for(activation: str | nn.Module | Callable) -> str:
    """``"none"`` or ``"tanh"`` for a GELU given as an ACT2FN name, an activation module or ``F.gelu``."""
    if isinstance(activation, str):
        found = HF_GELU_NAMES.get(activation)
    elif isinstance(activation, nn.GELU):
        found = activation.approximate
    elif activation is F.gelu:
        found = "none"
    else:
        found = HF_GELU_CLASSES.get(type(activation).__name__)
    if found is None:
        raise OpError(
            f"{activation!r} is not a GELU this op reproduces; valid: {', '.join(HF_GELU_NAMES)}, "
            f"nn.GELU, F.gelu or the modules {', '.join(HF_GELU_CLASSES)}"
        )
    return found


def _matched_approximate(match) -> str:
    """The approximation of the first GELU call or GELU module inside the match."""
    for node in match.nodes:
        if node.op == "call_function" and node.target is F.gelu:
            return node.kwargs.get("approximate", "none")
        if node.op == "call_module":
            module = match.module.get_submodule(node.target)
            try:
                return gelu_approximate_for(module)
            except OpError:
                continue
    raise OpError("fused_bias_gelu: the match has no GELU call to read the approximation from")


def check_gelu_approximate(approximate: str) -> str:
    if approximate not in GELU_APPROXIMATIONS:
        raise OpError(unknown("GELU approximation", approximate, GELU_APPROXIMATIONS, did_you_mean=False))
    return approximate


@compiled_on_cuda
def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias)."""
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


@compiled_on_cuda
def bias_dropout_add_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    p: float,
    training: bool,
) -> torch.Tensor:
    """layer_norm(dropout(x + bias) + residual)."""
    hidden = x if bias is None else x + bias
    hidden = fast_dropout(hidden, p, training)
    return F.layer_norm(hidden + residual, normalized_shape, weight, ln_bias, eps)


@register_op("fused_bias_gelu")
class FusedBiasGELU(nn.Module):
    """``forward(x, bias)`` = gelu(x + bias); ``bias`` may be None.

    ``approximate="none"`` is the erf GELU (transformers' ``gelu``), ``"tanh"`` the tanh formula
    (``gelu_new``, ``gelu_pytorch_tanh``). Build it from a model's activation with
    :meth:`from_activation`. The op has no parameters: the bias stays the Linear's Parameter and is
    passed in (after ``decompose`` splits it off the matmul).
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = check_gelu_approximate(approximate)

    @classmethod
    def from_activation(cls, activation: str | nn.Module | Callable) -> "FusedBiasGELU":
        return cls(gelu_approximate_for(activation))

    @classmethod
    def from_match(cls, match, approximate: str = AUTO) -> "FusedBiasGELU":
        """gelu(x + bias) with the GELU the model uses (erf or tanh): the pattern variant's
        ``approximate`` tag, or read off the matched GELU call or module."""
        if approximate == AUTO:
            tagged = match.tags.get("approximate", "from_node")
            approximate = _matched_approximate(match) if tagged == "from_node" else tagged
        return cls(approximate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return bias_gelu(x, bias, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


@register_op("fused_bias_dropout_add_layer_norm")
class FusedBiasDropoutAddLayerNorm(nn.Module):
    """``forward(x, bias, residual)`` = layer_norm(dropout(x + bias) + residual).

    The tail of BERT's ``BertSelfOutput``/``BertOutput`` (dense -> dropout -> LayerNorm(h + input))
    once ``decompose`` has split the dense bias off: ``x`` is the matmul output, ``bias`` the dense
    bias (or None), ``residual`` the block input. The module owns the LayerNorm's ``weight`` and
    ``bias`` like ``nn.LayerNorm``; :meth:`from_layer_norm` reuses an existing LayerNorm's Parameter
    objects, so weights, optimizer state and tying are unchanged. Dropout (probability ``p``) runs
    only in training mode.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        p: float = 0.1,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not 0.0 <= p <= 1.0:
            raise OpError(f"dropout probability p must be in [0, 1], got {p}")
        self.p = p
        self.eps = eps
        affine_bias = elementwise_affine and bias
        self.register_parameter("weight", nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(self.normalized_shape)) if affine_bias else None)

    @classmethod
    def from_match(cls, match, p: float | str = AUTO) -> "FusedBiasDropoutAddLayerNorm":
        """Takes over the matched LayerNorm's own Parameters and the matched dropout's probability."""
        norms = match.called_modules(nn.LayerNorm)
        if len(norms) != 1:
            raise OpError(
                f"fused_bias_dropout_add_layer_norm needs one LayerNorm module in the match, found {len(norms)}"
            )
        return cls.from_layer_norm(norms[0], p=match.dropout_probability() if p == AUTO else p)

    @classmethod
    def from_layer_norm(cls, layer_norm: nn.LayerNorm, p: float = 0.1) -> "FusedBiasDropoutAddLayerNorm":
        """Wraps ``layer_norm``'s own Parameters (no copy) with dropout probability ``p``."""
        fused = cls(layer_norm.normalized_shape, p=p, eps=layer_norm.eps, elementwise_affine=False)
        fused.weight = layer_norm.weight
        fused.bias = layer_norm.bias
        fused.train(layer_norm.training)
        return fused

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        return bias_dropout_add_layer_norm(
            x, bias, residual, self.normalized_shape, self.weight, self.bias, self.eps, self.p, self.training
        )

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, p={self.p}, eps={self.eps}, elementwise_affine={self.weight is not None}"
