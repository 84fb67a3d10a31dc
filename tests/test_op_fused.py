"""Fused bias+GELU and bias+dropout+residual+LayerNorm against transformers' modules and plain
PyTorch (float32, CPU). Tolerances: 1e-6 where the op runs the same kernels as the reference, 1e-5
where transformers writes the tanh GELU out in Python (a few ulp of rounding)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from slapo_lightning.op import OPS, FastDropout, FusedBiasDropoutAddLayerNorm, FusedBiasGELU, OpError, fast_dropout
from slapo_lightning.op import compiled, fused
from slapo_lightning.op.compiled import CompiledOn

HIDDEN = 32
HF_TOLERANCE = {"gelu": 1e-6, "gelu_python": 1e-6, "gelu_pytorch_tanh": 1e-6,
                "gelu_new": 1e-5, "gelu_python_tanh": 1e-5, "gelu_fast": 1e-5}


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(4, 6, HIDDEN, generator=gen)).requires_grad_()
    bias = torch.randn(HIDDEN, generator=gen).requires_grad_()
    return x, bias


@pytest.mark.parametrize("act_name", list(HF_TOLERANCE))
def test_bias_gelu_matches_transformers_activation(act_name):
    x, bias = inputs()
    hf_act = ACT2FN[act_name]
    tol = HF_TOLERANCE[act_name]
    for op in (FusedBiasGELU.from_activation(act_name), FusedBiasGELU.from_activation(hf_act)):
        got, want = op(x, bias), hf_act(x + bias)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        upstream = torch.randn_like(got)
        for g, w in zip(torch.autograd.grad(got, [x, bias], upstream), torch.autograd.grad(want, [x, bias], upstream)):
            torch.testing.assert_close(g, w, atol=10 * tol, rtol=tol)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_equals_plain_pytorch(approximate):
    x, bias = inputs()
    got = FusedBiasGELU(approximate)(x, bias)
    assert torch.equal(got, F.gelu(x + bias, approximate=approximate))
    assert torch.equal(FusedBiasGELU(approximate)(x), F.gelu(x, approximate=approximate))


def test_bias_gelu_accepts_torch_gelus():
    assert FusedBiasGELU.from_activation(nn.GELU("tanh")).approximate == "tanh"
    assert FusedBiasGELU.from_activation(F.gelu).approximate == "none"


def test_bias_gelu_rejects_other_activations():
    with pytest.raises(OpError, match="'relu' is not a GELU.*gelu_new"):
        FusedBiasGELU.from_activation("relu")
    with pytest.raises(OpError, match="unknown GELU approximation 'fast'; valid: none, tanh"):
        FusedBiasGELU("fast")


def reference_ln(x, bias, residual, ln, p, training):
    """The unfused computation, with the op library's dropout (its mask is tested in test_op_dropout)."""
    return ln(fast_dropout(x + bias, p, training) + residual)


def ln_inputs(seed=0):
    x, bias = inputs(seed)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    torch.manual_seed(seed)
    ln = nn.LayerNorm(HIDDEN, eps=1e-12)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    return x, bias, residual, ln


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bias_dropout_add_layer_norm_matches_reference(training):
    x, bias, residual, ln = ln_inputs()
    op = FusedBiasDropoutAddLayerNorm.from_layer_norm(ln, p=0.2).train(training)
    torch.manual_seed(7)
    got = op(x, bias, residual)
    torch.manual_seed(7)
    want = reference_ln(x, bias, residual, ln, 0.2, training)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    tensors = [x, bias, residual, ln.weight, ln.bias]
    upstream = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bias_dropout_add_layer_norm_dropout_only_in_training():
    x, bias, residual, ln = ln_inputs()
    op = FusedBiasDropoutAddLayerNorm.from_layer_norm(ln, p=0.5)
    assert not torch.allclose(op(x, bias, residual), op.eval()(x, bias, residual))
    assert torch.equal(op(x, bias, residual), op(x, bias, residual))


def test_from_layer_norm_reuses_parameters():
    ln = nn.LayerNorm(HIDDEN, eps=1e-7)
    op = FusedBiasDropoutAddLayerNorm.from_layer_norm(ln, p=0.1)
    assert op.weight is ln.weight and op.bias is ln.bias and op.eps == 1e-7
    assert [name for name, _ in op.named_parameters()] == ["weight", "bias"]


def test_bias_dropout_add_layer_norm_replaces_bert_self_output():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfOutput

    config = BertConfig(hidden_size=HIDDEN, num_attention_heads=4, hidden_dropout_prob=0.1)
    torch.manual_seed(0)
    block = BertSelfOutput(config)
    op = FusedBiasDropoutAddLayerNorm.from_layer_norm(block.LayerNorm, p=block.dropout.p)
    block.dropout = FastDropout.from_dropout(block.dropout)  # the same keep mask for the same seed
    hidden, residual = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    for training in (False, True):
        block.train(training), op.train(training)
        torch.manual_seed(1)
        want = block(hidden, residual)
        torch.manual_seed(1)
        got = op(F.linear(hidden, block.dense.weight), block.dense.bias, residual)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_plain_layer_norm_options():
    x, bias, residual, _ = ln_inputs()
    op = FusedBiasDropoutAddLayerNorm(HIDDEN, p=0.0, elementwise_affine=False).eval()
    assert list(op.parameters()) == []
    torch.testing.assert_close(op(x, None, residual), F.layer_norm(x + residual, (HIDDEN,)), atol=1e-6, rtol=1e-6)
    with pytest.raises(OpError, match="got 1.5"):
        FusedBiasDropoutAddLayerNorm(HIDDEN, p=1.5)


def test_registered_names():
    assert OPS.get("fused_bias_gelu") is FusedBiasGELU
    assert OPS.get("fused_bias_dropout_add_layer_norm") is FusedBiasDropoutAddLayerNorm


def test_cpu_calls_stay_eager(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("CPU path must not compile")

    monkeypatch.setattr(torch, "compile", no_compile)
    FusedBiasGELU()(*inputs())


def test_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    op = CompiledOn(fused.bias_gelu.fn, devices=("cpu",))
    x, bias = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [op(x, bias, "none") for _ in range(2)]
    assert len([w for w in caught if "no compiler here" in str(w.message)]) == 1
    assert all(torch.equal(out, F.gelu(x + bias)) for out in outs)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("training", [False, True])
def test_compiled_path_matches_eager(training):
    """The code CUDA runs (torch.compile of the same functions), checked here with inductor's CPU backend."""
    x, bias, residual, ln = ln_inputs()
    gelu = CompiledOn(fused.bias_gelu.fn, devices=("cpu",))
    layer_norm = CompiledOn(fused.bias_dropout_add_layer_norm.fn, devices=("cpu",))
    tensors = [x, bias, residual, ln.weight, ln.bias]
    args = (residual, (HIDDEN,), ln.weight, ln.bias, 1e-12, 0.0 if not training else 0.3, training)
    for approximate in ("none", "tanh"):
        got, want = gelu(x, bias, approximate), fused.bias_gelu.fn(x, bias, approximate)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = layer_norm(x, bias, *args)
    if training:  # inductor draws its own random numbers: compare what does not depend on them
        assert got.shape == x.shape
        torch.testing.assert_close(got.mean(-1), torch.zeros(got.shape[:-1]) + ln.bias.mean(), atol=0.2, rtol=0)
        torch.autograd.grad(got.sum(), tensors)
        return
    want = fused.bias_dropout_add_layer_norm.fn(x, bias, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert not compiled.CompiledOn(fused.bias_gelu.fn)._wants_compiled(x)
