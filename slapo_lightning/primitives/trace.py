"""``sch.trace()``: turn the module into a torch.fx GraphModule, in place."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from ..op.registry import OPS
from ..tracer import trace_module
from .registry import register_primitive


def is_op_leaf(module: nn.Module) -> bool:
    """Modules that stay opaque even under ``flatten=True``: torch.nn built-ins, checkpointed
    regions, and registered ops (except ops that exist to be inlined, like LinearWithSeparateBias)."""
    cls = type(module)
    if isinstance(module, CheckpointWrapper) or cls in _registered_op_classes():
        return not getattr(cls, "inline_when_flattened", False)
    return (cls.__module__.startswith("torch.nn") or cls.__module__.startswith("torch.ao.nn")) and not isinstance(
        module, nn.Sequential
    )


def _registered_op_classes() -> set[type]:
    return {op for _, op in OPS.items() if isinstance(op, type)}


def disable_kv_cache(root: nn.Module) -> None:
    """Traced layers cannot fill HF's KV cache; make the model stop passing one (training never
    uses it). The original setting is kept on the model for exports (``original_use_cache``)."""
    config = getattr(root, "config", None)
    if getattr(config, "use_cache", False):
        warnings.warn("slapo_lightning: setting config.use_cache=False: traced layers cannot update a KV cache",
                      stacklevel=3)
        root.__dict__["_slapo_original_use_cache"] = True
        config.use_cache = False


def original_use_cache(model: nn.Module) -> bool | None:
    """``config.use_cache`` as it was before tracing turned it off (None: no HF config)."""
    config = getattr(model, "config", None)
    return model.__dict__.get("_slapo_original_use_cache", getattr(config, "use_cache", None))


@register_primitive("trace")
def trace(sch, flatten: bool = False, leaves: Iterable[Any] | None = None,
          concrete_args: dict | None = None, example_inputs: Any = None) -> fx.GraphModule:
    """Trace ``sch.mod``; ``flatten=False`` keeps every child as its own traced module."""
    disable_kv_cache(sch.root.mod)
    module = sch.mod
    if isinstance(module, fx.GraphModule) and getattr(module, "_slapo_flatten", None) == flatten and not leaves:
        return module
    if example_inputs is None:
        example_inputs = sch.example_inputs()
    leaf_spec = list(leaves or []) + [name for name, m in module.named_modules() if name and is_op_leaf(m)]
    gm, calls = trace_module(module, flatten=flatten, leaves=leaf_spec, concrete_args=concrete_args,
                             example_inputs=example_inputs, path=sch.path)
    gm._slapo_flatten = flatten
    sch.replace_module(gm)
    for target, (args, kwargs) in calls.items():
        sch.record_example_inputs(sch._join(target), args, kwargs)
    if not flatten:
        user_types = tuple(l for l in leaves or () if isinstance(l, type))
        user_names = {l for l in leaves or () if isinstance(l, str)}
        for name, child in list(gm.named_children()):
            keep_opaque = (is_op_leaf(child) or isinstance(child, fx.GraphModule)
                           or name in user_names or isinstance(child, user_types))
            if name in calls and not keep_opaque:
                trace(sch[name], flatten=False)
    return gm
