"""Rotary position embedding applied to q and k, as Hugging Face's ``apply_rotary_pos_emb``.

HF computes ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``: a negated
copy, a concatenated copy, three full-size products/sums, and for partial rotary (GPT-NeoX, Phi's
``partial_rotary_factor``: only the first ``cos.shape[-1]`` channels of each head rotate) two
slices and one more concatenation. Here each half is computed directly,
``(x1 c1 - x2 s1, x2 c2 + x1 s2)``, which is bitwise HF's result (negation and ``a + (-b)`` are
exact), with one concatenation and no saved activations: backward is the transposed rotation and
needs only cos and sin (q and k are kept only when cos/sin themselves need gradients). On CUDA the
rotation and its transpose go through torch.compile (one kernel each).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import OpError
from .compiled import compiled_on_cuda
from .registry import register_op


def _halves(t: torch.Tensor):
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


@compiled_on_cuda
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    x1, x2 = _halves(x[..., :rotary])
    (c1, c2), (s1, s2) = _halves(cos), _halves(sin)
    parts = [x1 * c1 - x2 * s1, x2 * c2 + x1 * s2]
    if rotary < x.shape[-1]:
        parts.append(x[..., rotary:])
    return torch.cat(parts, dim=-1)


@compiled_on_cuda
def _rotate_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of ``_rotate`` with respect to ``x``: the transposed rotation."""
    rotary = cos.shape[-1]
    g1, g2 = _halves(grad[..., :rotary])
    (c1, c2), (s1, s2) = _halves(cos), _halves(sin)
    parts = [g1 * c1 + g2 * s2, g2 * c2 - g1 * s1]
    if rotary < grad.shape[-1]:
        parts.append(grad[..., rotary:])
    return torch.cat(parts, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = _halves(x)
    return torch.cat([-x2, x1], dim=-1)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        table_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if table_grads else None)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, x = ctx.saved_tensors
        need_x, need_cos, need_sin = ctx.needs_input_grad
        grad_x = _rotate_back(grad, cos, sin).to(ctx.x_dtype) if need_x else None
        grad_cos = grad_sin = None
        if need_cos or need_sin:
            rotary = cos.shape[-1]
            g, xr = grad[..., :rotary], x[..., :rotary]
            grad_cos = (g * xr).sum_to_size(cos.shape).to(cos.dtype) if need_cos else None
            grad_sin = (g * _rotate_half(xr)).sum_to_size(sin.shape).to(sin.dtype) if need_sin else None
        return grad_x, grad_cos, grad_sin


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    if cos.shape != sin.shape:
        raise OpError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > head_dim or rotary == 0:
        raise OpError(
            f"rotary dimension (cos.shape[-1]) must be even and at most the head dimension {head_dim}, got {rotary}"
        )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on the first ``cos.shape[-1]`` channels of ``x``'s last
    dimension, the rest passed through; ``cos``/``sin`` already broadcastable to ``x``."""
    _check_tables(cos, sin, x.shape[-1])
    return _RotaryFunction.apply(x, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """``(q_embed, k_embed)`` exactly as HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``,
    full or partial rotary (GPT-NeoX/Phi) alike: the rotary width is ``cos.shape[-1]``."""
    _check_tables(cos, sin, min(q.shape[-1], k.shape[-1]))
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _RotaryFunction.apply(q, cos, sin), _RotaryFunction.apply(k, cos, sin)


@register_op("rope")
class FusedRoPE(nn.Module):
    """``forward(q, k, cos, sin, unsqueeze_dim=1)`` = HF's ``apply_rotary_pos_emb``; no parameters
    (cos and sin come from the model's rotary embedding module, unchanged)."""

    def forward(self, q, k, cos, sin, unsqueeze_dim: int = 1):
        return rope(q, k, cos, sin, unsqueeze_dim)
