"""The CUDA paths: real flash_attn / xformers / SDPA kernels and the torch.compile'd elementwise
ops, against float32 references. Half-precision tolerances: 2e-2 (outputs) and 5e-2 (gradients)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from slapo_lightning.op import (
    FlashAttentionOp,
    FusedBiasDropoutAddLayerNorm,
    FusedBiasGELU,
    FusedMLP,
    fused_linear_cross_entropy,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
HALF = dict(atol=2e-2, rtol=2e-2)
HALF_GRAD = dict(atol=5e-2, rtol=5e-2)


def installed(package):
    return importlib.util.find_spec(package) is not None


def cuda_qkv(dtype, batch=2, heads=4, seq=64, dim=64):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, seq, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]


def padding(batch=2, seq=64):
    keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device="cuda")
    keep[1, ..., -17:] = False
    return keep


def compare_to_math(backend, dtype, mask, causal):
    q, k, v = cuda_qkv(dtype)
    out = FlashAttentionOp(backend, apply_causal_mask=causal, strict=True)(q, k, v, mask)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    ref = FlashAttentionOp("math", apply_causal_mask=causal)(*ref_inputs, ref_mask)
    torch.testing.assert_close(out.float(), ref, **HALF)
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad(out, [q, k, v], upstream.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, **HALF_GRAD)


MASK_CASES = [(None, False), (None, True), ("padding", False), ("padding", True)]


@pytest.mark.parametrize("mask_kind, causal", MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_on_cuda(dtype, mask_kind, causal):
    compare_to_math("sdpa", dtype, padding() if mask_kind else None, causal)


@pytest.mark.skipif(not installed("flash_attn"), reason="flash-attn not installed")
@pytest.mark.parametrize("mask_kind, causal", MASK_CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_on_cuda(dtype, mask_kind, causal):
    compare_to_math("flash_attn", dtype, padding() if mask_kind else None, causal)


@pytest.mark.skipif(not installed("flash_attn"), reason="flash-attn not installed")
def test_auto_uses_flash_attn_for_padding_and_additive_padding():
    q, _, _ = cuda_qkv(torch.float16)
    op = FlashAttentionOp()
    assert op.select_backend(q, padding(), 0.0).name == "flash_attn"
    additive = torch.zeros(padding().shape, device="cuda", dtype=torch.float16).masked_fill(~padding(), -65504.0)
    assert op.select_backend(q, additive, 0.0).name == "flash_attn"


@pytest.mark.skipif(not installed("xformers"), reason="xformers not installed")
@pytest.mark.parametrize("mask_kind, causal", MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_on_cuda(dtype, mask_kind, causal):
    compare_to_math("cutlass", dtype, padding() if mask_kind else None, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_elementwise_ops_on_cuda(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 128, 256, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(256, device="cuda", dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else HALF
    for approximate in ("none", "tanh"):
        got = FusedBiasGELU(approximate)(x, bias)
        want = F.gelu(x + bias, approximate=approximate)
        torch.testing.assert_close(got, want, **tol)
        for g, w in zip(torch.autograd.grad(got.sum(), [x, bias]), torch.autograd.grad(want.sum(), [x, bias])):
            torch.testing.assert_close(g, w, **(tol if dtype == torch.float32 else HALF_GRAD))
    norm = FusedBiasDropoutAddLayerNorm(256, p=0.1).to("cuda", dtype).eval()
    got = norm(x, bias, residual)
    want = F.layer_norm(x + bias + residual, (256,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(got, want, **tol)
    norm.train()
    assert norm(x, bias, residual).isfinite().all()


def test_mlp_and_cross_entropy_on_cuda_bf16():
    torch.manual_seed(0)
    mlp = FusedMLP(64, 256).cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mlp(x)
    torch.testing.assert_close(out.float(), mlp.fc_out(F.gelu(mlp.fc_in(x))), **HALF)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (4, 32), device="cuda")
    labels[0, :5] = -100
    loss = fused_linear_cross_entropy(x, weight, labels, chunk_size=37)
    want = F.cross_entropy(F.linear(x, weight).view(-1, 1000), labels.view(-1))
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    got = torch.autograd.grad(loss, [x, weight])
    for g, w in zip(got, torch.autograd.grad(want, [x, weight])):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
