"""FlashAttentionOp with grouped-query attention (fewer key/value heads than query heads) against
Hugging Face's eager and sdpa attention, which repeat k/v (CPU). float32: outputs and gradients to
atol/rtol 1e-5; bfloat16 to 2e-2 (outputs) and 3e-2 (gradients)."""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from slapo_lightning.errors import BackendError
from slapo_lightning.op import FlashAttentionOp, OpError

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 6, 2, 9, 8
SCALE = DIM**-0.5
FP32 = dict(atol=1e-5, rtol=1e-5)
BF16, BF16_GRAD = dict(atol=2e-2, rtol=2e-2), dict(atol=3e-2, rtol=3e-2)


def qkv(dtype=torch.float32, q_len=SEQ, k_len=SEQ):
    gen = torch.Generator().manual_seed(0)
    shapes = [(BATCH, HEADS, q_len, DIM), (BATCH, KV_HEADS, k_len, DIM), (BATCH, KV_HEADS, k_len, DIM)]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def keep_padding():
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[1, -3:] = False
    return keep


def causal_padding_bool():
    """(batch, 1, q, k) bool: causal and right padding, the mask HF builds for sdpa."""
    return torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & keep_padding()[:, None, None, :]


def additive(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def hf_module(training=False):
    return types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=training, is_causal=True)


def hf_eager(q, k, v, mask4d):
    """HF's eager attention (repeat_kv, additive mask), back to (batch, heads, seq, dim)."""
    mask = None if mask4d is None else additive(mask4d, q.dtype)
    return eager_attention_forward(hf_module(), q, k, v, mask, scaling=SCALE)[0].transpose(1, 2)


# name -> (mask given to the op, op's causal flag, the full bool mask for the HF reference)
CASES = {
    "causal": (lambda dt: None, True, lambda: torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(BATCH, 1, SEQ, SEQ)),
    "causal_key_padding": (lambda dt: keep_padding()[:, None, None, :], True, causal_padding_bool),
    "causal_padding_4d_bool": (lambda dt: causal_padding_bool(), False, causal_padding_bool),
    "causal_padding_4d_additive": (lambda dt: additive(causal_padding_bool(), dt), False, causal_padding_bool),
    "padding_only": (lambda dt: additive(keep_padding()[:, None, None, :], dt), False,
                     lambda: keep_padding()[:, None, None, :].expand(BATCH, 1, SEQ, SEQ)),
}


def check(got, want, tensors, dtype):
    torch.testing.assert_close(got, want, **(FP32 if dtype == torch.float32 else BF16))
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(g, w, **(FP32 if dtype == torch.float32 else BF16_GRAD))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face_eager_attention(case, backend, dtype):
    mask_fn, causal, reference_mask = CASES[case]
    q, k, v = qkv(dtype)
    got = FlashAttentionOp(backend, apply_causal_mask=causal, scale=SCALE, strict=True)(q, k, v, mask_fn(dtype))
    check(got, hf_eager(q, k, v, reference_mask()), [q, k, v], dtype)


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_matches_hugging_face_sdpa_attention(mask_kind):
    q, k, v = qkv()
    mask = None if mask_kind == "none" else causal_padding_bool()
    want = sdpa_attention_forward(hf_module(), q, k, v, mask, scaling=SCALE)[0].transpose(1, 2)
    got = FlashAttentionOp(apply_causal_mask=mask is None, scale=SCALE)(q, k, v, mask)
    check(got, want, [q, k, v], torch.float32)


def test_per_head_additive_mask():
    q, k, v = qkv()
    bias = torch.randn(BATCH, HEADS, SEQ, SEQ, generator=torch.Generator().manual_seed(4))
    for backend in ("sdpa", "math"):
        want = eager_attention_forward(hf_module(), q, k, v, bias, scaling=SCALE)[0].transpose(1, 2)
        check(FlashAttentionOp(backend, scale=SCALE)(q, k, v, bias), want, [q, k, v], torch.float32)


class Shapes(TorchDispatchMode):
    """Every shape an aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def shapes_made(fn, tensors):
    with Shapes() as probe:
        out = fn()
        torch.autograd.grad(out, tensors, torch.ones_like(out))
    return probe.shapes


@pytest.mark.parametrize("backend, mask, dropout", [
    ("sdpa", None, 0.0), ("sdpa", "padding", 0.0), ("sdpa", None, 0.2), ("sdpa", "padding", 0.2),
    ("math", "padding", 0.2), ("auto", None, 0.2),
])
def test_never_repeats_keys_and_values(backend, mask, dropout):
    """k/v repeated for every query head would be a (batch, heads, k_len, dim) tensor; with
    q_len != k_len no other tensor has that shape. HF's repeat_kv makes one (the probe sees it)."""
    q_len, k_len = 5, 7
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    keep = torch.ones(BATCH, 1, 1, k_len, dtype=torch.bool)
    keep[1, ..., -2:] = False
    op = FlashAttentionOp(backend, apply_causal_mask=True).train()
    made = shapes_made(lambda: op(q, k, v, keep if mask else None, p=dropout), [q, k, v])
    repeated = (BATCH, HEADS, k_len, DIM)
    assert repeated not in made
    assert repeated in shapes_made(lambda: hf_eager(q, k, v, None), [q, k, v])


def test_dropout_only_in_training():
    q, k, v = qkv()
    op = FlashAttentionOp(apply_causal_mask=True, scale=SCALE)
    plain = op.eval()(q, k, v, p=0.0)
    assert torch.equal(op(q, k, v, p=0.5), plain)
    op.train()
    torch.manual_seed(5)
    first = op(q, k, v, p=0.5)
    torch.manual_seed(5)
    assert torch.equal(op(q, k, v, p=0.5), first) and not torch.allclose(first, plain)


def test_backends_without_grouped_heads_refuse_or_step_aside():
    q, k, _ = qkv()
    assert FlashAttentionOp().select_backend(q, None, 0.1, k).name == "sdpa"
    assert FlashAttentionOp().select_backend(q, None, 0.1, q).name == "blocked_dropout"
    with pytest.raises(BackendError, match="needs as many key/value heads as query heads"):
        FlashAttentionOp("blocked_dropout", strict=True).train()(*qkv(), p=0.1)


def test_bad_head_counts():
    q, k, v = qkv()
    with pytest.raises(OpError, match=r"dividing q's 6 heads .* got shapes \(2, 6, 9, 8\), \(2, 4, 9, 8\)"):
        FlashAttentionOp()(q, torch.randn(BATCH, 4, SEQ, DIM), torch.randn(BATCH, 4, SEQ, DIM))
    with pytest.raises(OpError, match="same number of heads"):
        FlashAttentionOp()(q, k, torch.randn(BATCH, 1, SEQ, DIM))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_compiles_as_one_graph(backend):
    q, k, v = qkv()
    op = FlashAttentionOp(backend, apply_causal_mask=True, scale=SCALE)
    mask = keep_padding()[:, None, None, :]
    compiled = torch.compile(lambda *t: op(*t, mask), backend="eager", fullgraph=True)
    check(compiled(q, k, v), op(q, k, v, mask), [q, k, v], torch.float32)
