"""Clipping by total gradient norm when the gradients live on different device meshes.

Under tensor parallelism alone the sharded layers' parameters are DTensors while the rest
(embeddings, final norm) stay plain tensors, replicated on every rank; on a 2-D mesh the layers'
parameters span both dimensions and the rest only the data-parallel one. torch's
``clip_grad_norm_`` refuses both mixtures. The total norm is the same either way: each group's
norm is computed where it lives (a DTensor's over all its shards), then combined.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def grads_on_several_meshes(parameters: Iterable[nn.Parameter]) -> bool:
    """True when the gradients are not all plain tensors or all DTensors of one mesh."""
    meshes = {p.grad.device_mesh if isinstance(p.grad, DTensor) else None for p in parameters if p.grad is not None}
    return len(meshes) > 1


def clip_mixed_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(parameters, max_norm)`` (2-norm) for gradients on several meshes (plain
    ones included); returns the total norm as a plain tensor."""
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    for key, group in groups.items():
        norm = total if key is None else DTensor.from_local(total, key[0], [Replicate()] * key[0].ndim)
        clip_grads_with_norm_(group, max_norm, norm)
    return total

