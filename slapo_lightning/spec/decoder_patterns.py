"""Patterns of today's decoder layers (transformers 5.x, as a flattened trace records them):
RMSNorm in its variants, the gated MLP (separate or chunked gate/up, SiLU or GELU), the plain
GELU MLP and rotary embeddings (full or partial). They match computations, not classes: whichever model writes the
same dataflow gets the op, and a model that writes something else keeps its code. The variants'
tags tell each op's ``from_match`` what it matched (offset and cast order, activation)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .patterns import Variant, register_pattern

# -- RMSNorm ------------------------------------------------------------------------------------------


def _normalised(h, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_cast_before_weight(x, weight, eps, dtype):
    """``w * x̂.to(dtype)`` (LlamaRMSNorm; Mistral, Qwen2/3 and their q/k head norms, Phi-3)."""
    return weight * _normalised(x.to(torch.float32), eps).to(dtype)


def rms_norm_cast_after_weight(x, weight, eps, dtype):
    """``(w * x̂).to(dtype)`` (OLMo2, also its q/k norms)."""
    return (weight * _normalised(x.to(torch.float32), eps)).to(dtype)


def rms_norm_offset(x, weight, eps):
    """``(x̂ * (1 + w)).type_as(x)`` in float32 (Gemma, Gemma2)."""
    return (_normalised(x.float(), eps) * (1.0 + weight.float())).type_as(x)


register_pattern(
    "rms_norm",
    Variant(rms_norm_cast_before_weight, {"offset": 0.0, "cast": "before_weight"}),
    Variant(rms_norm_cast_after_weight, {"offset": 0.0, "cast": "after_weight"}),
    Variant(rms_norm_offset, {"offset": 1.0, "cast": "after_weight"}),
    doc="RMSNorm x * rsqrt(mean(x^2) + eps) scaled by w or (1 + w), cast back before or after the scale.",
)

# -- gated MLP ----------------------------------------------------------------------------------------

ACTIVATIONS = {
    "silu": lambda h: F.silu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "gelu": lambda h: F.gelu(h),
}
"""Activation name (``GatedMLP``'s) -> how the model calls it; a module call matches its function."""


def _linear(x):
    """Any ``nn.Linear`` called on ``x`` (in a pattern, ``F.linear`` matches the module call)."""
    return F.linear(x, x)  # matched on its input alone: the module holds the weight


def _gated_variant(activation: str, chunked: bool, act_first: bool) -> Variant:
    act = ACTIVATIONS[activation]

    def gated_mlp(x):
        if chunked:
            gate, up = _linear(x).chunk(2, dim=-1)
            gated = act(gate)
        else:
            gated = act(_linear(x))
            up = _linear(x)
        return _linear(gated * up if act_first else up * gated)

    gated_mlp.__name__ = f"gated_mlp_{activation}{'_chunked' if chunked else ''}{'' if act_first else '_up_first'}"
    return Variant(gated_mlp, {"activation": activation, "chunked": chunked})


register_pattern(
    "gated_mlp",
    *(_gated_variant(a, c, f) for a, c, f in itertools.product(ACTIVATIONS, (False, True), (True, False))),
    doc="down(act(gate(x)) * up(x)) with SiLU or GELU, separate gate/up Linears or one chunked gate_up "
        "(Phi-3), either operand order.",
)

# -- plain GELU MLP ----------------------------------------------------------------------------------


def gelu_mlp(x):
    """fc_out(gelu(fc_in(x))) of two Linears (GPT-NeoX; BERT's intermediate and output dense)."""
    return _linear(F.gelu(_linear(x)))


def gelu_tanh_mlp(x):
    return _linear(F.gelu(_linear(x), approximate="tanh"))


register_pattern("gelu_mlp", Variant(gelu_mlp, {"approximate": "none"}), Variant(gelu_tanh_mlp, {"approximate": "tanh"}),
                 doc="Two Linears around a GELU (erf or tanh): the op recomputes the GELU in backward.")

# -- rotary position embedding -------------------------------------------------------------------------


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(q, k, cos, sin, unsqueeze_dim):
    """HF's ``apply_rotary_pos_emb``: q * cos + rotate_half(q) * sin, and the same for k."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def partial_rope(q, k, cos, sin, unsqueeze_dim):
    """Partial rotary (GPT-NeoX's ``rotary_pct``, Phi's ``partial_rotary_factor``): the first
    ``cos.shape[-1]`` channels rotate, the rest pass through."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k_embed = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q_embed, k_embed


register_pattern("rope", Variant(partial_rope, {"partial": True}), Variant(rope, {"partial": False}),
                 doc="Rotary embedding of q and k, full or partial (partial first: it contains the full form).")
