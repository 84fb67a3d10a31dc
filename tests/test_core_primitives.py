"""replace / decompose / fuse / checkpoint / build / verify keep what the model computes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slapo_lightning as slapo
from slapo_lightning.op import FusedQKV, LinearWithSeparateBias
from slapo_lightning.pattern import call_module
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper


class Attention(nn.Module):
    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(hidden)
        self.heads = heads

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(x.shape)
        return self.norm(self.dropout(self.dense(out)) + x)


def qkv_pattern(x):
    return call_module(r"query|key|value", x)


def inputs():
    return (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),)


def test_horizontal_replace_with_weight_preserving_op_keeps_outputs_grads_and_state_keys():
    model = Attention()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    sch = slapo.create_schedule(model)
    found = sch.find(qkv_pattern)
    assert len(found) == 3
    new = sch.replace(FusedQKV.from_linears(model.query, model.key, model.value, n_heads=4), found)
    assert sch["FusedQKV_0"].mod is new
    assert not hasattr(sch.mod, "query")
    slapo.verify(original, sch.mod, inputs(), rtol=1e-5, atol=1e-6)
    assert sorted(sch.mod.state_dict()) == sorted(keys)
    plain = Attention()
    plain.load_state_dict(sch.mod.state_dict(), strict=True)
    slapo.verify(original, plain, inputs())
    other = Attention()
    sch.mod.load_state_dict(other.state_dict(), strict=True)
    slapo.verify(other, sch.mod, inputs(), rtol=1e-5, atol=1e-6)


class Scaled(nn.Module):
    def forward(self, q, k, v, attention_mask=None, p=0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=p)


def test_vertical_replace_binds_by_name_then_position_and_names_children():
    model = Attention()
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    sch.replace(Scaled(), sch.find(sdpa), concrete_args={"p": 0.0})
    assert isinstance(sch["Scaled_0"].mod, Scaled)
    slapo.verify(original, sch.mod, inputs())


def test_failing_replace_changes_nothing_and_says_why():
    model = Attention()
    sch = slapo.create_schedule(model)
    found = sch.find(qkv_pattern)
    before = sch.mod.code

    class NeedsMore(nn.Module):
        def forward(self, x, scale):
            return x * scale

    with pytest.raises(slapo.ReplaceError, match=r"needs scale"):
        sch.replace(NeedsMore(), found[0])
    with pytest.raises(slapo.ReplaceError, match=r"concrete_args 'nope' is not a parameter"):
        sch.replace(NeedsMore(), found[0], concrete_args={"nope": 1})
    with pytest.raises(slapo.ReplaceError, match="matched nothing"):
        sch.replace(NeedsMore(), [])
    assert sch.mod.code == before and list(sch.mod.named_children()) == list(model.named_children())


def test_decompose_reuses_the_parameters():
    model = Attention()
    weight, bias = model.dense.weight, model.dense.bias
    sch = slapo.create_schedule(model)
    sch["dense"].decompose()
    assert isinstance(model.dense, LinearWithSeparateBias)
    assert model.dense.weight is weight and model.dense.bias is bias
    with pytest.raises(slapo.ScheduleError, match="expected nn.Linear"):
        sch["norm"].decompose()


@pytest.mark.parametrize("compiler", [None, "TorchScript"])
def test_fuse_bias_dropout_residual_layernorm(compiler):
    model = Attention()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    sch = slapo.create_schedule(model)
    sch["dense"].decompose()
    sch.trace(flatten=True)

    def pattern(x, bias, residual):
        return F.layer_norm(F.dropout(x + bias) + residual, 16)

    (found,) = [sch.find(pattern)]
    assert len(found) == 1
    sch.fuse(found, compiler=compiler, name="FusedLN")
    assert "FusedLN_0" in sch.child
    assert list(sch.mod.state_dict()) == keys
    slapo.verify(original, sch.mod, inputs(), rtol=1e-5, atol=1e-6)
    model.train(), original.train()
    torch.manual_seed(0)
    a = original(*inputs())
    torch.manual_seed(0)
    b = model(*inputs())
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_fuse_with_inductor():
    model = Attention()
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)
    sch["dense"].decompose()
    sch.trace(flatten=True)
    sch.fuse(sch.find(lambda x, bias: F.dropout(x + bias)), compiler="inductor", name="BiasDropout")
    slapo.verify(original, sch.mod, inputs(), rtol=1e-5, atol=1e-6)


def test_checkpoint_module_and_subgraph_keep_outputs_grads_and_keys():
    model = Attention()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    sch = slapo.create_schedule(model)
    sch["dense"].checkpoint()
    sch.trace(flatten=True)
    sch.checkpoint(sch.find(lambda x: F.scaled_dot_product_attention(x, x, x)) or
                   sch.find(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)))
    assert list(sch.mod.state_dict()) == keys
    called = {n.target for n in sch.mod.graph.nodes if n.op == "call_module"}
    assert "dense" in called and "Checkpoint_0" in called  # the flatten trace kept the wrapped region
    assert isinstance(sch.mod.dense, CheckpointWrapper) and isinstance(sch.mod.Checkpoint_0, CheckpointWrapper)
    slapo.verify(original, sch.mod, inputs(), rtol=1e-5, atol=1e-6)


def test_build_keeps_weights_unless_asked_and_makes_an_optimizer():
    model = Attention()
    weight = model.dense.weight.detach().clone()
    sch = slapo.create_schedule(model)
    built, opt = slapo.build(sch, init_weights=False, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert built is model and torch.equal(model.dense.weight, weight)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    built, opt = slapo.build(sch, init_weights=True)
    assert opt is None and not torch.equal(model.dense.weight, weight)


def test_verify_names_the_worst_tensor():
    model = Attention()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.norm.bias.add_(1.0)
    with pytest.raises(slapo.VerificationError, match=r"output: max abs error"):
        slapo.verify(model, broken, inputs())


def test_replacement_follows_the_mode_of_an_eval_model():
    model = Attention().eval()
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    new = sch.replace(Scaled(), sch.find(sdpa), concrete_args={"p": 0.5})
    assert not new.training
    assert torch.equal(model(*inputs()), original(*inputs()))


def test_verify_accepts_equal_nan_and_inf_and_leaves_the_callers_rng_alone():
    x = torch.tensor([1.0, float("nan"), float("inf")])
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    slapo.verify(nn.Identity(), nn.Identity(), (x,), grads=False)
    assert torch.equal(torch.rand(1), expected)


def test_a_pattern_parameter_held_inside_a_module_call_is_a_pattern_error():
    sch = slapo.create_schedule(Attention())
    with pytest.raises(slapo.PatternError, match="held inside a module call"):
        sch.find(lambda x, w, b: F.linear(x, w, b))


def test_python_replace_with_an_op_that_takes_over_parameters_keeps_the_original_keys():
    import tiny_models
    from slapo_lightning.op import FusedMLP

    model = tiny_models.gpt2()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    sch = slapo.create_schedule(model)
    for mlp in sch.select("transformer.h.*.mlp"):
        mlp.replace(FusedMLP.from_gpt2(mlp.mod))
    assert isinstance(model.transformer.h[0].mlp, FusedMLP)
    assert sorted(model.state_dict()) == sorted(keys)
    plain = tiny_models.gpt2(seed=3)
    model.load_state_dict(plain.state_dict(), strict=True)
    slapo.verify(plain, model, tiny_models.batch(padded=False), rtol=1e-4, atol=1e-5)
    original.load_state_dict(model.state_dict(), strict=True)


class Chain(nn.Module):
    """An element-wise chain after a Linear: every op saves tensors for backward."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 16)

    def forward(self, x):
        h = self.dense(x)
        return torch.tanh(torch.sigmoid(h) * torch.exp(h) + h).sum(-1)


def saved_tensors(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many tensors the forward saves for backward, and the gradient of x."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return count, x.grad


def test_checkpointed_subgraph_recomputes_in_backward():
    model = Chain()
    original = copy.deepcopy(model)
    x = torch.randn(4, 16)
    sch = slapo.create_schedule(model)
    sch.trace(flatten=True)
    chain = sch.find(lambda h: torch.tanh(torch.sigmoid(h) * torch.exp(h) + h))
    assert len(chain) == 1
    sch.checkpoint(chain)
    plain_saved, plain_grad = saved_tensors(original, x)
    saved, grad = saved_tensors(sch.mod, x)
    assert saved < plain_saved, f"{saved} tensors saved with checkpointing, {plain_saved} without"
    torch.testing.assert_close(grad, plain_grad)
    slapo.verify(original, sch.mod, (x,), rtol=1e-6, atol=1e-6)
