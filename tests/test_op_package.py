"""The op package's public surface, and that the ops compile inside a user's torch.compile region."""
from __future__ import annotations

import torch

import slapo_lightning.op as op
from slapo_lightning.op import (
    FlashAttentionOp,
    FusedBiasDropoutAddLayerNorm,
    FusedBiasGELU,
    FusedMLP,
    FusedQKV,
    GatedMLP,
    RMSNorm,
    fused_linear_cross_entropy,
    rope,
)


def test_exports_and_registry():
    for name in (
        "attention", "FlashAttentionOp", "FusedQKV", "LinearWithSeparateBias", "FusedBiasGELU",
        "FusedBiasDropoutAddLayerNorm", "FusedMLP", "FusedLinearCrossEntropy", "FastDropout", "OPS", "register_op",
        "list_ops", "RMSNorm", "rms_norm", "GatedMLP", "FusedRoPE", "rope",
    ):
        assert hasattr(op, name), name
    assert op.attention.FlashAttentionOp is FlashAttentionOp
    names = op.list_ops()
    assert names == sorted(names)
    assert {
        "fast_dropout", "flash_attention", "fused_bias_dropout_add_layer_norm", "fused_bias_gelu", "fused_linear_cross_entropy",
        "fused_mlp", "fused_qkv", "linear_with_separate_bias", "rms_norm", "gated_mlp", "rope",
    } <= set(names)


def test_ops_compile_without_graph_breaks():
    """A block built from every op traces as one graph (fullgraph=True) and computes what eager does."""
    torch.manual_seed(0)
    qkv, attn = FusedQKV(16, 4, head_layout=True), FlashAttentionOp(apply_causal_mask=True)
    mlp, gelu = FusedMLP(16, 64), FusedBiasGELU("tanh")
    norm = FusedBiasDropoutAddLayerNorm(16, p=0.0)
    lm_head = torch.randn(50, 16, requires_grad=True)

    def block(x, labels, mask):
        q, k, v = qkv(x)
        h = norm(attn(q, k, v, mask).transpose(1, 2).reshape(x.shape), None, x)
        h = norm(mlp(h), None, h) + gelu(h, None)
        return fused_linear_cross_entropy(h, lm_head, labels, chunk_size=3)

    x = torch.randn(2, 5, 16, requires_grad=True)
    labels, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    got, want = compiled(x, labels, mask), block(x, labels, mask)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [x, lm_head]), torch.autograd.grad(want, [x, lm_head])):
        torch.testing.assert_close(g, w)


def test_decoder_ops_compile_without_graph_breaks():
    """A Llama-style block from the decoder ops (RMSNorm, GQA-width FusedQKV, RoPE, grouped-query
    attention, gated MLP, soft-capped CE) traces as one graph and computes what eager does."""
    torch.manual_seed(0)
    norm, qkv = RMSNorm(16), FusedQKV(16, 4, n_kv_heads=2, head_layout=True)
    attn, mlp = FlashAttentionOp(apply_causal_mask=True), GatedMLP(16, 40, activation="gelu_tanh", chunked=True)
    lm_head = torch.randn(50, 16, requires_grad=True)
    cos, sin = torch.randn(2, 5, 4), torch.randn(2, 5, 4)

    def block(x, labels):
        q, k, v = qkv(norm(x))
        q, k = rope(q, k, cos, sin)
        h = x + attn(q, k, v).transpose(1, 2).reshape(x.shape)
        h = h + mlp(norm(h))
        return fused_linear_cross_entropy(h, lm_head, labels, chunk_size=3, softcap=3.0)

    x = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 5))
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    got, want = compiled(x, labels), block(x, labels)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [x, lm_head]), torch.autograd.grad(want, [x, lm_head])):
        torch.testing.assert_close(g, w)
