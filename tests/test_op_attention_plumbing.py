"""The flash_attn and xformers backends' own code (layouts, unpadding, cu_seqlens, bias alignment),
run on CPU against stand-in kernels that compute plain attention with each package's calling
convention. The real kernels are covered by the GPU tests."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from slapo_lightning.op import FlashAttentionOp
from slapo_lightning.op.attention_backends import ATTENTION_BACKENDS

from test_op_attention import ATOL, BATCH, MASKS, SEQ, padding_bool, qkv, reference, to_additive


def _attend(q, k, v, scale, causal, bias=None):
    """q: (..., s_q, d) etc.; bottom-right causal like both packages."""
    scores = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    if causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(s_k - s_q + 1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.dim() == 4 and q.stride(-1) == 1 and dropout_p == 0.0
    out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, causal)
    return out.transpose(1, 2)


def fake_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32 and dropout_p == 0.0
    assert k.shape[0] == cu_k[-1] and q.shape[0] == cu_q[-1]
    pieces = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        assert qi.shape[0] <= max_q and ki.shape[0] <= max_k
        pieces.append(_attend(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), softmax_scale, causal).transpose(0, 1))
    return torch.cat(pieces)


class FakeLowerTriangularFromBottomRightMask:
    pass


def fake_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    assert q.dim() == 4 and p == 0.0
    causal = isinstance(attn_bias, FakeLowerTriangularFromBottomRightMask)
    bias = attn_bias if isinstance(attn_bias, torch.Tensor) else None
    if bias is not None:
        assert bias.dtype == q.dtype and bias.stride(-2) % 8 == 0, "xformers needs aligned bias rows"
    out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal, bias)
    return out.transpose(1, 2)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-in flash_attn and xformers packages; both backends allowed on CPU float32."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = fake_flash_attn_func
    flash.flash_attn_varlen_func = fake_flash_attn_varlen_func
    xformers, ops, fmha, attn_bias = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha", "xformers.ops.fmha.attn_bias"))
    ops.memory_efficient_attention = fake_memory_efficient_attention
    attn_bias.LowerTriangularFromBottomRightMask = FakeLowerTriangularFromBottomRightMask
    xformers.ops, ops.fmha, fmha.attn_bias = ops, fmha, attn_bias
    for module in (flash, xformers, ops, fmha, attn_bias):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in ("flash_attn", "xformers"):
        backend = ATTENTION_BACKENDS.get(name)
        monkeypatch.setattr(backend, "installed", lambda: True)
        monkeypatch.setattr(backend, "devices", ("cpu",))
        monkeypatch.setattr(backend, "dtypes", (torch.float32,))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "padding_bool", "padding_additive"])
def test_flash_attn_plumbing(fake_kernels, mask_kind, causal):
    q, k, v = qkv()
    mask = MASKS[mask_kind]()
    op = FlashAttentionOp("flash_attn", apply_causal_mask=causal, strict=True)
    if mask is not None and causal:
        with pytest.raises(Exception, match="cannot combine a mask with the causal flag"):
            op(q, k, v, attention_mask=mask)
        return
    out = op(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, mask, causal), atol=ATOL, rtol=1e-5)
    torch.autograd.grad(out.sum(), [q, k, v])


def test_flash_attn_padding_with_shorter_queries(fake_kernels):
    q, k, v = qkv(q_len=3)
    mask = padding_bool()
    mask[0, ..., :2] = False
    out = FlashAttentionOp("triton", strict=True)(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=ATOL, rtol=1e-5)


def test_auto_prefers_flash_attn_and_leaves_it_other_masks(fake_kernels):
    q, _, _ = qkv()
    op = FlashAttentionOp()
    assert op.select_backend(q, padding_bool(), 0.0).name == "flash_attn"
    assert op.select_backend(q, MASKS["full_bool"](), 0.0).name == "sdpa"
    assert op.select_backend(q, torch.randn(BATCH, 1, 1, SEQ), 0.0).name == "sdpa"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_xformers_plumbing(fake_kernels, mask_kind, causal):
    q, k, v = qkv()
    mask = MASKS[mask_kind]()
    out = FlashAttentionOp("cutlass", apply_causal_mask=causal, strict=True)(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, mask, causal), atol=ATOL, rtol=1e-5)


def test_xformers_causal_with_shorter_queries(fake_kernels):
    q, k, v = qkv(q_len=3)
    out = FlashAttentionOp("native_xformers", apply_causal_mask=True, strict=True)(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, causal=True), atol=ATOL, rtol=1e-5)
    mask = to_additive(padding_bool())
    out = FlashAttentionOp("xformers", apply_causal_mask=True, strict=True)(q, k, v, attention_mask=mask)
    torch.testing.assert_close(out, reference(q, k, v, mask, causal=True), atol=ATOL, rtol=1e-5)
