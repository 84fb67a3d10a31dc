"""Tokenize documents and pack them into fixed-length blocks.

Packing (documents joined by a separator token, cut into equal blocks, the tail dropped) wastes no
compute on padding and gives every batch the same number of tokens, which keeps throughput and
the loss comparable between steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from ..errors import RecipeError, unknown
from .resumable import key_generator, key_index

OBJECTIVES = ("clm", "mlm")
IGNORE_INDEX = -100


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str], separator_id: int) -> np.ndarray:
    """All documents' token ids, each followed by ``separator_id``, as one int64 array."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = []
    for encoding in encodings:
        pieces.append(np.asarray(encoding.ids, dtype=np.int64))
        pieces.append(np.asarray([separator_id], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def pack_blocks(stream: np.ndarray, block_len: int) -> torch.Tensor:
    """``stream`` cut into ``(n, block_len)`` rows; the incomplete tail is dropped."""
    n = len(stream) // block_len
    return torch.from_numpy(stream[: n * block_len].reshape(n, block_len).copy())


def wrap_blocks(blocks: torch.Tensor, first_id: int, last_id: int) -> torch.Tensor:
    """Each row framed as ``[first] row [last]`` (BERT's ``[CLS] ... [SEP]``)."""
    n = blocks.shape[0]
    first = torch.full((n, 1), first_id, dtype=blocks.dtype)
    last = torch.full((n, 1), last_id, dtype=blocks.dtype)
    return torch.cat([first, blocks, last], dim=1)


class PackedBlocks(Dataset):
    """Fixed-length token blocks; items are the dicts the LightningModules expect (stacked by ``default_collate``).

    For causal LM an item is ``{input_ids, labels}`` (labels are the inputs; the module shifts
    them). For masked LM (``masking`` given) it is ``{input_ids, attention_mask, labels}`` with
    BERT's dynamic masking drawn for that item alone: the key a sampler yields, ``(epoch, index)``
    (or a plain index, epoch 0), seeds it, so every epoch masks anew while a resumed run, another
    rank count or another number of workers masks a given item of a given epoch alike, and the
    validation split is masked the same way at every validation.
    """

    def __init__(self, blocks: torch.Tensor, objective: str, special_ids: list[int] | None = None,
                 masking: "MLMMasking | None" = None):
        self.blocks = blocks
        self.objective = objective
        self.special = torch.isin(blocks, torch.tensor(special_ids or [], dtype=blocks.dtype))
        self.masking = masking

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        index = key_index(key)
        ids = self.blocks[index]
        if self.objective == "clm":
            return {"input_ids": ids, "labels": ids}
        if self.masking is None:
            return {"input_ids": ids, "special_tokens_mask": self.special[index].long()}
        inputs, labels = self.masking(ids, self.special[index], key_generator(self.masking.seed, key))
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}


@dataclass(frozen=True)
class MLMMasking:
    """BERT's masking of one block: ``probability`` of the non-special tokens are predicted; of
    those 80% become ``[MASK]``, 10% a random token, 10% stay (the rates of transformers'
    ``DataCollatorForLanguageModeling``)."""

    mask_id: int
    vocab_size: int
    probability: float = 0.15
    seed: int = 0

    def __call__(self, ids: torch.Tensor, special: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        chance = torch.full(ids.shape, self.probability).masked_fill_(special, 0.0)
        masked = torch.bernoulli(chance, generator=generator).bool()
        labels = ids.masked_fill(~masked, IGNORE_INDEX)
        draws = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[masked & (draws < 0.8)] = self.mask_id
        replaced = masked & (draws >= 0.8) & (draws < 0.9)
        inputs[replaced] = torch.randint(self.vocab_size, ids.shape, generator=generator, dtype=ids.dtype)[replaced]
        return inputs, labels


def build_blocks(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], objective: str, seq_len: int, split: str,
    mlm_probability: float | None = None, seed: int = 0,
) -> PackedBlocks:
    """Tokenize ``texts`` and pack them for ``objective`` into blocks of exactly ``seq_len`` tokens
    (masked LM items are masked with ``mlm_probability`` when it is given)."""
    if objective not in OBJECTIVES:
        raise RecipeError(unknown("data.objective", objective, OBJECTIVES))
    if objective == "clm":
        stream = token_stream(tokenizer, texts, tokenizer.eos_token_id)
        blocks = pack_blocks(stream, seq_len)
        special_ids: list[int] = []
    else:
        if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
            raise RecipeError("data.objective=mlm needs a tokenizer with [CLS], [SEP] and [MASK] (data.tokenizer_kind=wordpiece)")
        stream = token_stream(tokenizer, texts, tokenizer.sep_token_id)
        blocks = wrap_blocks(pack_blocks(stream, seq_len - 2), tokenizer.cls_token_id, tokenizer.sep_token_id)
        special_ids = list(tokenizer.all_special_ids)
    if blocks.shape[0] == 0:
        raise RecipeError(
            f"data: the {split} split has {len(stream)} tokens, fewer than one block of data.seq_len={seq_len}; "
            "give more text (data.max_chars, data.paths) or a shorter data.seq_len"
        )
    masking = None
    if objective == "mlm" and mlm_probability is not None:
        masking = MLMMasking(tokenizer.mask_token_id, len(tokenizer), mlm_probability, seed)
    return PackedBlocks(blocks, objective, special_ids, masking)
