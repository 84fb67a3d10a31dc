"""A training loader that a resumed run continues exactly where the interrupted one stopped.

Lightning checkpoints every training loader that has ``state_dict``/``load_state_dict`` (the fit
loop's ``combined_loader`` state) and hands the state back before the first batch of the resumed
run. ``ResumableDataLoader`` saves the epoch and the number of batches it has yielded in it; on
resume it skips that many batches of the same epoch's order, at the index level (no sample is
loaded or collated for the skipped batches).

The order is ``ResumableSampler``'s: a ``DistributedSampler`` (shuffled with ``seed + epoch``,
sharded by rank) that Lightning leaves in place under DDP, because it already is one. Its keys are
``(epoch, index)``: a dataset that draws randomness per sample (masked LM masking) seeds it from
the key, so the masks of a batch do not depend on what ran before it (a resumed run, another
number of workers).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys and can skip the start of its next pass."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` keys of the next pass (the batches a resumed run already trained on)."""
        self._skip = max(0, int(samples))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        for position, index in enumerate(super().__iter__()):  # the order is drawn here, after set_epoch
            if position >= skip:
                yield epoch, index


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose position in the epoch is part of Lightning's checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):
        # a generator: the body runs at the first batch, after Lightning's set_epoch for this epoch
        sampler = self.sampler
        epoch = int(getattr(sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        if skip:
            if not isinstance(sampler, ResumableSampler) or self.batch_size is None:
                raise RuntimeError("ResumableDataLoader can only resume over a ResumableSampler with a batch_size")
            sampler.skip_next(skip * self.batch_size)
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


def key_seed(seed: int, key: Any) -> int:
    """A 63-bit seed for one ``(epoch, index)`` key (or a plain index, epoch 0) under ``seed``."""
    epoch, index = key if isinstance(key, tuple) else (0, key)
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def key_index(key: Any) -> int:
    return int(key[1]) if isinstance(key, tuple) else int(key)


def key_generator(seed: int, key: Any) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, key))
