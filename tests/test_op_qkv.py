"""FusedQKV against the three Linears it replaces (CPU): float32 to atol 1e-5; the grouped-query
Hugging Face projections also in bfloat16, outputs to 2e-2 and weight gradients to 3e-2."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slapo_lightning.op import OPS, FusedQKV, OpError
from slapo_lightning.op.qkv import _linear_state
from tensor_probe import LargestTensor

HIDDEN, HEADS = 16, 4


def three_linears(bias=True, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(HIDDEN, HIDDEN, bias=bias) for _ in range(3)]


def heads(x):
    return x.view(*x.shape[:-1], HEADS, -1).transpose(1, 2)


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_layout", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linears_equals_three_linears(bias, head_layout):
    linears = three_linears(bias)
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS, head_layout=head_layout)
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    want = [lin(x) for lin in linears]
    want = [heads(t) for t in want] if head_layout else want
    got = fused(x)
    assert isinstance(got, tuple) and len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w)

    upstream = [torch.randn_like(w) for w in want]
    grad_x_fused, = torch.autograd.grad(got, x, upstream)
    grad_x_ref, = torch.autograd.grad(want, x, upstream)
    assert_close(grad_x_fused, grad_x_ref)


def test_parameter_gradients_split_back_to_the_linears():
    linears = three_linears()
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS)
    x = torch.randn(3, 4, HIDDEN)
    upstream = [torch.randn(3, 4, HIDDEN) for _ in range(3)]
    torch.autograd.backward(fused(x), upstream)
    torch.autograd.backward([lin(x) for lin in linears], upstream)
    w_grads = fused.fused_linear.weight.grad.split(HIDDEN)
    b_grads = fused.fused_linear.bias.grad.split(HIDDEN)
    for lin, gw, gb in zip(linears, w_grads, b_grads):
        assert_close(gw, lin.weight.grad)
        assert_close(gb, lin.bias.grad)


def test_one_gemm():
    fused = FusedQKV(HIDDEN, HEADS)
    assert [type(m) for m in fused.children()] == [nn.Linear]
    assert fused.fused_linear.weight.shape == (3 * HIDDEN, HIDDEN)


def test_split_state_returns_views_in_linear_layout():
    linears = three_linears()
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS)
    states = fused.split_state()
    assert [sorted(s) for s in states] == [["bias", "weight"]] * 3
    for lin, state in zip(linears, states):
        assert torch.equal(state["weight"], lin.weight) and torch.equal(state["bias"], lin.bias)
        assert state["weight"].untyped_storage().data_ptr() == fused.fused_linear.weight.untyped_storage().data_ptr()
        assert not state["weight"].requires_grad


def test_split_state_without_bias_has_no_bias_key():
    fused = FusedQKV.from_linears(*three_linears(bias=False), n_heads=HEADS)
    assert [sorted(s) for s in fused.split_state()] == [["weight"]] * 3


def test_load_split_state_round_trip():
    source = FusedQKV.from_linears(*three_linears(seed=1), n_heads=HEADS)
    target = FusedQKV(HIDDEN, HEADS)
    weight_param = target.fused_linear.weight
    target.load_split_state(source.split_state())
    assert torch.equal(target.fused_linear.weight, source.fused_linear.weight)
    assert torch.equal(target.fused_linear.bias, source.fused_linear.bias)
    assert target.fused_linear.weight is weight_param
    states = [{k: v.clone() for k, v in s.items()} for s in target.split_state()]
    target.load_split_state(states)
    for before, after in zip(states, target.split_state()):
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_split_state_rejects_bad_states():
    fused = FusedQKV(HIDDEN, HEADS)
    good = [{k: v.clone() for k, v in s.items()} for s in fused.split_state()]
    with pytest.raises(OpError, match="needs 3 states"):
        fused.load_split_state(good[:2])
    with pytest.raises(OpError, match=r"key.weight has shape \(16, 8\), expected \(16, 16\)"):
        fused.load_split_state([good[0], {"weight": torch.zeros(HIDDEN, 8), "bias": good[1]["bias"]}, good[2]])
    with pytest.raises(OpError, match="value state has keys"):
        fused.load_split_state([good[0], good[1], {"weight": good[2]["weight"]}])


def test_from_linears_rejects_mismatched_linears():
    q, k, _ = three_linears()
    with pytest.raises(OpError, match="weight shapes"):
        FusedQKV.from_linears(q, k, nn.Linear(HIDDEN, 8), n_heads=HEADS)
    with pytest.raises(OpError, match="all three Linears with a bias"):
        FusedQKV.from_linears(q, k, nn.Linear(HIDDEN, HIDDEN, bias=False), n_heads=HEADS)
    with pytest.raises(OpError, match="not divisible by n_heads 5"):
        FusedQKV(HIDDEN, 5)


def test_from_linears_keeps_dtype_and_training_mode():
    linears = [lin.double().eval() for lin in three_linears()]
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS)
    assert fused.fused_linear.weight.dtype == torch.float64 and not fused.training


def test_registered_as_fused_qkv():
    assert OPS.get("fused_qkv") is FusedQKV


def test_unused_outputs_and_frozen_weights():
    linears = three_linears()
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS)
    fused.fused_linear.bias.requires_grad_(False)
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    q, _, v = fused(x)
    (q.sum() + 2 * v.sum()).backward()
    grad_x_fused, x.grad = x.grad, None
    (linears[0](x).sum() + 2 * linears[2](x).sum()).backward()
    assert_close(grad_x_fused, x.grad)
    w_grads = fused.fused_linear.weight.grad.split(HIDDEN)
    assert torch.equal(w_grads[1], torch.zeros(HIDDEN, HIDDEN))
    assert_close(w_grads[0], linears[0].weight.grad)
    assert_close(w_grads[2], linears[2].weight.grad)
    assert fused.fused_linear.bias.grad is None


def test_backward_builds_no_concatenated_gradient():
    """Plain linear(...).split(...) concatenates the three gradients into a (tokens, 3 * hidden)
    buffer in backward; FusedQKV's backward never makes a tensor that large."""
    fused = FusedQKV(HIDDEN, HEADS)
    tokens = 64
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    upstream = [torch.randn(tokens, HIDDEN) for _ in range(3)]
    outs = fused(x)
    with LargestTensor() as mode:
        torch.autograd.backward(outs, upstream)
    assert mode.largest == tokens * HIDDEN
    plain = fused.fused_linear(x).split(HIDDEN, dim=-1)
    with LargestTensor() as mode:
        torch.autograd.backward(plain, upstream)
    assert mode.largest == tokens * 3 * HIDDEN


