"""Traced layers compute what the original computes, on every kind of batch a padding collator
makes: padded, unpadded (HF then hands layers ``attention_mask=None``) and the two alternating,
in either order, in train and eval mode, for six architectures, with ``flatten`` false and true.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import slapo_lightning as slapo
from slapo_lightning.core import TracedModule

VOCAB, SEQ = 101, 10
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
P = 0.1  # dropout on, so train mode also checks that traced code draws the same random numbers


def bert(impl):
    return tf.BertForMaskedLM(tf.BertConfig(**TINY, hidden_dropout_prob=P, attention_probs_dropout_prob=P,
                                            attn_implementation=impl))


def roberta(impl):
    return tf.RobertaForMaskedLM(tf.RobertaConfig(**TINY, hidden_dropout_prob=P, attention_probs_dropout_prob=P,
                                                  pad_token_id=1, attn_implementation=impl))


def gpt2(impl):
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, attn_implementation=impl))


def gpt_neo(impl):
    return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                                attention_types=[[["global", "local"], 1]], window_size=4,
                                                max_position_embeddings=64, embed_dropout=P, attention_dropout=P,
                                                resid_dropout=P, attn_implementation=impl))


def opt(impl):
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                          num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                          dropout=P, attention_dropout=P, attn_implementation=impl))


def llama(impl):
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                              max_position_embeddings=64, attention_dropout=P,
                                              attn_implementation=impl))


ARCHITECTURES = {"bert": bert, "roberta": roberta, "gpt2": gpt2, "gpt_neo": gpt_neo, "opt": opt, "llama": llama}


def build(name: str, impl: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name](impl)


def batch(padded: bool, seed: int = 1, seq: int = SEQ) -> dict:
    """Token ids (never the pad id 1), with an attention mask; ``padded``: row 1 ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, seq), generator=generator)
    mask = torch.ones(2, seq, dtype=torch.long)
    if padded:
        mask[1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def layer_paths(model: nn.Module) -> list[str]:
    """The model's repeated layers: its ``_no_split_modules`` classes."""
    classes = set(model._no_split_modules)
    return [path for path, m in model.named_modules() if type(m).__name__ in classes]


def run(model: nn.Module, inputs: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(**inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(original: nn.Module, traced: nn.Module, inputs: dict, seed: int, what: str) -> None:
    expected, expected_grads = run(original, inputs, seed)
    got, grads = run(traced, inputs, seed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: outputs: {m}")
    assert grads.keys() == expected_grads.keys(), what
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: grad {name}: {m}")


ORDERS = {"unpadded-first": (False, True, False), "padded-first": (True, False, True)}


IMPLEMENTATIONS = [(name, impl) for name in sorted(ARCHITECTURES) for impl in ("sdpa", "eager")
                   if not (name == "gpt_neo" and impl == "sdpa")]  # GPT-Neo has no sdpa path in transformers


def cases() -> list:
    """Every architecture, implementation, flatten and order; CI runs one order per flatten setting
    (the two orders between them), the full matrix runs with the slow tests."""
    found = []
    for name, impl in IMPLEMENTATIONS:
        for flatten in (False, True):
            for order in sorted(ORDERS):
                fast = (order == "padded-first") != flatten
                found.append(pytest.param(name, impl, flatten, order, marks=() if fast else pytest.mark.slow,
                                          id=f"{name}-{impl}-{'flatten' if flatten else 'hierarchy'}-{order}"))
    return found


@pytest.mark.parametrize("name,impl,flatten,order", cases())
def test_traced_layers_equal_the_original_on_every_kind_of_batch(name, impl, flatten, order):
    model = build(name, impl)
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)
    paths = layer_paths(model)
    assert len(paths) >= 2
    for path in paths:
        sch[path].trace(flatten=flatten)
    layers = [sch[p].mod for p in paths]
    assert all(isinstance(m, TracedModule) for m in layers)
    assert list(model.state_dict()) == list(original.state_dict())
    for step, padded in enumerate(ORDERS[order]):
        for training in (True, False):
            original.train(training), model.train(training)
            what = f"{name}/{impl} flatten={flatten} call {step} ({'padded' if padded else 'unpadded'}, " \
                   f"{'train' if training else 'eval'})"
            assert_same(original, model, batch(padded, seed=step), seed=step, what=what)
    assert all(spec.origin == "setup" for m in layers for spec in m.specialisations), \
        "setup built every variant a padding collator produces"


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_whole_model_flattened_follows_masks_that_come_and_go(name):
    model = build(name, "sdpa")
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)
    sch.trace(flatten=True)
    for step, inputs in enumerate([batch(False), batch(True), {"input_ids": batch(False)["input_ids"]}, batch(True)]):
        for training in (True, False):
            original.train(training), model.train(training)
            assert_same(original, model, inputs, seed=step, what=f"{name} call {step} training={training}")


def test_other_sequence_lengths_and_batch_sizes_reuse_the_specialisations():
    model = build("llama", "sdpa")
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model)
    for path in layer_paths(model):
        sch[path].trace()
    layer = sch[layer_paths(model)[0]].mod
    before = len(layer.specialisations)
    for seq in (3, 7, 16):
        for padded in (False, True):
            assert_same(original, model, batch(padded, seed=seq, seq=seq), seed=seq, what=f"seq {seq}")
    assert len(layer.specialisations) == before
