"""A model summary whose FLOPs figure is measured or absent.

Lightning's summary counts FLOPs only by running ``example_input_array`` through the module's
``forward``, and prints ``Total FLOPs: 0`` (and a FLOPs column of zeros) when there is none, as for
the recipes' modules. ``ModelSummary`` drops that column and shows the training FLOPs per batch
that the module measured (``LanguageModelModule.measure_flops``), or no FLOPs line at all.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size


class ModelSummary(RichModelSummary):
    """``RichModelSummary`` without unmeasured FLOPs (``pl_module.training_flops_per_batch`` when set)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = self._summary(trainer, pl_module)
        data = [(name, column) for name, column in summary._get_summary_data() if name != "FLOPs"]
        flops = getattr(pl_module, "training_flops_per_batch", None)
        _print(data, summary.total_parameters, summary.trainable_parameters, summary.model_size,
               summary.total_training_modes, flops, **self._summarize_kwargs)


def _print(data: list[tuple[str, list[str]]], total: int, trainable: int, size: float, modes: dict[str, int],
           flops: int | None, **kwargs: Any) -> None:
    from rich import get_console
    from rich.table import Table

    console = get_console()
    table = Table(header_style=kwargs.get("header_style", "bold magenta"))
    names = [name for name, _ in data]
    table.add_column(" ", style="dim")
    for name in names[1:]:
        table.add_column(name, justify="left" if name in ("Name", "Type", "Mode") else "right", no_wrap=name == "Name")
    for row in zip(*(column for _, column in data)):
        table.add_row(*row)
    console.print(table)
    grid = Table.grid(expand=True)
    grid.add_column()
    grid.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable))}")
    grid.add_row(f"[bold]Non-trainable params[/]: {get_human_readable_count(int(total - trainable))}")
    grid.add_row(f"[bold]Total params[/]: {get_human_readable_count(int(total))}")
    grid.add_row(f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(size)}")
    grid.add_row(f"[bold]Modules in train mode[/]: {modes['train']}")
    grid.add_row(f"[bold]Modules in eval mode[/]: {modes['eval']}")
    if flops:
        grid.add_row(f"[bold]Training FLOPs per batch[/] (measured, forward + backward): {get_human_readable_count(flops)}")
    console.print(grid)
