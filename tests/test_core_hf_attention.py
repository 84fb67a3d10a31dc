"""Replacing the attention core inside a traced BERT layer / GPT-2 block with FlashAttentionOp."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import slapo_lightning as slapo
import tiny_models
from slapo_lightning.op.attention import FlashAttentionOp

SCALE = (tiny_models.HIDDEN // tiny_models.HEADS) ** -0.5


def bert_eager_core(query, key, value, attention_mask):
    weights = torch.matmul(query, key.transpose(2, 3)) * SCALE
    weights = F.softmax(weights + attention_mask, dim=-1)
    return torch.matmul(F.dropout(weights, p=0.1), value)


def gpt2_eager_core(query, key, value, attention_mask):
    weights = torch.matmul(query, key.transpose(-1, -2)) * SCALE
    weights = F.softmax(weights + attention_mask, dim=-1).type(value.dtype)
    return torch.matmul(F.dropout(weights, p=0.1), value)


def gpt2_sdpa_causal(query, key, value, p):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=p, scale=SCALE, is_causal=True)


def replace_core(model, layers, pattern, inputs, causal, **concrete):
    original = copy.deepcopy(model)
    sch = slapo.create_schedule(model, example_inputs=inputs)
    for layer in sch.select(layers):
        layer.trace(flatten=True)
        found = layer.find(pattern)
        assert len(found) == 1, f"{layer.path}: {len(found)} matches"
        layer.replace(FlashAttentionOp("sdpa", apply_causal_mask=causal), found, concrete_args=concrete or None)
        assert "FlashAttentionOp_0" in layer.child
    slapo.verify(original, model, inputs, rtol=1e-4, atol=1e-5)


def test_bert_eager_layer_with_padding():
    replace_core(tiny_models.bert("eager"), "bert.encoder.layer.*", bert_eager_core, tiny_models.batch(padded=True),
                 causal=False, p=0.1)


def test_gpt2_eager_block_with_padding():
    replace_core(tiny_models.gpt2("eager"), "transformer.h.*", gpt2_eager_core, tiny_models.batch(padded=True),
                 causal=False, p=0.1)


def test_gpt2_sdpa_block_causal():
    replace_core(tiny_models.gpt2("sdpa"), "transformer.h.*", gpt2_sdpa_causal, tiny_models.batch(padded=False),
                 causal=True)
