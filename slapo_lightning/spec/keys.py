"""Keep a module's original state_dict keys when an op takes over existing Parameters.

``FusedBiasDropoutAddLayerNorm.from_layer_norm`` reuses ``LayerNorm.weight`` as its own
``weight``; ``FusedMLP.from_gpt2`` holds ``c_fc`` as ``fc_in``. The tensors are the same objects,
only their names moved. Comparing tensor identity before and after a step finds every such move,
and hooks on the scheduled module save them under the old names and load them from the old
names, so checkpoints still move between scheduled and plain models with ``strict=True``. (Ops
that merge tensors, like FusedQKV, keep their keys through the core's split-state hooks.)
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


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


def keep_original_keys(module: nn.Module, moves: dict[str, str]) -> None:
    """Save ``module``'s tensors under the old keys and accept checkpoints that use them."""
    if not moves:
        return
    inverse = {old: new for new, old in moves.items()}

    def save(mod, state_dict, prefix, local_metadata):
        _renamed(state_dict, {prefix + new: prefix + old for new, old in moves.items()})

    def load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        _renamed(state_dict, {prefix + old: prefix + new for old, new in inverse.items()})

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)
