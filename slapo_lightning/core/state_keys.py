"""Keep the original state_dict keys when a schedule swaps modules, so checkpoints move both
ways between scheduled and plain models with ``strict=True``.

Two cases. An op that *merges* tensors (FusedQKV from query/key/value Linears) exposes
``split_state() -> list[dict]`` (each original module's tensors, in its own layout) and
``load_split_state(list[dict])``; hooks on the parent present and accept the original
``<name>.<param>`` keys. An op that *takes over* existing Parameters under new names
(``FusedBiasDropoutAddLayerNorm.from_layer_norm`` holds ``LayerNorm.weight`` as ``weight``,
``FusedMLP.from_gpt2`` holds ``c_fc`` as ``fc_in``) is found by tensor identity before and after
the change, and hooks rename the keys back.

torch.distributed.checkpoint (FSDP2 and tensor-parallel checkpoints) also resolves every key by
attribute access through the module tree, so each kept key gets a path of placeholder attributes
(:class:`KeyPath`: no module, no tensor, no state_dict entry) that leads to it.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class KeyPath:
    """A placeholder attribute on the way to an original key kept by hooks (``q_proj`` of
    ``q_proj.weight`` after the fused QKV took the weight over)."""

    def __init__(self) -> None:
        self.__dict__["_children"] = {}

    def __getattr__(self, name: str) -> "KeyPath":
        try:
            return self.__dict__["_children"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"KeyPath({', '.join(self.__dict__['_children'])})"


def _keeps(module: nn.Module, keys) -> None:
    module.__dict__.setdefault("_slapo_kept_keys", []).extend(keys)


def make_kept_keys_resolvable(root: nn.Module) -> None:
    """Once a schedule is applied (the replaced modules are gone): a KeyPath to every kept key."""
    for module in root.modules():
        resolvable_keys(module, module.__dict__.get("_slapo_kept_keys", ()))


def resolvable_keys(module: nn.Module, keys) -> None:
    """Give every ``key`` (relative to ``module``) that no attribute path leads to one of KeyPaths."""
    for key in keys:
        owner: object = module
        for name in key.split("."):
            step = getattr(owner, name, None)
            if step is None:
                step = KeyPath()
                if isinstance(owner, KeyPath):
                    owner.__dict__["_children"][name] = step
                else:
                    owner.__dict__[name] = step
            owner = step


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
    _keeps(parent, [f"{name}.{key}" for name, tensors in zip(original_names, child.split_state()) for key in tensors])


def tensor_keys(module: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> the module's state_dict keys holding it (after all key hooks)."""
    keys: dict[int, list[str]] = defaultdict(list)
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            keys[id(value)].append(key)
    return keys


def moved_keys(before: dict[int, list[str]], module: nn.Module) -> dict[str, str]:
    """new key -> old key for tensors that are still there under another name."""
    after = tensor_keys(module)
    old_names = {k for ks in before.values() for k in ks}
    new_names = {k for ks in after.values() for k in ks}
    moves = {}
    for tensor_id, new in after.items():
        old = before.get(tensor_id)
        gone = [k for k in old or () if k not in new_names]
        fresh = [k for k in new if k not in old_names]
        if len(gone) == 1 and len(fresh) == 1:
            moves[fresh[0]] = gone[0]
    return moves


def _renamed(state_dict: dict, mapping: dict[str, str]) -> None:
    """Rename keys of ``state_dict`` in place, keeping their positions."""
    if not any(k in state_dict for k in mapping):
        return
    items = [(mapping.get(k, k), v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


def _own_tensor(module: nn.Module, key: str) -> torch.Tensor | None:
    owner_path, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return None
    return getattr(owner, name, None)


def _like(own: torch.Tensor | None, value):
    """A whole checkpoint tensor for a sharded (DTensor) parameter, as this rank's shard of it
    (every rank holds the whole tensor, so no communication); anything else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(own, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(own.device, own.dtype), own.device_mesh, own.placements, src_data_rank=None)
    return value


def keep_original_keys(module: nn.Module, moves: dict[str, str]) -> None:
    """Save ``module``'s tensors under the old keys and accept checkpoints that use them."""
    if not moves:
        return
    inverse = {old: new for new, old in moves.items()}

    def save(mod, state_dict, prefix, local_metadata):
        _renamed(state_dict, {prefix + new: prefix + old for new, old in moves.items()})

    def load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        mapping = {prefix + old: prefix + new for old, new in inverse.items()}
        for old_key, new_key in mapping.items():  # torch.distributed.checkpoint adds the module's own
            if old_key in state_dict:             # current values under the new keys: the checkpoint wins
                state_dict.pop(new_key, None)
                state_dict[old_key] = _like(_own_tensor(mod, new_key[len(prefix):]), state_dict[old_key])
        _renamed(state_dict, mapping)

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)
    _keeps(module, moves.values())
