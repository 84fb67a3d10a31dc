"""The tests' tiny BERT / GPT-2 models, batches and shipped specs (hidden 64, 2 layers, 4 heads,
sequence 16; random init, nothing downloaded): the one fixture module of the core, spec, callback
and recipe tests."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import slapo_lightning

HIDDEN, HEADS, LAYERS, VOCAB, SEQ = 64, 4, 2, 97, 16
SCHEDULES = Path(slapo_lightning.__file__).parent / "configs" / "schedule"
BERT_SPEC, GPT2_SPEC = SCHEDULES / "bert.yaml", SCHEDULES / "gpt2.yaml"

BERT_SIZES = {"tiny": dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                           intermediate_size=4 * HIDDEN, max_position_embeddings=2 * SEQ)}
GPT2_SIZES = {"tiny": dict(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_positions=2 * SEQ)}


def bert(attn_implementation: str = "sdpa", seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, **BERT_SIZES["tiny"], attn_implementation=attn_implementation))


def gpt2(attn_implementation: str = "sdpa", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, **GPT2_SIZES["tiny"], bos_token_id=0, eos_token_id=0,
                                      attn_implementation=attn_implementation))


MODELS = {"bert": (bert, BERT_SPEC), "gpt2": (gpt2, GPT2_SPEC)}


def inputs(padded: bool = False, seed: int = 1, batch: int = 2) -> dict[str, torch.Tensor]:
    """Token ids; with ``padded`` the last row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=generator)
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[-1, SEQ - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def training_batches(n: int, mlm: bool, seed: int = 0, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Batches shaped like the data module's: MLM with an all-ones mask and 20% labels, CLM ids=labels."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=generator)
        if mlm:
            labels = torch.full_like(ids, -100)
            labels[:, ::5] = ids[:, ::5]
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def batch(padded: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of token ids; with ``padded`` the second row ends in three padding positions."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}
