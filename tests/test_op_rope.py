"""FusedRoPE against Hugging Face's apply_rotary_pos_emb: Llama's full rotary, GPT-NeoX's and
Phi-3's partial rotary, with cos/sin from the models' own rotary embedding modules (CPU), on both
paths (plain autograd, CPU's default, and the fused Function CUDA uses). Outputs and gradients are
bitwise equal in float32 and bfloat16; gradients for cos/sin (when they require them) to atol/rtol
1e-5 in float32."""
from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.llama import modeling_llama as llama
from transformers.models.phi3 import modeling_phi3 as phi3

from slapo_lightning.op import OPS, FusedRoPE, OpError, rope

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 5, 4, 2, 16
HIDDEN = HEADS * HEAD_DIM

CASES = {
    "llama_full": (llama, lambda: llama.LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))),
    "neox_quarter": (neox, lambda: neox.GPTNeoXRotaryEmbedding(
        GPTNeoXConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, rotary_pct=0.25))),
    "phi3_half": (phi3, lambda: phi3.Phi3RotaryEmbedding(
        Phi3Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, partial_rotary_factor=0.5))),
}
ROTARY = {"llama_full": HEAD_DIM, "neox_quarter": HEAD_DIM // 4, "phi3_half": HEAD_DIM // 2}


def qk_and_tables(case, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    cos, sin = CASES[case][1]()(q.transpose(1, 2), positions)
    return q, k, cos, sin


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_bitwise_equal_to_hugging_face(case, dtype, fused):
    q, k, cos, sin = qk_and_tables(case, dtype)
    assert cos.shape[-1] == ROTARY[case]
    got = rope(q, k, cos, sin, fused=fused)
    want = CASES[case][0].apply_rotary_pos_emb(q, k, cos, sin)
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(t.shape, generator=gen).to(dtype) for t in want]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    got_grads = torch.autograd.grad(got, [q, k], upstream)
    want_grads = torch.autograd.grad(want, [q, k], upstream)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("fused", [False, True])
def test_seq_heads_layout_with_unsqueeze_dim_2(fused):
    q, k, cos, sin = qk_and_tables("phi3_half", torch.float32)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    got = rope(q, k, cos, sin, unsqueeze_dim=2, fused=fused)
    for g, w in zip(got, phi3.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("fused", [False, True])
def test_saves_only_cos_and_sin(fused):
    q, k, cos, sin = qk_and_tables("neox_quarter", torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rope(q, k, cos, sin, fused=fused)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}


def test_cpu_default_is_plain_autograd_and_cuda_default_the_function():
    q, k, cos, sin = qk_and_tables("llama_full", torch.float32)
    assert type(rope(q, k, cos, sin)[0].grad_fn).__name__ != "_RotaryFunctionBackward"
    assert type(rope(q, k, cos, sin, fused=True)[0].grad_fn).__name__ == "_RotaryFunctionBackward"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", ["llama_full", "neox_quarter"])
def test_gradients_for_cos_and_sin_when_they_require_them(case, fused):
    q, k, cos, sin = qk_and_tables(case, torch.float32)
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    tensors = [q, k, cos, sin]
    got = sum((t * (i + 1)).sum() for i, t in enumerate(rope(q, k, cos, sin, fused=fused)))
    want = sum((t * (i + 1)).sum() for i, t in enumerate(CASES[case][0].apply_rotary_pos_emb(q, k, cos, sin)))
    for g, w in zip(torch.autograd.grad(got, tensors), torch.autograd.grad(want, tensors)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bad_tables():
    q, k, cos, sin = qk_and_tables("llama_full", torch.float32)
    with pytest.raises(OpError, match=r"same shape, got \(2, 5, 16\) and \(2, 5, 8\)"):
        rope(q, k, cos, sin[..., :8])
    with pytest.raises(OpError, match="must be even and at most the head dimension 16, got 7"):
        rope(q, k, cos[..., :7], sin[..., :7])
    wide = torch.cat([cos, cos], dim=-1)
    with pytest.raises(OpError, match="got 32"):
        rope(q, k, wide, wide)


def test_registered_as_rope():
    assert OPS.get("rope") is FusedRoPE
