"""Lightning DataModule over local text (default: the interpreter's standard library)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, default_collate
from transformers import PreTrainedTokenizerFast

from .blocks import OBJECTIVES, PackedBlocks, build_blocks
from .resumable import ResumableDataLoader, ResumableSampler
from .corpus import Document, corpus_fingerprint, load_documents, split_documents
from .tokenizer import load_tokenizer, train_or_load_tokenizer
from ..errors import RecipeError, unknown


class TextDataModule(pl.LightningDataModule):
    """Text files -> deterministic split -> local tokenizer -> packed blocks -> batches.

    ``tokenizer`` is available before ``setup`` (the model needs its vocabulary size); it is
    trained on the training split only, or loaded from ``tokenizer_path``.
    """

    def __init__(
        self,
        objective: str = "clm",
        paths: list[str] | None = None,
        file_glob: str = "**/*.txt",
        hf_dataset: str | None = None,
        hf_split: str = "train",
        hf_text_field: str = "text",
        max_chars: int | None = 2_000_000,
        max_files: int | None = None,
        val_fraction: float = 0.05,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer_kind: str = "byte_bpe",
        vocab_size: int = 8192,
        tokenizer_path: str | None = None,
        cache_dir: str = "~/.cache/slapo_lightning",
        mlm_probability: float = 0.15,
        seed: int = 0,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise RecipeError(unknown("data.objective", objective, OBJECTIVES))
        # The requested vocabulary is a target (a small corpus yields fewer tokens); the model
        # logs the real size, and Lightning refuses two different values under one key.
        self.save_hyperparameters(ignore=["vocab_size"])
        self.requested_vocab_size = vocab_size
        self.objective = objective
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer_dir: Path | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None

    @cached_property
    def documents(self) -> tuple[list[Document], list[Document]]:
        """``(train, val)`` documents."""
        hp = self.hparams
        docs = load_documents(hp.paths, hp.file_glob, hp.hf_dataset, hp.hf_split, hp.hf_text_field, hp.max_chars, hp.max_files)
        return split_documents(docs, hp.val_fraction)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        hp = self.hparams
        if hp.tokenizer_path:
            self.tokenizer_dir = Path(hp.tokenizer_path)
            return load_tokenizer(hp.tokenizer_path)
        train_docs, _ = self.documents
        tokenizer, self.tokenizer_dir, trained_now = train_or_load_tokenizer(
            hp.tokenizer_kind, self.requested_vocab_size, [d.text for d in train_docs], corpus_fingerprint(train_docs), hp.cache_dir
        )
        if trained_now:
            # WordPiece training is not deterministic: ranks that trained at the same time all use the
            # copy that won the rename into the cache, not each their own
            tokenizer = load_tokenizer(self.tokenizer_dir)
        return tokenizer

    def prepare_data(self) -> None:
        """Make sure the tokenizer exists: load it from the cache, or train it and cache it.

        Lightning calls this on local rank 0 only, but ``slapo-train`` reads ``tokenizer`` on every
        rank before ``fit`` (the model's vocabulary size comes from it), so under DDP each rank that
        finds no cached copy trains one itself. That is safe: the cache is written to a staging
        directory and renamed into place, so ranks racing on it never read a half-written tokenizer,
        and every rank then loads the cached copy, so all of them tokenize alike (given a cache
        directory they share).
        """
        self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_docs, val_docs = self.documents
        hp = self.hparams
        masking = dict(mlm_probability=hp.mlm_probability, seed=hp.seed)
        self.train_set = build_blocks(self.tokenizer, [d.text for d in train_docs], self.objective, self.seq_len, "train", **masking)
        self.val_set = build_blocks(self.tokenizer, [d.text for d in val_docs], self.objective, self.seq_len, "validation", **masking)

    @property
    def collate(self):
        """Stacks the blocks' dicts (masked LM items come masked from the dataset, see ``PackedBlocks``)."""
        return default_collate

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled per epoch with ``seed + epoch``, sharded by rank (the sampler is a
        ``DistributedSampler``, so Lightning keeps it under DDP); its position in the epoch is
        saved in checkpoints, so a resumed run continues with the batch the interrupted one was at.

        The shards are the strategy's data-parallel ones: under tensor parallelism the ranks of one
        tensor-parallel group read the same batches."""
        sharding = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            sharding = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or sharding
        sampler = ResumableSampler(self.train_set, num_replicas=sharding["num_replicas"], rank=sharding["rank"],
                                   shuffle=True, seed=self.hparams.seed)
        return ResumableDataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=default_collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=default_collate,
        )
