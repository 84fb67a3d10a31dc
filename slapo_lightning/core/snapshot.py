"""Undo a partly applied schedule without copying any tensor.

Every primitive changes a model by swapping module references (``setattr`` on a parent, new
children of a traced module) or by editing a traced module's graph; none writes into existing
parameter storage. So recording each module's attribute dicts (shallow) and each GraphModule's
graph is enough to put the model back exactly as it was, parameters and all, however far a spec
got before it failed.
"""
from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

from .tracer import TracedModule


class ModelSnapshot:
    """The structure of ``root`` and of every module under it at construction time."""

    def __init__(self, root: nn.Module):
        self._states: list[tuple[nn.Module, dict[str, Any], dict[int, dict], Any, type]] = []
        for module in root.modules():
            attrs = dict(module.__dict__)
            contents = {id(v): dict(v) for v in attrs.values() if isinstance(v, dict)}
            if isinstance(module, TracedModule):
                graph: Any = module.snapshot_specialisations()
            elif isinstance(module, fx.GraphModule):
                graph = copy.deepcopy(module.graph)
            else:
                graph = None
            self._states.append((module, attrs, contents, graph, type(module)))

    def restore(self) -> None:
        """Put every recorded module back; dicts are refilled in place so outstanding hook
        handles keep pointing at the live dicts."""
        for module, attrs, contents, graph, cls in self._states:
            module.__class__ = cls  # fully_shard swaps a module's class
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for value in attrs.values():
                if isinstance(value, dict) and id(value) in contents:
                    value.clear()
                    value.update(contents[id(value)])
            if callable(graph):
                graph()  # every specialisation's graph, code and edit log
            elif graph is not None:
                module.graph = graph  # the setter recompiles the code from the recorded graph
