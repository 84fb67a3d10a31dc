"""The Slapo "Quick Start" tutorial, runnable offline.

Every schedule call is as the tutorial writes it. Differences: ``import slapo_lightning as slapo``,
and the BERT-large config is built locally (``BertConfig`` with bert-large-uncased's sizes) instead
of ``AutoConfig.from_pretrained`` -- nothing is downloaded; weights are random.

Run: ``python examples/quick_start.py [--layers 24 --hidden 1024]``.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel

import slapo_lightning as slapo


def bert_large_config(layers: int = 24, hidden: int = 1024, heads: int = 16) -> BertConfig:
    """bert-large-uncased's architecture (hidden 1024, 24 layers, 16 heads, FFN 4096)."""
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=512, is_decoder=True)


def schedule_bert(bert: BertLMHeadModel, verbose: bool = False):
    """The tutorial's schedule on the first layer's FFN; returns (schedule, subgraphs)."""
    show = print if verbose else (lambda *a, **k: None)
    sch = slapo.create_schedule(bert)
    show(sch.mod)
    subsch = sch["bert.encoder.layer.0.attention"]
    show(subsch.mod)
    subsch = sch["bert.encoder.layer.0.intermediate"]
    show(subsch.mod)
    subsch["dense"].decompose()
    show(subsch.mod)
    subsch.trace(flatten=True)
    show(subsch.mod)

    def bias_gelu_pattern(x, bias):
        return F.gelu(x + bias)

    subgraphs = subsch.find(bias_gelu_pattern)
    show(subgraphs)
    subsch.fuse(subgraphs, compiler="TorchScript", name="FusedBiasGeLU")
    show(subsch.mod)
    return sch, subgraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    bert = BertLMHeadModel(bert_large_config(args.layers, args.hidden, args.heads))
    original = copy.deepcopy(bert)
    sch, _ = schedule_bert(bert, verbose=True)
    model, _ = slapo.build(sch, init_weights=False)
    input_ids = torch.randint(0, bert.config.vocab_size, (2, 16))
    errors = slapo.verify(original, model, {"input_ids": input_ids}, rtol=1e-4, atol=1e-5)
    print(f"verified: outputs and gradients match (max abs error {max(errors.values()):.2e})")


if __name__ == "__main__":
    main()
