"""The CUDA paths of the decoder ops (torch.compile'd RMSNorm, gated MLP gate and RoPE; grouped-query
attention kernels; soft-capped fused CE) against the Hugging Face code they replace, run on CUDA.
float32 to 1e-4 (compiled kernels reorder reductions); bfloat16 to 2e-2 (outputs) and 5e-2
(gradients, relative to their largest entry)."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, Phi3Config
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama import modeling_llama as llama
from transformers.models.phi3.modeling_phi3 import Phi3MLP

from slapo_lightning.op import FlashAttentionOp, FusedRoPE, GatedMLP, RMSNorm, fused_linear_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
FP32 = dict(atol=1e-4, rtol=1e-4)
HALF = dict(atol=2e-2, rtol=2e-2)


def close_relative(got, want, rel=5e-2):
    scale = want.float().abs().max().clamp_min(1e-6)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=rel, rtol=0)


def compare(op, module, x, params, dtype):
    got, want = op(x), module(x)
    torch.testing.assert_close(got, want, **(FP32 if dtype == torch.float32 else HALF))
    upstream = torch.randn_like(want)
    tensors = [x, *params]
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, **FP32)
        else:
            close_relative(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [llama.LlamaRMSNorm, GemmaRMSNorm], ids=lambda c: c.__name__)
def test_rms_norm_on_cuda(cls, dtype):
    torch.manual_seed(0)
    norm = cls(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to("cuda", dtype)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype, requires_grad=True)
    compare(RMSNorm.from_module(norm), norm, x, [norm.weight], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_gated_mlp_on_cuda(kind, dtype):
    torch.manual_seed(0)
    common = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2)
    mlp = llama.LlamaMLP(LlamaConfig(**common)) if kind == "llama" else Phi3MLP(Phi3Config(**common))
    mlp = mlp.to("cuda", dtype)
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype, requires_grad=True)
    compare(GatedMLP.from_module(mlp), mlp, x, list(mlp.parameters()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_cuda(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    rotary = llama.LlamaRotaryEmbedding(config).to("cuda")
    q = torch.randn(2, 8, 64, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 64, 64, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = rotary(q, torch.arange(64, device="cuda")[None].expand(2, 64))
    got, want = FusedRoPE()(q, k, cos, sin), llama.apply_rotary_pos_emb(q, k, cos, sin)
    upstream = [torch.randn_like(w) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(FP32 if dtype == torch.float32 else HALF))
    for g, w in zip(torch.autograd.grad(got, [q, k], upstream), torch.autograd.grad(want, [q, k], upstream)):
        torch.testing.assert_close(g, w, **(FP32 if dtype == torch.float32 else HALF))


class Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("mask_kind", ["none", "padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_on_cuda_never_repeats_kv(dtype, mask_kind):
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, k_len, dim = 2, 8, 2, 48, 64, 64
    q = torch.randn(batch, heads, q_len, dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, k_len, dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, k_len, dim, device="cuda", dtype=dtype, requires_grad=True)
    keep = torch.ones(batch, 1, 1, k_len, dtype=torch.bool, device="cuda")
    keep[1, ..., -9:] = False
    mask = keep if mask_kind == "padding" else None
    with Shapes() as probe:
        got = FlashAttentionOp("sdpa", apply_causal_mask=True, strict=True)(q, k, v, mask)
        got_grads = torch.autograd.grad(got, [q, k, v], torch.ones_like(got))
    assert (batch, heads, k_len, dim) not in probe.shapes
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device="cuda").tril(k_len - q_len) & keep
    additive = torch.zeros(allowed.shape, device="cuda", dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    want = llama.eager_attention_forward(module, q, k, v, additive, scaling=dim**-0.5)[0].transpose(1, 2)
    torch.testing.assert_close(got, want, **(FP32 if dtype == torch.float32 else HALF))
    for g, w in zip(got_grads, torch.autograd.grad(want, [q, k, v], torch.ones_like(want))):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, **FP32)
        else:
            close_relative(g, w)


def test_softcapped_cross_entropy_on_cuda():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (4, 32), device="cuda")
    labels[0, :5] = -100
    loss = fused_linear_cross_entropy(x, weight, labels, chunk_size=37, softcap=5.0)
    logits = torch.tanh(F.linear(x, weight) / 5.0) * 5.0
    want = F.cross_entropy(logits.view(-1, 1000), labels.view(-1))
    torch.testing.assert_close(loss, want, **FP32)
    for g, w in zip(torch.autograd.grad(loss, [x, weight]), torch.autograd.grad(want, [x, weight])):
        torch.testing.assert_close(g, w, **FP32)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_gqa_without_mask_runs_the_flash_kernel_on_grouped_heads():
    """The one CUDA case given to sdpa with enable_gqa (half precision, no mask): torch's flash
    kernel takes it, not the math fallback that would repeat k/v."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with Ops() as probe:
        out = FlashAttentionOp("sdpa", apply_causal_mask=True, strict=True)(q, k, v)
        torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    assert any("flash" in name for name in probe.names), sorted(probe.names)
    assert not any("repeat_interleave" in name or "_math" in name for name in probe.names), sorted(probe.names)
