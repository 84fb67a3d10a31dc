"""Local tokenizers: training, the on-disk cache and loading from a directory."""
from __future__ import annotations

import pytest

from slapo_lightning.data.corpus import stdlib_files
from slapo_lightning.data.tokenizer import load_tokenizer, train_or_load_tokenizer
from slapo_lightning.errors import RecipeError

TEXTS = [p.read_text(encoding="utf-8") for p in stdlib_files()[:6]]


@pytest.mark.parametrize("kind", ["byte_bpe", "wordpiece"])
def test_tokenizer_is_trained_once_then_reused_from_the_cache(tmp_path, kind):
    first, directory, trained = train_or_load_tokenizer(kind, 500, TEXTS, "fingerprint", tmp_path)
    assert trained and (directory / "tokenizer.json").is_file()
    second, directory2, trained2 = train_or_load_tokenizer(kind, 500, TEXTS, "fingerprint", tmp_path)
    assert not trained2 and directory2 == directory
    assert second.get_vocab() == first.get_vocab()
    sample = "def main(argv):\n    return argv[0]\n"
    assert second(sample)["input_ids"] == first(sample)["input_ids"]


def test_cache_key_covers_corpus_kind_and_size(tmp_path):
    _, base, _ = train_or_load_tokenizer("byte_bpe", 500, TEXTS, "a", tmp_path)
    _, other_corpus, trained = train_or_load_tokenizer("byte_bpe", 500, TEXTS, "b", tmp_path)
    _, other_size, _ = train_or_load_tokenizer("byte_bpe", 600, TEXTS, "a", tmp_path)
    _, other_kind, _ = train_or_load_tokenizer("wordpiece", 500, TEXTS, "a", tmp_path)
    assert trained and len({base, other_corpus, other_size, other_kind}) == 4


def test_byte_bpe_round_trips_text(tmp_path):
    tokenizer, _, _ = train_or_load_tokenizer("byte_bpe", 500, TEXTS, "x", tmp_path)
    sample = "class Ünïcode:\n\tpass  # ✓\n"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert tokenizer.eos_token == "<|endoftext|>"


def test_wordpiece_has_bert_specials(tmp_path):
    tokenizer, _, _ = train_or_load_tokenizer("wordpiece", 500, TEXTS, "x", tmp_path)
    ids = tokenizer("import os")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id is not None


def test_tokenizer_loads_from_a_local_directory(tmp_path):
    tokenizer, directory, _ = train_or_load_tokenizer("byte_bpe", 500, TEXTS, "x", tmp_path)
    assert load_tokenizer(directory).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(RecipeError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_unknown_kind_names_the_valid_ones(tmp_path):
    with pytest.raises(RecipeError, match="byte_bpe, wordpiece"):
        train_or_load_tokenizer("sentencepiece", 500, TEXTS, "x", tmp_path)
