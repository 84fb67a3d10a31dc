"""Throughput and MFU for the recipes' batches: what Lightning's ThroughputMonitor needs, and a
monitor whose peak FLOP/s the user can set.

FLOPs per batch come from the LightningModule (``LanguageModelModule.measure_flops`` counts them
with torch's FLOP counter on the plain model before training); MFU is those FLOPs per second over
``peak_flops`` of one device times the number of devices. Lightning knows the peak of common CUDA
GPUs and TPUs; for a CPU or another chip, give it (``callbacks.throughput.peak_flops=2.0e12``).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor

from ..errors import RecipeError


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch (``batch_size_fn`` of ThroughputMonitor)."""
    return int(batch["input_ids"].shape[0])


def tokens_in_batch(batch: dict[str, Any]) -> int:
    """Tokens in a batch, so ThroughputMonitor's ``items_per_sec`` is tokens/s (``length_fn``)."""
    return int(batch["input_ids"].numel())


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's ThroughputMonitor (tokens/s, FLOP/s and, with a known peak, MFU) with ``peak_flops``:
    the FLOP/s of one device at the run's precision to compute MFU against (``None``: Lightning's
    table, which covers CUDA GPUs and TPUs only)."""

    def __init__(self, batch_size_fn: Any = batch_size, length_fn: Any = tokens_in_batch,
                 peak_flops: float | None = None, **kwargs: Any):
        if peak_flops is not None and not (isinstance(peak_flops, (int, float)) and peak_flops > 0):
            raise RecipeError(f"callbacks.throughput.peak_flops={peak_flops!r}: give the peak FLOP/s of one device, "
                              "a positive number (e.g. 3.1e14), or null for Lightning's table")
        super().__init__(batch_size_fn, length_fn, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is None:
            return
        self.available_flops = int(self.peak_flops)
        for key in list(self._throughputs):
            self._throughputs[key] = Throughput(available_flops=self.available_flops, world_size=trainer.world_size,
                                                **self.kwargs)
