"""Transformer MLP (project up -> GELU -> project down) that keeps less for backward.

Eager autograd keeps three activations per token for this block: the input, the pre-activation
and the GELU output. ``FusedMLP`` keeps the first two and recomputes the GELU in backward (one
cheap elementwise op), which saves ``tokens * hidden_features`` values per layer: 4/9 of the
block's saved activations for the usual 4x MLP. Forward numbers are those of the modules it
replaces (same GEMMs with the bias folded in, same GELU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .amp import autocast_inputs, autocast_off
from .dropout import fast_dropout
from .distributed import refuse_distributed
from ..errors import OpError
from .fused import check_gelu_approximate, gelu_approximate_for
from .matching import path_of, whole_module
from .registry import register_op


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d_layout: bool) -> torch.Tensor:
    """x @ W(^T) + b for 2-D ``x``; ``conv1d_layout``: weight stored (in, out) like transformers' Conv1D."""
    weight = weight if conv1d_layout else weight.t()
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


class _RecomputingMLP(torch.autograd.Function):
    """fc_out(gelu(fc_in(x))) saving only x and the pre-activation."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, approximate: str, conv1d_layout: bool):
        pre = _project(x, w_in, b_in, conv1d_layout)
        out = _project(F.gelu(pre, approximate=approximate), w_out, b_out, conv1d_layout)
        ctx.save_for_backward(x, pre, w_in, w_out)
        ctx.approximate = approximate
        ctx.conv1d_layout = conv1d_layout
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, pre, w_in, w_out = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        conv1d = ctx.conv1d_layout
        act = F.gelu(pre, approximate=ctx.approximate)
        grad_w_out = _weight_grad(act, grad_out, conv1d) if need_w_out else None
        grad_b_out = grad_out.sum(0) if need_b_out and ctx.has_bias[1] else None
        del act
        grad_act = grad_out.mm(w_out.t() if conv1d else w_out)
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre, approximate=ctx.approximate)
        del grad_act
        grad_w_in = _weight_grad(x, grad_pre, conv1d) if need_w_in else None
        grad_b_in = grad_pre.sum(0) if need_b_in and ctx.has_bias[0] else None
        grad_x = grad_pre.mm(w_in.t() if conv1d else w_in) if need_x else None
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None


def _weight_grad(inputs: torch.Tensor, grad_outputs: torch.Tensor, conv1d_layout: bool) -> torch.Tensor:
    return inputs.t().mm(grad_outputs) if conv1d_layout else grad_outputs.t().mm(inputs)


@register_op("fused_mlp")
class FusedMLP(nn.Module):
    """``forward(hidden_states)`` = dropout(fc_out(gelu(fc_in(hidden_states)))).

    ``fc_in`` and ``fc_out`` are the projection modules themselves: ``nn.Linear`` (weight (out, in))
    or transformers' GPT-2 ``Conv1D`` (weight (in, out)); the constructors below reuse the original
    modules and hence the very same Parameter objects, so a checkpoint or optimizer sees the same
    tensors (the scheduling core maps the keys). Dropout (probability ``dropout_p``) runs only in
    training mode.

    * ``FusedMLP(in_features, hidden_features, out_features=None, approximate="none", bias=True,
      dropout_p=0.0)``: fresh ``nn.Linear`` projections.
    * ``FusedMLP.from_bert(intermediate, output)``: BERT's ``intermediate.dense -> act ->
      output.dense`` (``BertOutput``'s dropout, residual and LayerNorm are not included; see
      ``FusedBiasDropoutAddLayerNorm``).
    * ``FusedMLP.from_gpt2(mlp)``: the whole ``GPT2MLP`` (``c_fc -> act -> c_proj -> dropout``).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        approximate: str = "none",
        bias: bool = True,
        dropout_p: float = 0.0,
    ):
        super().__init__()
        self.fc_in = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc_out = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.approximate = check_gelu_approximate(approximate)
        if not 0.0 <= dropout_p <= 1.0:
            raise OpError(f"dropout probability must be in [0, 1], got {dropout_p}")
        self.dropout_p = dropout_p
        self.conv1d_layout = False

    @classmethod
    def _wrap(cls, fc_in: nn.Module, fc_out: nn.Module, activation, dropout_p: float, conv1d_layout: bool, training: bool):
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.fc_in = fc_in
        mlp.fc_out = fc_out
        mlp.approximate = gelu_approximate_for(activation)
        mlp.dropout_p = dropout_p
        mlp.conv1d_layout = conv1d_layout
        mlp.train(training)
        return mlp

    @classmethod
    def from_bert(cls, intermediate: nn.Module, output: nn.Module) -> "FusedMLP":
        """From ``BertIntermediate`` and ``BertOutput``: reuses ``intermediate.dense`` and ``output.dense``."""
        return cls._wrap(
            intermediate.dense, output.dense, intermediate.intermediate_act_fn, 0.0, False, intermediate.training
        )

    @classmethod
    def from_gpt2(cls, mlp: nn.Module) -> "FusedMLP":
        """From ``GPT2MLP``: reuses ``c_fc`` and ``c_proj`` (Conv1D) and takes its dropout probability."""
        refuse_distributed("fused_mlp", [mlp.c_fc, mlp.c_proj])
        from transformers.pytorch_utils import Conv1D

        if not isinstance(mlp.c_fc, Conv1D) or not isinstance(mlp.c_proj, Conv1D):
            raise OpError(
                f"from_gpt2 needs c_fc and c_proj to be transformers Conv1D, got "
                f"{type(mlp.c_fc).__name__} and {type(mlp.c_proj).__name__}"
            )
        return cls._wrap(mlp.c_fc, mlp.c_proj, mlp.act, mlp.dropout.p, True, mlp.training)

    @classmethod
    def from_match(cls, match) -> "FusedMLP":
        """A GPT-2 style MLP (``c_fc -> act -> c_proj -> dropout``) replaced as a whole, or a matched
        ``fc_out(gelu(fc_in(x)))`` of two Linears (a flattened GPT-NeoX or BERT layer; the GELU
        from the pattern's ``approximate`` tag)."""
        if match.subgraphs:
            linears = [match.module.get_submodule(n.target) for n in match.nodes if n.op == "call_module"
                       and isinstance(match.module.get_submodule(n.target), nn.Linear)]
            if len(linears) != 2 or "approximate" not in match.tags:
                raise OpError(f"fused_mlp: a match needs two Linears around a GELU, found {len(linears)} Linears")
            fc_in, fc_out = linears  # graph order: fc_out consumes what fc_in made
            return cls._wrap(fc_in, fc_out, nn.GELU(approximate=match.tags["approximate"]), 0.0, False,
                             fc_in.training)
        module = whole_module(match, "fused_mlp")
        if not all(hasattr(module, name) for name in ("c_fc", "c_proj", "act", "dropout")):
            raise OpError(f"fused_mlp replaces a GPT-2 style MLP with c_fc, act, c_proj and dropout; "
                          f"{path_of(match)} is a {type(module).__name__}")
        return cls.from_gpt2(module)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device_type = hidden_states.device.type
        tensors = autocast_inputs(
            device_type, hidden_states.reshape(-1, hidden_states.shape[-1]),
            self.fc_in.weight, self.fc_in.bias, self.fc_out.weight, self.fc_out.bias,
        )
        with autocast_off(device_type):
            out = _RecomputingMLP.apply(*tensors, self.approximate, self.conv1d_layout)
        out = out.view(*hidden_states.shape[:-1], out.shape[-1])
        return fast_dropout(out, self.dropout_p, self.training)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, dropout_p={self.dropout_p}, conv1d_layout={self.conv1d_layout}"
