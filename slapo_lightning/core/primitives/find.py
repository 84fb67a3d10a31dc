"""``sch.find(pattern)``: subgraphs of the traced module that match a pattern."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..pattern import Subgraph, find_matches
from .registry import register_primitive


def _traced(sch) -> fx.GraphModule:
    if not isinstance(sch.mod, fx.GraphModule):
        sch.trace()
    return sch.mod


@register_primitive("find")
def find(sch, pattern: Callable) -> list[Subgraph]:
    """Matches in graph order; traces the module first if needed. No match gives ``[]``.
    Node paths are relative to ``sch``: ``[[('', add), ('', gelu)]]``."""
    return find_matches(_traced(sch), pattern)


@register_primitive("find_node")
def find_node(sch, predicate: Callable[[fx.Node], bool]) -> list[Subgraph]:
    """Single-node subgraphs for every node the predicate accepts."""
    return find_matches(_traced(sch), predicate, predicate=True)
