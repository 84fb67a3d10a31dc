"""FlashAttentionOp against a written-out reference, float32 on CPU (atol 1e-5 forward and backward)."""
from __future__ import annotations

import math
import subprocess
import sys
import types
import warnings

import pytest
import torch

from slapo_lightning.errors import BackendError, ScheduleError
from slapo_lightning.op import OPS, FlashAttentionOp, OpError
from slapo_lightning.op.attention_backends import ATTENTION_BACKENDS, causal_mask, key_padding

ATOL = 1e-5
BATCH, HEADS, SEQ, DIM = 2, 3, 7, 8


def reference(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + mask) v; fully masked rows give zeros (as F.scaled_dot_product_attention)."""
    scores = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if causal:
        q_len, k_len = q.shape[-2], k.shape[-2]
        future = torch.ones(q_len, k_len, dtype=torch.bool).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def qkv(q_len=SEQ, k_len=SEQ, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HEADS, q_len, DIM), (BATCH, HEADS, k_len, DIM), (BATCH, HEADS, k_len, DIM)]
    return [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]


def padding_bool(k_len=SEQ):
    """(batch, 1, 1, k_len): the second sequence has its last three keys padded."""
    keep = torch.ones(BATCH, 1, 1, k_len, dtype=torch.bool)
    keep[1, ..., -3:] = False
    return keep


def to_additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


MASKS = {
    "none": lambda: None,
    "padding_bool": padding_bool,
    "padding_additive": lambda: to_additive(padding_bool()),
    "full_bool": lambda: torch.rand(BATCH, 1, SEQ, SEQ, generator=torch.Generator().manual_seed(1)) > 0.3,
    "full_additive": lambda: torch.randn(BATCH, HEADS, SEQ, SEQ, generator=torch.Generator().manual_seed(2)),
}


def grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors)


def assert_close_with_grads(op_out, ref_out, inputs):
    torch.testing.assert_close(op_out, ref_out, atol=ATOL, rtol=1e-5)
    for got, want in zip(grads(op_out, inputs), grads(ref_out, inputs)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_matches_reference_forward_and_backward(backend, mask_kind, causal):
    q, k, v = qkv()
    mask = MASKS[mask_kind]()
    op = FlashAttentionOp(backend, apply_causal_mask=causal)
    assert_close_with_grads(op(q, k, v, attention_mask=mask), reference(q, k, v, mask, causal), [q, k, v])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causal_is_bottom_right_aligned_when_lengths_differ(backend):
    q, k, v = qkv(q_len=3, k_len=SEQ)
    op = FlashAttentionOp(backend, apply_causal_mask=True)
    assert_close_with_grads(op(q, k, v), reference(q, k, v, causal=True), [q, k, v])
    masked = op(q, k, v, attention_mask=padding_bool())
    assert_close_with_grads(masked, reference(q, k, v, padding_bool(), causal=True), [q, k, v])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_custom_scale(backend):
    q, k, v = qkv()
    out = FlashAttentionOp(backend, scale=0.05)(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, scale=0.05), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fully_masked_query_rows_give_zeros(backend):
    q, k, v = qkv()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool)
    mask[..., 2, :] = False
    out = FlashAttentionOp(backend)(q, k, v, attention_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_dropout_is_off_in_eval_mode(backend):
    q, k, v = qkv()
    op = FlashAttentionOp(backend).eval()
    torch.testing.assert_close(op(q, k, v, p=0.5), reference(q, k, v), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_dropout_in_train_mode_changes_output_and_is_seeded(backend):
    q, k, v = qkv()
    op = FlashAttentionOp(backend).train()
    torch.manual_seed(3)
    first = op(q, k, v, p=0.3)
    torch.manual_seed(3)
    again = op(q, k, v, p=0.3)
    assert torch.equal(first, again)
    assert not torch.allclose(first, op(q, k, v, p=0.0))


def test_dropout_sdpa_matches_math_under_same_seed():
    q, k, v = qkv()
    mask = padding_bool()
    outs = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(4)
        outs[backend] = FlashAttentionOp(backend, apply_causal_mask=True).train()(q, k, v, mask, p=0.25)
    assert_close_with_grads(outs["sdpa"], outs["math"], [q, k, v])


def test_dropout_keeps_the_expectation():
    q, k, v = (torch.randn(1, 1, 4, 4).expand(4000, 1, 4, 4) for _ in range(3))
    torch.manual_seed(5)
    out = FlashAttentionOp("math").train()(q, k, v, p=0.5)
    torch.testing.assert_close(out.mean(0), reference(q[:1], k[:1], v[:1])[0], atol=0.1, rtol=0)


@pytest.mark.parametrize(
    "alias, target", [("native_xformers", "xformers"), ("cutlass", "xformers"), ("triton", "flash_attn"), ("cuda", "flash_attn")]
)
def test_tutorial_aliases_map_to_backends(alias, target):
    assert FlashAttentionOp(alias).backend_name == target


@pytest.mark.parametrize("name", ["native_xformers", "cutlass", "triton", "cuda", "flash_attn", "xformers"])
def test_unrunnable_backend_falls_back_to_sdpa_with_one_warning(name):
    q, k, v = qkv()
    op = FlashAttentionOp(name, apply_causal_mask=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [op(q, k, v, p=0.1) for _ in range(3)]
    ours = [w for w in caught if "falling back to 'sdpa'" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert name in str(ours[0].message)
    for out in outs:
        torch.testing.assert_close(out, reference(q, k, v, causal=True), atol=ATOL, rtol=1e-5)


def test_each_op_instance_warns_once():
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            op = FlashAttentionOp("xformers")
            op(q, k, v)
            op(q, k, v)
    assert len([w for w in caught if "falling back" in str(w.message)]) == 2


def test_strict_raises_when_package_missing(monkeypatch):
    monkeypatch.setattr(ATTENTION_BACKENDS.get("xformers"), "installed", lambda: False)
    with pytest.raises(BackendError, match="xformers.*not installed"):
        FlashAttentionOp("cutlass", strict=True)


def test_strict_raises_when_inputs_unsupported(monkeypatch):
    monkeypatch.setattr(ATTENTION_BACKENDS.get("flash_attn"), "installed", lambda: True)
    op = FlashAttentionOp("flash_attn", strict=True)
    q, k, v = qkv()
    with pytest.raises(BackendError, match="'flash_attn' cannot run here: it needs cuda tensors, got cpu"):
        op(q, k, v)


def test_unknown_backend_names_itself_and_the_valid_names():
    with pytest.raises(BackendError) as info:
        FlashAttentionOp("flash_atn")
    message = str(info.value)
    assert "'flash_atn'" in message and "did you mean 'flash_attn'" in message
    for valid in ("auto", "sdpa", "math", "flash_attn", "xformers", "native_xformers", "cutlass", "triton", "cuda"):
        assert valid in message
    assert isinstance(info.value, ScheduleError)


def test_auto_picks_sdpa_on_cpu():
    q, _, _ = qkv()
    assert FlashAttentionOp().select_backend(q, padding_bool(), 0.1).name == "sdpa"


def test_bad_mask_dtype_and_layout_are_reported():
    q, k, v = qkv()
    with pytest.raises(OpError, match="torch.int64"):
        FlashAttentionOp()(q, k, v, attention_mask=torch.ones(BATCH, 1, 1, SEQ, dtype=torch.long))
    with pytest.raises(OpError, match=r"\(batch, heads, seq, head_dim\)"):
        FlashAttentionOp()(q[0], k[0], v[0])


def test_registered_as_flash_attention():
    assert OPS.get("flash_attention") is FlashAttentionOp


def test_key_padding_detects_padding_masks_only():
    keep = padding_bool()
    assert torch.equal(key_padding(keep, BATCH), keep.view(BATCH, SEQ))
    assert torch.equal(key_padding(to_additive(keep), BATCH), keep.view(BATCH, SEQ))
    assert torch.equal(key_padding(keep[:1], BATCH), keep[:1].view(1, SEQ).expand(BATCH, SEQ))
    assert key_padding(torch.randn(BATCH, 1, 1, SEQ), BATCH) is None
    assert key_padding(MASKS["full_bool"](), BATCH) is None


def test_causal_mask_alignment():
    assert torch.equal(causal_mask(2, 4, "cpu"), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))


def test_standalone_import_loads_no_optional_kernels():
    code = (
        "import sys; from slapo_lightning.op.attention import FlashAttentionOp; FlashAttentionOp('cutlass'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'xformers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- flash_attn and xformers backends' own code (layouts, unpadding, cu_seqlens, bias alignment),
# run on CPU against stand-in kernels that compute plain attention with each package's calling
# convention. The real kernels are covered by test_op_gpu.py.


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
