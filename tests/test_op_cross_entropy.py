"""Chunked linear + cross-entropy against F.cross_entropy(F.linear(h, W, b), y) (float32, CPU;
loss and gradients to atol 1e-6 / rtol 1e-5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slapo_lightning.op import OPS, FusedLinearCrossEntropy, OpError, fused_linear_cross_entropy
from slapo_lightning.op.cross_entropy import LOGITS_PER_CHUNK, ROW_ALIGNMENT, balanced_chunk_size, default_chunk_size
from tensor_probe import LargestTensor

TOL = dict(atol=1e-6, rtol=1e-5)
HIDDEN, VOCAB = 12, 37


def problem(shape=(3, 7), ignored=0.25, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, HIDDEN, generator=gen, requires_grad=True)
    weight = (0.5 * torch.randn(VOCAB, HIDDEN, generator=gen)).requires_grad_()
    b = torch.randn(VOCAB, generator=gen).requires_grad_() if bias else None
    labels = torch.randint(0, VOCAB, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, labels, bias=None, ignore_index=-100):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=ignore_index)


def check(hidden, weight, bias, labels, **kwargs):
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    got = fused_linear_cross_entropy(hidden, weight, labels, bias, **kwargs)
    want = reference(hidden, weight, labels, bias, kwargs.get("ignore_index", -100))
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(torch.autograd.grad(got, tensors), torch.autograd.grad(want, tensors)):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_for_any_chunking(chunk_size, bias):
    hidden, weight, b, labels = problem(bias=bias)
    assert labels.numel() % 4 and labels.numel() % 5
    check(hidden, weight, b, labels, chunk_size=chunk_size)


def test_ignored_tokens_get_zero_gradient_and_do_not_count():
    hidden, weight, bias, labels = problem(ignored=0.5)
    check(hidden, weight, bias, labels, chunk_size=4)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    grad, = torch.autograd.grad(loss, hidden)
    assert torch.all(grad[labels == -100] == 0)


def test_custom_ignore_index():
    hidden, weight, bias, labels = problem(ignored=0.0)
    labels[0, :3] = 5
    check(hidden, weight, bias, labels, ignore_index=5, chunk_size=6)


def test_all_tokens_ignored_gives_nan_loss_and_zero_grads_like_torch():
    hidden, weight, bias, labels = problem(ignored=1.0)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    assert math.isnan(loss.item()) and math.isnan(reference(hidden, weight, labels, bias).item())
    loss.backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0) and torch.all(bias.grad == 0)


def test_scaled_upstream_gradient():
    hidden, weight, bias, labels = problem()
    got = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=8) * 3.0
    want = reference(hidden, weight, labels, bias) * 3.0
    for g, w in zip(torch.autograd.grad(got, [hidden, weight, bias]), torch.autograd.grad(want, [hidden, weight, bias])):
        torch.testing.assert_close(g, w, **TOL)


def test_only_requested_gradients_are_computed():
    hidden, weight, bias, labels = problem()
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


def test_no_grad_mode_returns_the_loss():
    hidden, weight, bias, labels = problem()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, labels, bias), **TOL)


def test_module_form_and_registration():
    hidden, weight, bias, labels = problem()
    module = FusedLinearCrossEntropy(chunk_size=5)
    torch.testing.assert_close(module(hidden, weight, labels, bias), reference(hidden, weight, labels, bias), **TOL)
    assert OPS.get("fused_linear_cross_entropy") is FusedLinearCrossEntropy


def largest_tensor(loss_fn, *args):
    with LargestTensor() as mode:
        loss_fn(*args).backward()
    return mode.largest


def test_never_allocates_full_logits():
    hidden, weight, bias, labels = problem(shape=(4, 16))
    tokens = labels.numel()
    assert largest_tensor(reference, hidden, weight, labels, bias) >= tokens * VOCAB
    chunked = largest_tensor(lambda *a: fused_linear_cross_entropy(*a, chunk_size=8), hidden, weight, labels, bias)
    assert balanced_chunk_size(tokens, 8) == 8
    aligned_vocab = -(-VOCAB // ROW_ALIGNMENT) * ROW_ALIGNMENT  # one chunk of logits, rows aligned
    assert chunked == max(8 * aligned_vocab, VOCAB * HIDDEN, tokens * HIDDEN)
    assert default_chunk_size(50257) * 50257 <= LOGITS_PER_CHUNK and default_chunk_size(10**9) == 1


@pytest.mark.parametrize("rows, limit, expected", [(2046, 667, 512), (2048, 667, 512), (10, 3, 3), (9, 3, 3),
                                                   (5, 100, 5), (1, 1, 1), (0, 8, 1)])
def test_chunks_are_as_few_as_the_limit_allows_and_equal(rows, limit, expected):
    size = balanced_chunk_size(rows, limit)
    assert size == expected and size <= limit
    assert -(-rows // size) == -(-rows // limit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_is_exact_from_the_first_chunk_on_and_zero_without_tokens(dtype):
    hidden, weight, _, labels = problem(shape=(2, 7))
    hidden, weight = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3).backward()
    want = weight.detach().float().requires_grad_()
    reference(hidden.detach().float(), want, labels).backward()
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(weight.grad.float(), want.grad, **tol)
    empty, w = torch.zeros(0, HIDDEN, requires_grad=True), torch.randn(VOCAB, HIDDEN, requires_grad=True)
    loss = fused_linear_cross_entropy(empty, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.isnan() and torch.equal(w.grad, torch.zeros_like(w))


def test_shape_errors_name_the_shapes():
    hidden, weight, bias, labels = problem()
    with pytest.raises(OpError, match=r"labels of shape \(3, 6\).*expected labels of shape \(3, 7\)"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :6])
    with pytest.raises(OpError, match=r"weight of shape \(12, 37\)"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(OpError, match="chunk_size must be a positive number of tokens, got 0"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


def test_bfloat16_under_cpu_autocast_is_close():
    hidden, weight, bias, labels = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    torch.testing.assert_close(loss.float(), reference(hidden, weight, labels, bias), atol=5e-2, rtol=2e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_second_backward_is_refused_clearly():
    hidden, weight, bias, labels = problem()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def capped_reference(hidden, weight, labels, bias=None, cap=2.0):
    logits = F.linear(hidden, weight, bias)
    logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_softcap_matches_capped_logits_and_their_gradients(chunk_size):
    """cap 2 against logits of scale ~3: the tanh matters for loss and gradients."""
    hidden, weight, bias, labels = problem()
    tensors = [hidden, weight, bias]
    got = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk_size, softcap=2.0)
    want = capped_reference(hidden, weight, labels, bias)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, reference(hidden, weight, labels, bias), atol=1e-2)
    for g, w in zip(torch.autograd.grad(got, tensors), torch.autograd.grad(want, tensors)):
        torch.testing.assert_close(g, w, **TOL)


def test_softcap_halves_the_default_chunk_and_keeps_peak_memory():
    assert default_chunk_size(1000, softcap=30.0) == default_chunk_size(1000) // 2
    hidden, weight, bias, labels = problem(shape=(4, 16))
    capped = largest_tensor(lambda *a: fused_linear_cross_entropy(*a, chunk_size=8, softcap=3.0), hidden, weight,
                            labels, bias)
    assert capped < labels.numel() * VOCAB


def test_softcap_errors_and_module_from_config():
    hidden, weight, bias, labels = problem()
    for bad in (0, -1.0, "30", True):
        with pytest.raises(OpError, match="softcap must be a positive number"):
            fused_linear_cross_entropy(hidden, weight, labels, softcap=bad)
    from transformers import Gemma2Config, LlamaConfig

    assert FusedLinearCrossEntropy.from_config(Gemma2Config(final_logit_softcapping=5.0)).softcap == 5.0
    assert FusedLinearCrossEntropy.from_config(LlamaConfig()).softcap is None


def causal_lm(kind, dtype):
    """Tiny random Gemma2 (tied head, final-logit soft-capping 3.0) or Llama (untied head)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)
    if kind == "gemma2_tied_softcap":
        config = Gemma2Config(**common, final_logit_softcapping=3.0, tie_word_embeddings=True)
        config._attn_implementation = "eager"
        model = Gemma2ForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gemma2_tied_softcap", "llama_untied"])
def test_equals_the_hugging_face_causal_lm_loss(kind, dtype):
    """loss and every parameter gradient (the tied embedding's included) against the model's own
    loss; float32 to 1e-5, bfloat16 (which the model caps and normalises in bf16, the op in float32)
    to 2e-2 on the loss and 2e-2 of the largest entry on the gradients (measured 5e-3 and 1e-2)."""
    model = causal_lm(kind, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    labels = ids.clone()
    labels[1, :2] = -100
    want = model(input_ids=ids, labels=labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want, params)
    hidden = model.model(input_ids=ids).last_hidden_state
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    got = FusedLinearCrossEntropy.from_config(model.config, chunk_size=5)(hidden, model.lm_head.weight, shifted)
    got_grads = torch.autograd.grad(got, params)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        scale = w.float().abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g.float() / scale, w.float() / scale, atol=2e-2, rtol=0)
