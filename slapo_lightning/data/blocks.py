"""Tokenize documents and pack them into fixed-length blocks.

Packing (documents joined by a separator token, cut into equal blocks, the tail dropped) wastes no
compute on padding and gives every batch the same number of tokens, which keeps throughput and
the loss comparable between steps.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from ..errors import RecipeError

OBJECTIVES = ("clm", "mlm")


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
    """Fixed-length token blocks; items are the dicts the collators and LightningModules expect.

    For causal LM an item is ``{input_ids, labels}`` (labels are the inputs; the module shifts
    them). For masked LM it is ``{input_ids, special_tokens_mask}`` and the collator masks.
    """

    def __init__(self, blocks: torch.Tensor, objective: str, special_ids: list[int] | None = None):
        self.blocks = blocks
        self.objective = objective
        self.special = torch.isin(blocks, torch.tensor(special_ids or [], dtype=blocks.dtype)).long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        if self.objective == "clm":
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "special_tokens_mask": self.special[index]}


def build_blocks(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], objective: str, seq_len: int, split: str
) -> PackedBlocks:
    """Tokenize ``texts`` and pack them for ``objective`` into blocks of exactly ``seq_len`` tokens."""
    if objective not in OBJECTIVES:
        raise RecipeError(f"data.objective={objective!r} is unknown; valid: {', '.join(OBJECTIVES)}")
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
    return PackedBlocks(blocks, objective, special_ids)
