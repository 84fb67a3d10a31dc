"""State adoption: a traced module holds its original's children, parameters and buffers."""
from __future__ import annotations

import torch.fx as fx
from torch import nn


def adopt_state(module: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` the original children, parameters and buffers (same objects, same order).

    GraphModule's constructor rebuilds only what the graph references, as generic modules; a
    schedule must keep every state_dict key, non-persistent buffers and the original classes.
    Plain tensor attributes the graph reads become non-persistent buffers (no new keys).
    """
    traced_constants = {name: buf for name, buf in gm._buffers.items()
                        if name not in module._buffers and "." not in name and buf is not None}
    gm._modules = type(module._modules)(module._modules)
    gm._parameters = type(module._parameters)(module._parameters)
    gm._buffers = type(module._buffers)(module._buffers)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, value in traced_constants.items():
        gm.register_buffer(name, value, persistent=False)
    for hook in module._state_dict_hooks.values():
        gm.register_state_dict_post_hook(hook)
    for hook in module._load_state_dict_pre_hooks.values():
        gm.register_load_state_dict_pre_hook(getattr(hook, "hook", hook))  # unwrap: it points at the old module
    if hasattr(module, "config"):
        gm.config = module.config


def adopt_attributes(source: nn.Module, holder: nn.Module, graph: fx.Graph) -> None:
    """Make every ``get_attr`` target of a later trace of ``source`` readable on ``holder``."""
    for node in graph.nodes:
        if node.op != "get_attr" or "." in node.target or hasattr(holder, node.target):
            continue
        value = getattr(source, node.target)
        if isinstance(value, nn.Parameter):
            holder.register_parameter(node.target, value)
        elif hasattr(value, "shape") and not isinstance(value, nn.Module):
            holder.register_buffer(node.target, value, persistent=False)
        else:
            holder.__dict__[node.target] = value
