"""Random streams a resumed run continues exactly: every training batch reseeds torch.

Dropout (and anything else in a training step that draws from torch's global generators) would
otherwise depend on how many numbers were drawn since the process started, which a run resumed
from a checkpoint cannot reproduce. ``StepSeed`` seeds torch (CPU and every CUDA device) before
each training batch from ``(seed, rank, batch number)``: the batch number is Lightning's own
(``fit_loop.total_batch_idx``, restored from checkpoints), so step ``n`` of a resumed run draws
what step ``n`` of the uninterrupted run drew; data-parallel ranks draw different dropout masks.
The ranks of one tensor-parallel group draw alike: their replicated activations (embeddings,
residual stream) must stay identical, or the group computes no model at all.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def step_seed(seed: int, rank: int, batch: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{rank}:{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StepSeed(Callback):
    """Reseed torch before every training batch (``seed`` default: ``seed_everything``'s, else 0)."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        rank = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("rank", trainer.global_rank)
        torch.manual_seed(step_seed(seed, rank, trainer.fit_loop.total_batch_idx))
