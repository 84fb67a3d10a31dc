"""``slapo_lightning.build``: finish a schedule and hand back the model to train."""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import ScheduleError
from .schedule import Schedule


def _reinitialise(model: nn.Module, init_weights: Any) -> None:
    if callable(init_weights):
        model.apply(init_weights)
    elif callable(getattr(model, "_init_weights", None)):
        model.apply(model._init_weights)
    else:
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def build(sch: Schedule, init_weights: bool | Callable = False,
          optimizer: Callable[..., Any] | None = None) -> tuple[nn.Module, Any]:
    """Return ``(model, optimizer or None)``.

    Existing (e.g. pretrained) weights are kept unless ``init_weights`` is set: ``True`` uses the
    model's own initialiser (HF ``_init_weights``, else ``reset_parameters``), a callable is
    applied to every submodule. ``optimizer`` is called with the model's parameters.
    """
    if not isinstance(sch, Schedule):
        raise ScheduleError(f"build expects a Schedule from create_schedule(), got {type(sch).__name__}")
    model = sch.root.mod
    for path, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            try:
                module.graph.lint()
            except RuntimeError as exc:
                raise ScheduleError(f"build: the graph of {path or '<root>'} is inconsistent: {exc}") from None
    if init_weights:
        _reinitialise(model, init_weights)
    return model, (optimizer(model.parameters()) if optimizer is not None else None)
