"""Factories that build the op library's modules from a match, keeping the model's weights and
hyper-parameters (read from the replaced modules and the matched graph, never guessed)."""
from __future__ import annotations

import numbers
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..op import (FastDropout, FlashAttentionOp, FusedBiasDropoutAddLayerNorm, FusedBiasGELU, FusedLinearCrossEntropy,
                  FusedMLP, FusedQKV, LinearWithSeparateBias)
from ..errors import OpError
from ..op.fused import gelu_approximate_for
from ..core.tracer import train_only_probability
from .builtin_patterns import DROPOUT_TARGETS
from .ops import Built, Match, register_op_factory

AUTO = "auto"


def _literal(match: Match, name: str, what: str) -> Any:
    value = match.values.get(name)
    if isinstance(value, fx.Node) or value is None:
        raise OpError(f"{what}: the matched {name!r} is computed at run time ({value}), expected a constant")
    return value


def _dropout_probability(match: Match) -> float:
    """The dropout probability inside the match (a module's ``p`` or a functional call's literal)."""
    for node in match.nodes:
        if node.op == "call_module":
            module = match.module.get_submodule(node.target)
            if isinstance(module, nn.Dropout):
                return float(module.p)
        elif node.op == "call_function" and node.target in DROPOUT_TARGETS:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            if isinstance(p, numbers.Number):
                return float(p)
    p = match.values.get("dropout_p", 0.0)
    if isinstance(p, fx.Node) and p.target is train_only_probability:
        p = p.args[0]
    if not isinstance(p, numbers.Number):
        raise OpError(f"cannot read the dropout probability of the match (found {p!r})")
    return float(p)


@register_op_factory("fused_qkv")
def fused_qkv(match: Match, n_heads: int | None = None) -> FusedQKV:
    """One GEMM for the three q/k/v Linears of the match, initialised from their weights."""
    linears = match.called_modules(nn.Linear)
    if len(linears) != 3:
        raise OpError(f"fused_qkv replaces three Linears (q, k, v), the match calls {len(linears)}")
    n_heads = n_heads or match.config("num_attention_heads", "n_head")
    if n_heads is None:
        raise OpError("fused_qkv: pass n_heads (the model has no config.num_attention_heads)")
    return FusedQKV.from_linears(*linears, n_heads=int(n_heads))


@register_op_factory("flash_attention")
def flash_attention(match: Match, backend: str = AUTO, causal: bool | str = AUTO, strict: bool = False) -> Built:
    """FlashAttentionOp with the match's scale, dropout probability, mask and causality.

    ``causal="auto"`` keeps what the model does: the ``is_causal`` flag of an sdpa call (HF sets
    it when no mask tensor is needed), and no extra mask for eager attention, whose additive mask
    already holds causality. ``True``/``False`` force it.
    """
    if causal not in (AUTO, True, False):
        raise OpError(f"flash_attention: causal must be 'auto', true or false, got {causal!r}")
    if not match.subgraphs:
        return Built(FlashAttentionOp(backend, apply_causal_mask=causal is True, strict=strict))
    values = match.values
    if match.tags.get("scale") == "div":
        scale = 1.0 / float(_literal(match, "d", "flash_attention"))
    else:
        scale = float(_literal(match, "scale", "flash_attention"))
    if causal == AUTO:
        causal = values.get("is_causal", False)
        if not isinstance(causal, bool):
            raise OpError(f"flash_attention: is_causal is decided at run time ({causal}); set causal to true or false")
    op = FlashAttentionOp(backend, apply_causal_mask=causal, scale=scale, strict=strict)
    inputs = ("q", "k", "v") + (("attention_mask",) if isinstance(values.get("attention_mask"), fx.Node) else ())
    return Built(op, concrete_args={"p": _dropout_probability(match)}, inputs=inputs)


def _activation_approximate(match: Match) -> str:
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


@register_op_factory("fused_bias_gelu")
def fused_bias_gelu(match: Match, approximate: str = AUTO) -> FusedBiasGELU:
    """gelu(x + bias) with the GELU variant the model uses (erf or tanh)."""
    if approximate == AUTO:
        tagged = match.tags.get("approximate", "from_node")
        approximate = _activation_approximate(match) if tagged == "from_node" else tagged
    return FusedBiasGELU(approximate)


@register_op_factory("fused_bias_dropout_add_layer_norm")
def fused_bias_dropout_add_layer_norm(match: Match, p: float | str = AUTO) -> FusedBiasDropoutAddLayerNorm:
    """Takes over the matched LayerNorm's own Parameters and the matched dropout's probability."""
    norms = match.called_modules(nn.LayerNorm)
    if len(norms) != 1:
        raise OpError(f"fused_bias_dropout_add_layer_norm needs one LayerNorm module in the match, found {len(norms)}")
    return FusedBiasDropoutAddLayerNorm.from_layer_norm(norms[0], p=_dropout_probability(match) if p == AUTO else p)


def _whole_module(match: Match, op: str) -> nn.Module:
    if match.subgraphs:
        raise OpError(f"{op} replaces a whole module: use the replace step without a pattern")
    return match.module


@register_op_factory("fused_mlp")
def fused_mlp(match: Match) -> FusedMLP:
    """A GPT-2 style MLP (``c_fc -> act -> c_proj -> dropout``) reusing its Conv1D Parameters."""
    module = _whole_module(match, "fused_mlp")
    if not all(hasattr(module, name) for name in ("c_fc", "c_proj", "act", "dropout")):
        raise OpError(f"fused_mlp replaces a GPT-2 style MLP with c_fc, act, c_proj and dropout; "
                      f"{match.sch.path or '<root>'} is a {type(module).__name__}")
    return FusedMLP.from_gpt2(module)


@register_op_factory("fused_linear_cross_entropy")
def fused_linear_cross_entropy(match: Match, ignore_index: int = -100, chunk_size: int | None = None):
    """Chunked LM head + cross-entropy for a module with ``forward(hidden_states, weight, labels, bias=None)``."""
    _whole_module(match, "fused_linear_cross_entropy")
    return FusedLinearCrossEntropy(ignore_index=ignore_index, chunk_size=chunk_size)


@register_op_factory("linear_with_separate_bias")
def linear_with_separate_bias(match: Match) -> LinearWithSeparateBias:
    """The replaced ``nn.Linear`` with its bias add as a separate op (same Parameters)."""
    module = _whole_module(match, "linear_with_separate_bias")
    if type(module) is not nn.Linear:
        raise OpError(f"linear_with_separate_bias replaces an nn.Linear, got {type(module).__name__}")
    return LinearWithSeparateBias.from_linear(module)


@register_op_factory("fast_dropout")
def fast_dropout(match: Match) -> FastDropout:
    """The replaced ``nn.Dropout``'s probability, 16-bit keep masks on CPU."""
    module = _whole_module(match, "fast_dropout")
    if not isinstance(module, nn.Dropout):
        raise OpError(f"fast_dropout replaces an nn.Dropout, got {type(module).__name__} at {match.sch.path or '<root>'}")
    return FastDropout.from_dropout(module)
