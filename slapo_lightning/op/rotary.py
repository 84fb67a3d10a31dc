"""Rotary position embedding applied to q and k, as Hugging Face's ``apply_rotary_pos_emb``.

HF computes ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``; for partial
rotary (GPT-NeoX, Phi's ``partial_rotary_factor``) only the first ``cos.shape[-1]`` channels of
each head rotate and the rest pass through. Eagerly that is six elementwise kernels with four
full-size temporaries forward, as many backward.

On CUDA this op is one autograd Function whose forward (the rotation) and backward (the
transposed rotation, ``g * cos - rotate_half(g * sin)``) each go through torch.compile: one kernel
each, saving only cos and sin (and q/k only when cos/sin themselves need gradients). On CPU the
same formula runs under plain autograd, which measured as fast as the Function there (the Function
added 8% at 4 x 64 heads x 256 tokens) and saves the same: cos and sin. Both paths are bitwise
HF's result, forward and backward (the formula is HF's, and ``a - (-b)`` is ``a + b`` exactly).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import OpError
from .compiled import compiled_on_cuda
from .matching import Built, literal
from .registry import register_op


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    x_rot = x[..., :rotary]
    out = x_rot * cos + _rotate_half(x_rot) * sin
    return out if rotary == x.shape[-1] else torch.cat([out, x[..., rotary:]], dim=-1)


def _rotate_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of ``_rotate`` with respect to ``x``: the transposed rotation."""
    rotary = cos.shape[-1]
    g_rot = grad[..., :rotary]
    out = g_rot * cos - _rotate_half(g_rot * sin)
    return out if rotary == grad.shape[-1] else torch.cat([out, grad[..., rotary:]], dim=-1)


_rotate_kernel = compiled_on_cuda(_rotate)
_rotate_back_kernel = compiled_on_cuda(_rotate_back)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        table_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if table_grads else None)
        ctx.x_dtype = x.dtype
        return _rotate_kernel(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, x = ctx.saved_tensors
        need_x, need_cos, need_sin = ctx.needs_input_grad
        grad_x = _rotate_back_kernel(grad, cos, sin).to(ctx.x_dtype) if need_x else None
        grad_cos = grad_sin = None
        if need_cos or need_sin:
            rotary = cos.shape[-1]
            g, x_rot = grad[..., :rotary], x[..., :rotary]
            grad_cos = (g * x_rot).sum_to_size(cos.shape).to(cos.dtype) if need_cos else None
            grad_sin = (g * _rotate_half(x_rot)).sum_to_size(sin.shape).to(sin.dtype) if need_sin else None
        return grad_x, grad_cos, grad_sin


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    if cos.shape != sin.shape:
        raise OpError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > head_dim or rotary == 0:
        raise OpError(
            f"rotary dimension (cos.shape[-1]) must be even and at most the head dimension {head_dim}, got {rotary}"
        )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on the first ``cos.shape[-1]`` channels of ``x``'s last
    dimension, the rest passed through; ``cos``/``sin`` already broadcastable to ``x``. ``fused``:
    the autograd Function (default: on CUDA only, see the module docstring)."""
    _check_tables(cos, sin, x.shape[-1])
    if fused is None:
        fused = x.device.type == "cuda"
    return _RotaryFunction.apply(x, cos, sin) if fused else _rotate(x, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
         fused: bool | None = None):
    """``(q_embed, k_embed)`` exactly as HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``,
    full or partial rotary (GPT-NeoX/Phi) alike: the rotary width is ``cos.shape[-1]``."""
    _check_tables(cos, sin, min(q.shape[-1], k.shape[-1]))
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return rotate(q, cos, sin, fused), rotate(k, cos, sin, fused)


@register_op("rope")
class FusedRoPE(nn.Module):
    """``forward(q, k, cos, sin, unsqueeze_dim=1)`` = HF's ``apply_rotary_pos_emb``; no parameters
    (cos and sin come from the model's rotary embedding module, unchanged)."""

    @classmethod
    def from_match(cls, match) -> "FusedRoPE":
        """No hyper-parameters to read (the rotary width comes with cos/sin at run time); a match
        passes on the dimension it unsqueezed cos/sin at."""
        if "unsqueeze_dim" not in match.values:
            return cls()
        return Built(cls(), concrete_args={"unsqueeze_dim": int(literal(match, "unsqueeze_dim", "rope"))})

    def forward(self, q, k, cos, sin, unsqueeze_dim: int = 1):
        return rope(q, k, cos, sin, unsqueeze_dim)
