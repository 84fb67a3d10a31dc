"""A rich progress bar that reads right on step-limited runs.

Lightning's bar says ``Epoch 1/-2`` when ``max_steps`` ends the run (``max_epochs=-1``) and counts
batches of the current epoch. ``StepProgressBar`` names the epoch without a bogus total and,
when ``max_steps`` is set, counts optimizer steps of the whole run (``global_step/max_steps``,
continuing from a resumed checkpoint's step).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


def step_limited(trainer: pl.Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` with ``Epoch N`` (``N/last`` only when ``max_epochs`` bounds the run) and,
    for ``max_steps`` runs, a bar over the run's steps instead of the epoch's batches."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        if step_limited(trainer):
            description += " · steps"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description

    @property
    def total_train_batches(self) -> int | float:
        if step_limited(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if step_limited(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not step_limited(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
