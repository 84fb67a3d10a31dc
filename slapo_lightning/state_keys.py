"""Keep the original state_dict keys when an op merges several modules' weights.

An op that fuses modules (FusedQKV from query/key/value Linears) exposes
``split_state() -> list[dict]`` (each original module's tensors, in its own layout) and
``load_split_state(list[dict])``. The hooks below, registered on the parent, present and accept
the original ``<name>.<param>`` keys, so checkpoints move both ways between scheduled and plain
models with ``strict=True``.
"""
from __future__ import annotations

from torch import nn


def supports_split_state(module: nn.Module) -> bool:
    return callable(getattr(module, "split_state", None)) and callable(getattr(module, "load_split_state", None))


def alias_split_state(parent: nn.Module, child_name: str, original_names: list[str]) -> None:
    """Make ``parent.<child_name>`` save and load as ``parent.<original_names[i]>.*``."""
    child = getattr(parent, child_name)
    own_keys = list(child.state_dict().keys())

    def save(module, state_dict, prefix, local_metadata):
        for key in own_keys:
            state_dict.pop(f"{prefix}{child_name}.{key}", None)
        for name, tensors in zip(original_names, getattr(module, child_name).split_state()):
            for key, tensor in tensors.items():
                state_dict[f"{prefix}{name}.{key}"] = tensor.detach()

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        fused = getattr(module, child_name)
        layout = fused.split_state()
        wanted = [{key: f"{prefix}{name}.{key}" for key in tensors} for name, tensors in zip(original_names, layout)]
        if not all(k in state_dict for keys in wanted for k in keys.values()):
            return
        fused.load_split_state([{key: state_dict.pop(k) for key, k in keys.items()} for keys in wanted])
        for key, value in fused.state_dict().items():
            state_dict[f"{prefix}{child_name}.{key}"] = value

    parent.register_state_dict_post_hook(save)
    parent.register_load_state_dict_pre_hook(load)
