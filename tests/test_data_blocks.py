"""Packing into fixed-length blocks, MLM masking by the collator, and the DataModule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slapo_lightning.data import TextDataModule
from slapo_lightning.data.blocks import build_blocks, pack_blocks, token_stream
from slapo_lightning.errors import RecipeError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


def datamodule(cache_dir, objective: str, **kwargs) -> TextDataModule:
    settings = dict(
        objective=objective, tokenizer_kind="byte_bpe" if objective == "clm" else "wordpiece", vocab_size=1000,
        max_chars=200_000, seq_len=64, batch_size=8, cache_dir=str(cache_dir),
    )
    return TextDataModule(**{**settings, **kwargs})


def test_pack_blocks_drops_the_tail():
    blocks = pack_blocks(np.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_clm_blocks_join_documents_with_end_of_text(cache_dir):
    dm = datamodule(cache_dir, "clm")
    tokenizer = dm.tokenizer
    texts = ["a = 1\n", "b = 2\n"]
    stream = token_stream(tokenizer, texts, tokenizer.eos_token_id)
    assert (stream == tokenizer.eos_token_id).sum() == 2 and stream[-1] == tokenizer.eos_token_id
    dataset = build_blocks(tokenizer, texts * 50, "clm", 16, "train")
    assert dataset.blocks.shape == (len(token_stream(tokenizer, texts * 50, tokenizer.eos_token_id)) // 16, 16)
    item = dataset[0]
    assert torch.equal(item["input_ids"], item["labels"])


def test_datamodule_batches_have_fixed_shapes(cache_dir):
    dm = datamodule(cache_dir, "clm")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 64) and batch["labels"].shape == (8, 64)
    assert len(dm.val_set) > 0 and dm.val_set.blocks.shape[1] == 64


def test_datamodule_is_deterministic(cache_dir):
    first, second = datamodule(cache_dir, "clm"), datamodule(cache_dir, "clm")
    first.setup(), second.setup()
    assert torch.equal(first.train_set.blocks, second.train_set.blocks)
    assert torch.equal(first.val_set.blocks, second.val_set.blocks)


def test_mlm_masking_rates_and_labels(cache_dir):
    dm = datamodule(cache_dir, "mlm", batch_size=256)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    blocks = dm.train_set.blocks[:256]
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    batch = dm.collate([dm.train_set[i] for i in range(len(blocks))])
    labels, inputs = batch["labels"], batch["input_ids"]
    masked = labels != -100
    special = torch.isin(blocks, torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any(), "special tokens are never masked"
    assert torch.equal(labels[masked], blocks[masked]), "labels hold the original token where masked"
    rate = masked.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    as_mask = (inputs[masked] == tokenizer.mask_token_id).float().mean()
    unchanged = (inputs[masked] == blocks[masked]).float().mean()
    assert 0.75 < as_mask < 0.85 and 0.06 < unchanged < 0.15
    assert torch.equal(inputs[~masked], blocks[~masked])


def test_too_little_text_for_one_block_is_named(cache_dir):
    dm = datamodule(cache_dir, "clm")
    with pytest.raises(RecipeError, match="fewer than one block"):
        build_blocks(dm.tokenizer, ["x"], "clm", 64, "validation")


def test_unknown_objective_is_named():
    with pytest.raises(RecipeError, match="clm, mlm"):
        TextDataModule(objective="seq2seq")


def test_ranks_that_train_the_tokenizer_at_once_use_the_cached_copy(tmp_path, monkeypatch):
    """Two DDP ranks on a cold cache both train (WordPiece training is not deterministic); the one
    whose rename loses must tokenize with the winner's copy, not its own."""
    from slapo_lightning.data import tokenizer as tokenizers

    first = datamodule(tmp_path / "first", "mlm", max_chars=20_000, vocab_size=400)
    first.tokenizer
    name = first.tokenizer_dir.name  # the cache entry's name depends on corpus, kind and size only
    train = tokenizers.TRAINERS["wordpiece"]
    winner = train(["zebra quokka axolotl narwhal " * 20] * 50, 400)  # "the other rank's" tokenizer

    def train_while_another_rank_wins(texts, vocab_size):
        own = train(texts, vocab_size)
        winner.save_pretrained(str(tmp_path / "second" / "tokenizers" / name))
        return own

    monkeypatch.setitem(tokenizers.TRAINERS, "wordpiece", train_while_another_rank_wins)
    second = datamodule(tmp_path / "second", "mlm", max_chars=20_000, vocab_size=400)
    assert second.tokenizer.get_vocab() == winner.get_vocab() != first.tokenizer.get_vocab()
