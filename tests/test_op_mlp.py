"""FusedMLP against transformers' BERT and GPT-2 MLP blocks (float32, CPU; atol 1e-5)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, GPT2Config
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from slapo_lightning.op import OPS, FusedMLP, OpError
from slapo_lightning.op.dropout import keep_mask

HIDDEN = 16
TOL = dict(atol=1e-5, rtol=1e-5)


def bert_blocks(act="gelu"):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=4, hidden_act=act)
    return BertIntermediate(config), BertOutput(config)


def gpt2_mlp(act="gelu_new", dropout=0.1):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=HIDDEN, n_head=4, activation_function=act, resid_pdrop=dropout)
    return GPT2MLP(4 * HIDDEN, config)


def hidden_states():
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)


def assert_same_grads(got, want, tensors):
    upstream = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, tensors, upstream), torch.autograd.grad(want, tensors, upstream)):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_from_bert_matches_intermediate_then_dense(act):
    intermediate, output = bert_blocks(act)
    mlp = FusedMLP.from_bert(intermediate, output)
    x = hidden_states()
    got, want = mlp(x), output.dense(intermediate(x))
    torch.testing.assert_close(got, want, **TOL)
    tensors = [x, *intermediate.parameters(), output.dense.weight, output.dense.bias]
    assert_same_grads(got, want, tensors)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "gelu"])
def test_from_gpt2_matches_gpt2_mlp(act):
    block = gpt2_mlp(act)
    mlp = FusedMLP.from_gpt2(block)
    x = hidden_states()
    for training in (False, True):
        mlp.train(training)
        torch.manual_seed(2)
        got = mlp(x)
        want = block.eval()(x)
        if training:  # the op's dropout draws its keep mask with op.dropout.keep_mask
            torch.manual_seed(2)
            keep, scale = keep_mask(want.shape, block.dropout.p, want.device)
            want = want * keep * scale
        torch.testing.assert_close(got, want, **TOL)
        assert_same_grads(got, want, [x, *block.parameters()])


def test_constructors_reuse_the_original_parameters():
    intermediate, output = bert_blocks()
    mlp = FusedMLP.from_bert(intermediate, output)
    assert mlp.fc_in.weight is intermediate.dense.weight and mlp.fc_out.bias is output.dense.bias
    block = gpt2_mlp()
    mlp = FusedMLP.from_gpt2(block)
    assert mlp.fc_in is block.c_fc and mlp.fc_out is block.c_proj and mlp.dropout_p == 0.1


def test_fresh_mlp_equals_plain_pytorch():
    mlp = FusedMLP(HIDDEN, 3 * HIDDEN, out_features=8, approximate="tanh", bias=False)
    x = hidden_states()
    want = F.linear(F.gelu(F.linear(x, mlp.fc_in.weight), approximate="tanh"), mlp.fc_out.weight)
    got = mlp(x)
    assert got.shape == (2, 5, 8)
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(got, want, [x, mlp.fc_in.weight, mlp.fc_out.weight])


def test_frozen_input_and_weights_get_no_grad():
    mlp = FusedMLP(HIDDEN, 2 * HIDDEN)
    mlp.fc_in.requires_grad_(False)
    x = torch.randn(3, HIDDEN)
    mlp(x).sum().backward()
    assert mlp.fc_in.weight.grad is None and mlp.fc_out.weight.grad is not None


def saved_numel(fn, x):
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(id(t), t), lambda t: t):
        fn(x)
    return sum(t.numel() for t in saved.values() if t.shape[0] == x.shape[0])


def test_saves_no_gelu_output_for_backward():
    """Autograd keeps x and the pre-activation; the GELU output (tokens x hidden_features) is recomputed."""
    mlp = FusedMLP(HIDDEN, 4 * HIDDEN)
    x = torch.randn(50, HIDDEN, requires_grad=True)
    plain = saved_numel(lambda t: mlp.fc_out(F.gelu(mlp.fc_in(t))), x)
    assert saved_numel(mlp, x) == 50 * (HIDDEN + 4 * HIDDEN)
    assert plain - saved_numel(mlp, x) == 50 * 4 * HIDDEN


def test_bad_arguments():
    with pytest.raises(OpError, match="unknown GELU approximation 'erf'"):
        FusedMLP(HIDDEN, HIDDEN, approximate="erf")
    with pytest.raises(OpError, match="got -0.1"):
        FusedMLP(HIDDEN, HIDDEN, dropout_p=-0.1)
    intermediate, _ = bert_blocks(act="relu")
    with pytest.raises(OpError, match="is not a GELU"):
        FusedMLP.from_bert(intermediate, bert_blocks()[1])


def test_registered_as_fused_mlp():
    assert OPS.get("fused_mlp") is FusedMLP


def test_bfloat16_under_cpu_autocast_matches_autocast_reference():
    block = gpt2_mlp(dropout=0.0)
    mlp = FusedMLP.from_gpt2(block)
    x = hidden_states()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = mlp(x), block(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    got.float().sum().backward()
    assert x.grad.dtype == torch.float32 and block.c_fc.weight.grad.dtype == torch.float32
