"""The CPU attention-with-dropout kernel (blocked_attention.py) and its backend."""
from __future__ import annotations

import math

import pytest
import torch

import slapo_lightning.op.blocked_attention as blocked
from slapo_lightning.op import FlashAttentionOp
from slapo_lightning.op.attention_backends import ATTENTION_BACKENDS
from slapo_lightning.op.dropout import keep_scale

BATCH, HEADS, DIM = 2, 3, 8


def inputs(q_len, k_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HEADS, q_len, DIM), (BATCH, HEADS, k_len, DIM), (BATCH, HEADS, k_len, DIM)]
    return [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


def reference(q, k, v, keep, keep_scale, scale, causal):
    """softmax(q k^T * scale [causal, bottom-right]) * keep * keep_scale @ v, written out."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        future = torch.ones(q_len, k_len, dtype=torch.bool).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) * keep * keep_scale @ v


def fixed_masks(monkeypatch, keep):
    """Make the kernel draw its keep masks block by block from the full mask ``keep``."""
    rows_taken = [0]

    def keep_mask(shape, p, device):
        start = rows_taken[0]
        rows_taken[0] += shape[-2]
        return keep[..., start:start + shape[-2], :shape[-1]].clone(), keep_scale(p)

    monkeypatch.setattr(blocked, "keep_mask", keep_mask)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "plain"])
@pytest.mark.parametrize("q_len, k_len", [(13, 13), (9, 13), (4, 4)])
def test_matches_reference_forward_and_backward(monkeypatch, q_len, k_len, causal):
    monkeypatch.setattr(blocked, "BLOCK", 4)
    q, k, v = inputs(q_len, k_len)
    keep = torch.rand(BATCH, HEADS, q_len, k_len, generator=torch.Generator().manual_seed(1)) > 0.3
    fixed_masks(monkeypatch, keep)
    out = blocked.blocked_attention(q, k, v, 0.3, causal, scale=0.4)
    want = reference(q, k, v, keep, keep_scale(0.3), 0.4, causal)
    torch.testing.assert_close(out, want)
    upstream = torch.randn_like(want)
    got, expected = (torch.autograd.grad(result, [q, k, v], upstream) for result in (out, want))
    for got_grad, expected_grad in zip(got, expected):
        torch.testing.assert_close(got_grad, expected_grad)


def test_keep_mask_probability_and_scale():
    torch.manual_seed(0)
    keep, scale = blocked.keep_mask((1000, 1000), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs(keep.float().mean().item() - 0.9) < 2e-3
    assert scale == pytest.approx(1 / (1 - round(0.1 * 65536) / 65536))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "plain"])
def test_dropout_is_seeded_and_keeps_the_expectation(causal):
    q, k, v = (t.detach().float() for t in inputs(6, 6))
    no_dropout = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.manual_seed(3)
    first = blocked.blocked_attention(q, k, v, 0.5, causal)
    torch.manual_seed(3)
    assert torch.equal(first, blocked.blocked_attention(q, k, v, 0.5, causal))
    mean = torch.stack([blocked.blocked_attention(q, k, v, 0.5, causal) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, no_dropout, atol=0.1, rtol=0)


def test_auto_uses_it_for_dropout_without_mask_on_cpu():
    q, _, _ = (t.detach().float() for t in inputs(6, 6))
    for causal in (True, False):
        op = FlashAttentionOp(apply_causal_mask=causal)
        assert op.select_backend(q, None, 0.1).name == "blocked_dropout"
        assert op.select_backend(q, None, 0.0).name == "sdpa"
        assert op.select_backend(q, torch.ones(1, 1, 1, 6, dtype=torch.bool), 0.1).name == "sdpa"
        assert op.select_backend(q.bfloat16(), None, 0.1).name == "sdpa"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "plain"])
def test_runs_as_one_opaque_op_inside_torch_compile(causal):
    """Compiled (one graph) and eager draw the same masks from the same seed: same output and grads."""
    q, k, v = (t.detach().float().requires_grad_() for t in inputs(70, 70))
    op = FlashAttentionOp(apply_causal_mask=causal).train()
    assert op.select_backend(q, None, 0.1).name == "blocked_dropout"
    results = []
    for run in (op, torch.compile(op, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(3)
        out = run(q, k, v, p=0.1)
        results.append((out, *torch.autograd.grad(out.square().sum(), [q, k, v])))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_dynamic_compile_runs_for_each_length():
    op = FlashAttentionOp(apply_causal_mask=True).train()
    compiled = torch.compile(op, backend="aot_eager", dynamic=True, fullgraph=True)
    for length in (6, 9):
        q, k, v = (t.detach().float() for t in inputs(length, length))
        assert compiled(q, k, v, p=0.1).isfinite().all()


def test_longer_queries_than_keys_run_on_sdpa():
    q, k, v = (t.detach().float() for t in inputs(8, 5))
    torch.manual_seed(4)
    got = FlashAttentionOp("blocked_dropout", apply_causal_mask=True).train()(q, k, v, p=0.2)
    torch.manual_seed(4)
    want = FlashAttentionOp("sdpa", apply_causal_mask=True).train()(q, k, v, p=0.2)
    torch.testing.assert_close(got, want)
    assert math.isfinite(got.sum().item())
