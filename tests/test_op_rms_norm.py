"""RMSNorm against the Hugging Face modules it replaces (CPU). Forward is bitwise equal in float32
and bfloat16; gradients to atol/rtol 1e-5 in float32. In bfloat16 the input gradient agrees to
1.6e-2 (about one bf16 ulp of values near 2); the weight gradient is a sum over tokens, which the
module rounds to bf16 term by term and the op accumulates in float32, so it agrees within
2^-7 of the sum of the terms' magnitudes (two bf16 roundings of each term)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from slapo_lightning.op import OPS, OpError, RMSNorm, rms_norm

HIDDEN = 24
FP32 = dict(atol=1e-5, rtol=1e-5)
BF16_X = dict(atol=1.6e-2, rtol=1.6e-2)

# module class -> (offset, cast) it computes
NORMS = {
    LlamaRMSNorm: (0.0, "before_weight"),
    Qwen3RMSNorm: (0.0, "before_weight"),
    GemmaRMSNorm: (1.0, "after_weight"),
    Olmo2RMSNorm: (0.0, "after_weight"),
}


def hf_norm(cls, size=HIDDEN, eps=1e-5, dtype=torch.float32):
    torch.manual_seed(0)
    norm = cls(size, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size) * 0.5 + (0.0 if cls is GemmaRMSNorm else 1.0))
    return norm.to(dtype)


def inputs(shape=(2, 5, HIDDEN), dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2).to(dtype).requires_grad_()


def grads(out, tensors, seed=2):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, tensors, upstream)


def compare(norm, x):
    op = RMSNorm.from_module(norm)
    got, want = op(x), norm(x)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    low = torch.bfloat16 in (x.dtype, norm.weight.dtype)
    grad_x, grad_w = grads(got, [x, norm.weight])
    want_x, want_w = grads(want, [x, norm.weight])
    torch.testing.assert_close(grad_x, want_x, **(BF16_X if low else FP32))
    if not low:
        torch.testing.assert_close(grad_w, want_w, **FP32)
        return
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    normed = x.detach().float() * torch.rsqrt(x.detach().float().pow(2).mean(-1, keepdim=True) + op.eps)
    magnitude = (upstream * normed).abs().reshape(-1, normed.shape[-1]).sum(0)
    assert torch.all((grad_w.float() - want_w.float()).abs() <= magnitude * 2**-7)


@pytest.mark.parametrize("cls", list(NORMS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hugging_face_norms(cls, dtype):
    norm = hf_norm(cls, dtype=dtype)
    compare(norm, inputs(dtype=dtype))


@pytest.mark.parametrize("cls", list(NORMS), ids=lambda c: c.__name__)
def test_float32_weight_with_bfloat16_inputs(cls):
    """Mixed dtypes follow the module's type promotion: Llama returns float32 here, Gemma bf16."""
    compare(hf_norm(cls), inputs(dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_head_dim_norm_on_four_dimensional_heads(dtype):
    """Qwen3 normalises each head: q_norm(q_proj(x).view(batch, seq, heads, head_dim))."""
    head_dim = 8
    norm = hf_norm(Qwen3RMSNorm, size=head_dim, eps=1e-6, dtype=dtype)
    compare(norm, inputs(shape=(2, 5, 3, head_dim), dtype=dtype))


@pytest.mark.parametrize("cls", list(NORMS), ids=lambda c: c.__name__)
def test_from_module_reads_variant_and_eps_and_keeps_the_parameter(cls):
    norm = hf_norm(cls, eps=3e-4).eval()
    op = RMSNorm.from_module(norm)
    assert (op.offset, op.cast) == NORMS[cls]
    assert op.eps == 3e-4 and op.weight is norm.weight and not op.training
    assert list(op.state_dict()) == list(norm.state_dict()) == ["weight"]


def test_backward_saves_the_input_and_one_number_per_row():
    norm = hf_norm(LlamaRMSNorm)
    x = inputs(dtype=torch.bfloat16)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(id(t), t), lambda t: t):
        RMSNorm.from_module(norm)(x)
    rows = x.numel() // HIDDEN
    assert sorted(t.numel() for t in saved.values()) == [rows, HIDDEN, x.numel()]
    assert {t.dtype for t in saved.values() if t.numel() == x.numel()} == {torch.bfloat16}


def test_backward_is_out_of_place_and_repeatable():
    """Backward writes nothing it saved: backward through the same graph again, after a backward
    with another upstream gradient, gives the same gradients, and the input is unchanged."""
    norm = hf_norm(GemmaRMSNorm)
    x = inputs()
    before = x.detach().clone()
    out = RMSNorm.from_module(norm)(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    first = torch.autograd.grad(out, [x, norm.weight], upstream, retain_graph=True)
    other = torch.autograd.grad(out, [x, norm.weight], torch.ones_like(out), retain_graph=True)
    second = torch.autograd.grad(out, [x, norm.weight], upstream)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(other[0], first[0])
    assert torch.equal(x.detach(), before)


def test_fresh_norms_are_identity_scaled_and_without_weight():
    x = inputs()
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMSNorm(HIDDEN)(x), plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(RMSNorm(HIDDEN, offset=1.0, cast="after_weight")(x), plain, atol=1e-6, rtol=1e-6)
    bare = RMSNorm(HIDDEN, elementwise_affine=False)
    assert bare.weight is None and list(bare.state_dict()) == []
    out = bare(x)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads(out, [x])[0], grads(plain, [x])[0], **FP32)


def test_frozen_weight_gets_no_gradient():
    norm = hf_norm(LlamaRMSNorm).requires_grad_(False)
    x = inputs()
    RMSNorm.from_module(norm)(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None


def test_bad_arguments_and_modules():
    with pytest.raises(OpError, match="unknown RMSNorm cast order 'late'; valid: before_weight, after_weight"):
        RMSNorm(HIDDEN, cast="late")
    with pytest.raises(OpError, match=r"weight of shape \(8,\) does not fit inputs of shape \(2, 5, 24\)"):
        rms_norm(inputs(), torch.ones(8))
    with pytest.raises(OpError, match="LayerNorm .* computes none of the RMSNorm variants"):
        RMSNorm.from_module(nn.LayerNorm(HIDDEN, bias=False))
    with pytest.raises(OpError, match=r"found weight shape \(24,\) and \['bias'\]"):
        RMSNorm.from_module(nn.LayerNorm(HIDDEN))
    with pytest.raises(OpError, match="no numeric 'variance_epsilon' or 'eps'"):
        RMSNorm.from_module(nn.Linear(HIDDEN, HIDDEN))


def test_registered_as_rms_norm():
    assert OPS.get("rms_norm") is RMSNorm
