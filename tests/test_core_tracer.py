"""Tracing Hugging Face BERT / GPT-2 keeps what the model computes, its parameters and its keys."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import slapo_lightning as slapo
import tiny_models

MODELS = {"bert": (tiny_models.bert, "bert.encoder.layer.*"), "gpt2": (tiny_models.gpt2, "transformer.h.*")}


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_traced_hierarchically_computes_the_same(name, impl, padded):
    build, layers = MODELS[name]
    model = build(impl)
    original = copy.deepcopy(model)
    inputs = tiny_models.batch(padded)
    sch = slapo.create_schedule(model, example_inputs=inputs)
    for layer in sch.select(layers):
        layer.trace(flatten=False)
    traced_layers = [l.mod for l in sch.select(layers)]
    assert traced_layers and all(isinstance(m, fx.GraphModule) for m in traced_layers)
    attention = "attention.self" if name == "bert" else "attn"
    assert isinstance(sch[layers.replace("*", "0") + "." + attention].mod, fx.GraphModule)
    slapo.verify(original, model, inputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_model_flattened(name, impl):
    build, _ = MODELS[name]
    model = build(impl)
    original = copy.deepcopy(model)
    inputs = tiny_models.batch(padded=True)
    sch = slapo.create_schedule(model, example_inputs=inputs)
    sch.trace(flatten=True)
    assert isinstance(sch.mod, fx.GraphModule)
    slapo.verify(original, sch.mod, inputs, rtol=1e-4, atol=1e-5)
    assert type(sch.mod(**inputs)).__name__ == type(original(**inputs)).__name__


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_buffers_and_parameters_unchanged(name):
    build, _ = MODELS[name]
    model = build()
    keys = list(model.state_dict())
    buffers = [n for n, _ in model.named_buffers()]
    params = {n: p for n, p in model.named_parameters()}
    sch = slapo.create_schedule(model)
    sch.trace(flatten=False)
    assert list(sch.mod.state_dict()) == keys
    assert [n for n, _ in sch.mod.named_buffers()] == buffers
    assert all(p is params[n] for n, p in sch.mod.named_parameters())
    assert not any("_tensor_constant" in k for k in sch.mod.state_dict())


def test_dropout_follows_train_and_eval_whatever_mode_it_was_traced_in():
    for trace_in_training in (True, False):
        model = tiny_models.bert("eager")
        model.config.attention_probs_dropout_prob = 0.5
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.5
        original = copy.deepcopy(model)
        inputs = tiny_models.batch(padded=True)
        model.train(trace_in_training)
        sch = slapo.create_schedule(model, example_inputs=inputs)
        sch["bert.encoder.layer.0"].trace(flatten=True)
        for a, b in ((original, model),):
            a.eval(), b.eval()
            assert torch.equal(a(**inputs).logits, b(**inputs).logits)
            a.train(), b.train()
            torch.manual_seed(3)
            train_a = a(**inputs).logits
            torch.manual_seed(3)
            train_b = b(**inputs).logits
            assert torch.equal(train_a, train_b)
            a.eval()
            assert not torch.equal(train_a, a(**inputs).logits)


def test_a_call_of_another_kind_gets_its_own_specialisation_instead_of_an_error():
    model = tiny_models.gpt2("sdpa")
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model, example_inputs=tiny_models.batch(padded=False))
    sch.trace(flatten=True, example_inputs=tiny_models.batch(padded=False))
    assert len(sch.mod.specialisations) == 1
    padded = tiny_models.batch(padded=True)
    slapo.verify(original, sch.mod, padded, rtol=1e-4, atol=1e-5)
    assert len(sch.mod.specialisations) == 2
    assert sch.mod.specialisations[1].origin == "run time"
    slapo.verify(original, sch.mod, tiny_models.batch(padded=False), rtol=1e-4, atol=1e-5)
    assert len(sch.mod.specialisations) == 2


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()

    def forward(self, x):
        return self.inner(x) + 1


def test_trace_error_names_the_module_path_and_construct():
    sch = slapo.create_schedule(Holder())
    with pytest.raises(slapo.TraceError, match=r"inner: `bool\(\)` on traced value"):
        sch["inner"].trace()


def test_example_inputs_resolve_python_control_flow():
    model = Holder()
    x = torch.ones(3)
    sch = slapo.create_schedule(model, example_inputs=(x,))
    sch.trace()
    assert isinstance(sch["inner"].mod, fx.GraphModule)
    assert torch.equal(model(x), x * 2 + 1)


class FixedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.tensor(2.0)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        return F.dropout(x, 0.5, training=False) * self.scale


def test_dropout_the_code_turned_off_stays_off_and_tensor_attributes_survive():
    model = FixedDropout()
    sch = slapo.create_schedule(model)
    sch.trace()
    x = torch.ones(64)
    sch.mod.train()
    assert torch.equal(sch.mod(x), x * 2)
    assert list(sch.mod.state_dict()) == []


def test_retraced_module_keeps_original_keys_for_loading():
    from slapo_lightning.op import FusedQKV
    from slapo_lightning.pattern import call_module

    model = tiny_models.bert()
    sch = slapo.create_schedule(model, example_inputs=tiny_models.batch(padded=True))
    attention = sch["bert.encoder.layer.0.attention.self"]
    found = attention.find(lambda x: call_module("query|key|value", x))
    mod = attention.mod
    attention.replace(FusedQKV.from_linears(mod.query, mod.key, mod.value, n_heads=tiny_models.HEADS), found)
    sch["bert.encoder.layer.0.attention"].trace(flatten=True)
    plain = tiny_models.bert(seed=1)
    model.load_state_dict(plain.state_dict(), strict=True)
    slapo.verify(plain, model, tiny_models.batch(padded=True), rtol=1e-4, atol=1e-5)


def test_a_traced_hf_module_can_be_traced_again_flattened():
    model = tiny_models.bert()
    original = copy.deepcopy(model)
    inputs = tiny_models.batch(padded=True)
    sch = slapo.create_schedule(model, example_inputs=inputs)
    attention = sch["bert.encoder.layer.0.attention"]
    attention.trace()
    attention.trace(flatten=True)
    assert attention.mod._slapo_flatten
    slapo.verify(original, model, inputs, rtol=1e-4, atol=1e-5)
    model.train(), original.train()
    torch.manual_seed(0)
    a = original(**inputs).logits
    torch.manual_seed(0)
    assert torch.equal(a, model(**inputs).logits)
