"""Tiny BERT / GPT-2 models and batches (random init, nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

HIDDEN, HEADS, LAYERS, VOCAB, SEQ = 32, 4, 2, 97, 8


def bert(attn_implementation: str = "sdpa", seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=64)
    config._attn_implementation = attn_implementation
    return BertForMaskedLM(config)


def gpt2(attn_implementation: str = "sdpa", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config)


def batch(padded: bool, seed: int = 1) -> dict:
    """Token ids; with ``padded`` the second row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}