def test_bfloat16_under_cpu_autocast():
    linears = three_linears()
    fused = FusedQKV.from_linears(*linears, n_heads=HEADS)
    x = torch.randn(2, 3, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), [lin(x) for lin in linears]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


def gqa_attention(bias=False, head_dim=None, dtype=torch.float32):
    """Hugging Face attention with 4 query and 2 key/value heads (Qwen2 has q/k/v biases; head_dim
    other than hidden/heads as in Qwen3 and Gemma)."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    if bias:
        return Qwen2Attention(Qwen2Config(**common), layer_idx=0).to(dtype)
    return LlamaAttention(LlamaConfig(**common, head_dim=head_dim), layer_idx=0).to(dtype)


GQA_CASES = {"llama": {}, "qwen2_bias": {"bias": True}, "head_dim_12": {"head_dim": 12}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(GQA_CASES))
def test_gqa_widths_equal_the_hugging_face_projections(case, dtype):
    attn = gqa_attention(**GQA_CASES[case], dtype=dtype)
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = FusedQKV.from_linears(*projections, n_heads=4)
    assert fused.widths == (4 * attn.head_dim, 2 * attn.head_dim, 2 * attn.head_dim)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    got, want = fused(x), [lin(x) for lin in projections]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)
    upstream = [torch.randn(w.shape, generator=torch.Generator().manual_seed(2)).to(dtype) for w in want]
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, upstream)
    grad_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for lin, grad in zip(projections, fused.fused_linear.weight.grad.split(list(fused.widths))):
        torch.testing.assert_close(grad, lin.weight.grad, **grad_tol)
    if GQA_CASES[case].get("bias"):
        for lin, grad in zip(projections, fused.fused_linear.bias.grad.split(list(fused.widths))):
            torch.testing.assert_close(grad, lin.bias.grad, **grad_tol)


def test_gqa_head_layout_is_the_attention_modules_layout():
    attn = gqa_attention(head_dim=12)
    fused = FusedQKV.from_linears(attn.q_proj, attn.k_proj, attn.v_proj, n_heads=4, head_layout=True)
    x = torch.randn(2, 5, 32)
    for got, lin, heads in zip(fused(x), (attn.q_proj, attn.k_proj, attn.v_proj), (4, 2, 2)):
        assert got.shape == (2, heads, 5, 12)
        assert_close(got, lin(x).view(2, 5, -1, 12).transpose(1, 2))


def test_gqa_split_state_loads_strictly_into_the_original_module():
    """The original keys and shapes come back: a fresh HF attention loads them with strict=True."""
    attn = gqa_attention(bias=True)
    fused = FusedQKV.from_linears(attn.q_proj, attn.k_proj, attn.v_proj, n_heads=4)
    states = fused.split_state()
    assert [tuple(s["weight"].shape) for s in states] == [(32, 32), (16, 32), (16, 32)]
    assert [tuple(s["bias"].shape) for s in states] == [(32,), (16,), (16,)]
    saved = {f"{name}.{key}": t for name, state in zip(("q_proj", "k_proj", "v_proj"), states) for key, t in state.items()}
    saved.update({f"o_proj.{k}": t for k, t in attn.o_proj.state_dict().items()})
    fresh = gqa_attention(bias=True)
    torch.nn.init.zeros_(fresh.k_proj.weight)
    fresh.load_state_dict(saved, strict=True)
    assert torch.equal(fresh.k_proj.weight, attn.k_proj.weight) and torch.equal(fresh.v_proj.bias, attn.v_proj.bias)
    target = FusedQKV(32, 4, n_kv_heads=2)
    target.load_split_state([_linear_state(lin) for lin in (fresh.q_proj, fresh.k_proj, fresh.v_proj)])
    assert torch.equal(target.fused_linear.weight, fused.fused_linear.weight)


def test_gqa_bad_widths():
    q, k = nn.Linear(32, 32), nn.Linear(32, 16)
    with pytest.raises(OpError, match=r"k and v of one width.*'value': \(8, 32\)"):
        FusedQKV.from_linears(q, k, nn.Linear(32, 8), n_heads=4)
    with pytest.raises(OpError, match=r"k/v have 3 heads of size 8, which does not divide n_heads=4"):
        FusedQKV.from_linears(q, nn.Linear(32, 24), nn.Linear(32, 24), n_heads=4)
    with pytest.raises(OpError, match="n_kv_heads 3 must divide n_heads 4"):
        FusedQKV(32, 4, n_kv_heads=3)
    fused = FusedQKV(32, 4, n_kv_heads=2)
    good = [{k: v.clone() for k, v in s.items()} for s in fused.split_state()]
    with pytest.raises(OpError, match=r"key.weight has shape \(32, 32\), expected \(16, 32\)"):
        fused.load_split_state([good[0], {"weight": torch.zeros(32, 32), "bias": good[1]["bias"]}, good[2]])


def test_gqa_fused_attention_keeps_the_original_keys_under_the_core_hooks():
    """With the core's state-dict hooks (what ``replace`` installs), an attention whose q/k/v became
    one grouped-width FusedQKV saves the original keys and shapes, and strict loading works both
    ways with the plain module."""
    from slapo_lightning.core.state_keys import alias_split_state

    plain, scheduled = gqa_attention(bias=True), gqa_attention(bias=True)
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    scheduled.fused = FusedQKV.from_linears(scheduled.q_proj, scheduled.k_proj, scheduled.v_proj, n_heads=4)
    del scheduled.q_proj, scheduled.k_proj, scheduled.v_proj
    alias_split_state(scheduled, "fused", ["q_proj", "k_proj", "v_proj"])
    saved = scheduled.state_dict()
    assert sorted(saved) == sorted(original) and all(saved[k].shape == original[k].shape for k in original)
    scheduled.load_state_dict(original, strict=True)
    assert torch.equal(scheduled.fused.split_state()[1]["weight"], plain.k_proj.weight)
    other = gqa_attention(bias=True)
    torch.nn.init.zeros_(other.v_proj.weight)
    other.load_state_dict(scheduled.state_dict(), strict=True)
    assert torch.equal(other.v_proj.weight, plain.v_proj.weight)
