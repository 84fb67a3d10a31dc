"""Tokenizers trained locally with Hugging Face ``tokenizers`` and cached on disk.

Byte-level BPE (GPT-2 style) for causal LM, WordPiece (BERT style, cased so code keeps its
identifiers) for masked LM. The cache key covers the training text, the kind and the vocabulary
size, so a changed corpus never reuses a stale tokenizer. The result is saved with
``save_pretrained`` so an exported model directory carries a tokenizer plain transformers loads.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import RecipeError, unknown

TOKENIZER_KINDS = ("byte_bpe", "wordpiece")
BPE_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _byte_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_SPECIALS["eos_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_SPECIALS)


def _wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS.values()), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = WORDPIECE_SPECIALS["cls_token"], WORDPIECE_SPECIALS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **WORDPIECE_SPECIALS)


TRAINERS = {"byte_bpe": _byte_bpe, "wordpiece": _wordpiece}


def cache_key(kind: str, vocab_size: int, corpus_fingerprint: str) -> str:
    """Directory name of a cached tokenizer: readable kind and size plus a hash of the corpus."""
    digest = hashlib.sha256(f"{kind}\0{vocab_size}\0{corpus_fingerprint}".encode()).hexdigest()[:16]
    return f"{kind}-{vocab_size}-{digest}"


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A tokenizer saved with ``save_pretrained`` in a local directory (never the hub)."""
    directory = Path(os.path.expanduser(str(path)))
    if not (directory / "tokenizer.json").is_file():
        raise RecipeError(f"data.tokenizer_path: {str(path)!r} is not a directory with a tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def train_or_load_tokenizer(
    kind: str, vocab_size: int, texts: list[str], corpus_fingerprint: str, cache_dir: str | os.PathLike
) -> tuple[PreTrainedTokenizerFast, Path, bool]:
    """The cached tokenizer for this corpus, kind and size, training and caching it if needed.

    Returns ``(tokenizer, directory, trained_now)``. The cache is written to a temporary
    directory first and renamed into place, so ranks or runs racing on it never read half a file.
    """
    if kind not in TRAINERS:
        raise RecipeError(unknown("data.tokenizer_kind", kind, TOKENIZER_KINDS))
    if vocab_size < 300:
        raise RecipeError(f"data.vocab_size={vocab_size} is too small; use at least 300 (byte-level BPE needs 257)")
    root = Path(os.path.expanduser(str(cache_dir))) / "tokenizers"
    directory = root / cache_key(kind, vocab_size, corpus_fingerprint)
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory), directory, False
    tokenizer = TRAINERS[kind](texts, vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, directory)
    except OSError:
        if not (directory / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer, directory, True
