"""``sch.trace()``: turn the module into a traced module (torch.fx), in place.

The module is traced on the inputs it was seen called with: for a Hugging Face model, each
training variant of a batch (no mask, an all-ones mask, padding), so every specialisation a
training run takes exists before the schedule's other steps edit it. ``flatten=False`` traces
each child the same way into its own traced module; a child that cannot be traced leaves the
whole tree as it was.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch.fx as fx
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from ..tracer import TracedModule, trace_module
from .registry import register_primitive

log = logging.getLogger("slapo_lightning")


def is_op_leaf(module: nn.Module) -> bool:
    """Modules that stay opaque even under ``flatten=True``: torch.nn built-ins, checkpointed
    regions, modules with forward hooks (tensor-parallel styles and FSDP2 work through them, and a
    trace would inline the module without them), and modules that say so themselves
    (``traced_as_leaf = True``: the op library's ops)."""
    if isinstance(module, CheckpointWrapper) or module._forward_hooks or module._forward_pre_hooks:
        return True
    declared = getattr(type(module), "traced_as_leaf", None)
    if declared is not None:
        return bool(declared)
    module_name = type(module).__module__
    return (module_name.startswith("torch.nn") or module_name.startswith("torch.ao.nn")) and not isinstance(
        module, nn.Sequential)


def disable_kv_cache(root: nn.Module) -> None:
    """Traced layers cannot fill HF's KV cache; make the model stop passing one (training never
    uses it). The original setting is kept on the model for exports (``original_use_cache``)."""
    config = getattr(root, "config", None)
    if getattr(config, "use_cache", False):
        log.info("slapo_lightning: setting config.use_cache=False (traced layers cannot update a KV cache)")
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
    if isinstance(module, TracedModule) and getattr(module, "_slapo_flatten", None) == flatten and not leaves:
        return module
    examples = [example_inputs] if example_inputs is not None else sch.example_variants()
    try:
        return _trace(sch, module, flatten, list(leaves or ()), concrete_args, examples)
    except BaseException:
        if sch.mod is not module:
            sch.replace_module(module)
        raise


def _trace(sch, module: nn.Module, flatten: bool, leaves: list, concrete_args: dict | None,
           examples: list) -> fx.GraphModule:
    leaf_spec = leaves + [name for name, m in module.named_modules() if name and is_op_leaf(m)]
    primary, variants = (examples[0], examples[1:]) if examples else (None, [])
    gm, calls = trace_module(module, flatten=flatten, leaves=leaf_spec, concrete_args=concrete_args,
                             example_inputs=primary, variants=variants, path=sch.path)
    gm._slapo_flatten = flatten
    sch.replace_module(gm)
    for target, found in calls.items():
        sch.record_example_inputs(sch._join(target), found)
    if not flatten:
        user_types = tuple(l for l in leaves if isinstance(l, type))
        user_names = {l for l in leaves if isinstance(l, str)}
        for name, child in list(gm.named_children()):
            keep_opaque = (is_op_leaf(child) or isinstance(child, fx.GraphModule)
                           or name in user_names or isinstance(child, user_types))
            if name in calls and not keep_opaque:
                child_sch = sch[name]
                _trace(child_sch, child, False, [], None, child_sch.example_variants())
    return gm
