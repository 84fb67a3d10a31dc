"""``slapo_lightning.pattern``: the public pattern API (``call_module``), as the tutorials import it.
The matcher lives in ``slapo_lightning.core.pattern``."""
from .core.pattern import (DataflowMatcher, Subgraph, call_module, find_nodes, find_subgraphs,
                           register_equivalent_module, trace_pattern)

__all__ = ["call_module", "Subgraph", "DataflowMatcher", "find_subgraphs", "find_nodes",
           "register_equivalent_module", "trace_pattern"]
