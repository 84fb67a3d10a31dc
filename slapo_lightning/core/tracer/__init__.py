"""torch.fx tracing of Hugging Face 5.x code, with guarded specialisations.

Rooms: ``proxies`` (concrete-valued proxies and the tracer), ``leaves`` (functions kept opaque),
``guards`` (decisions and call keys), ``specialise`` (the traced module and its variants),
``state`` (adopting the original's state), ``training`` (train/eval correctness), ``inputs``
(example inputs), ``trace`` (the entry point).
"""
from .guards import GuardMiss, records_itself_when_traced
from .inputs import CallArgs, bind_examples, forward_signature
from .leaves import LEAF_FUNCTIONS, register_leaf_function
from .specialise import MAX_SPECIALISATIONS, Edit, Specialisation, TracedModule
from .trace import trace_graph, trace_module
from .training import train_only_probability, training_defaults

__all__ = [
    "CallArgs", "Edit", "GuardMiss", "LEAF_FUNCTIONS", "MAX_SPECIALISATIONS", "Specialisation", "TracedModule",
    "bind_examples", "forward_signature", "records_itself_when_traced", "register_leaf_function", "trace_graph",
    "trace_module", "train_only_probability", "training_defaults",
]
