"""Numerical equivalence of a scheduled model and the original: outputs and gradients.

A scheduled model sharded over a device mesh (DTensor parameters, gradients and outputs) is
compared whole: each DTensor is gathered first, on every rank in the same order."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import VerificationError


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every rank calls it in the same order); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _tensor_leaves(value: Any, name: str = "output") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            found.update(_tensor_leaves(item, f"{name}.{key}"))
        return found
    if isinstance(value, (list, tuple)):
        found = {}
        for i, item in enumerate(value):
            found.update(_tensor_leaves(item, f"{name}[{i}]"))
        return found
    return {}


def _clone_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(example_inputs, dict):
        return (), {k: clone(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor):
        return (clone(example_inputs),), {}
    return tuple(clone(v) for v in example_inputs), {}


def _parameter_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)]


def _grads_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients under the model's state_dict keys (so merged ops report the original names): each
    parameter stands in by its gradient while the state_dict is taken (DTensors included)."""
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = param.grad if param.grad is not None else torch.zeros_like(param)
                swapped.append((module, name, param))
    try:
        return {k: whole_tensor(v).clone() for k, v in model.state_dict().items()}
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _run(model: nn.Module, example_inputs: Any, seed: int, grads: bool):
    args, kwargs = _clone_inputs(example_inputs)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outputs = _tensor_leaves(model(*args, **kwargs))
    if grads:
        generator = torch.Generator().manual_seed(seed)
        loss = sum((t.float() * torch.randn(t.shape, generator=generator).to(t.device)).sum()
                   for t in outputs.values() if t.requires_grad and t.is_floating_point())
        if isinstance(loss, torch.Tensor):
            loss.backward()
    return {k: whole_tensor(v.detach()) for k, v in outputs.items()}


def _error(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("inf")
    a, b = a.double(), b.double()
    ok = bool(torch.isclose(b, a, rtol=rtol, atol=atol, equal_nan=True).all())
    diff = (a - b).abs().nan_to_num(0.0, posinf=0.0)
    return ok, float(diff.max()) if diff.numel() else 0.0


def verify(original: nn.Module, scheduled: nn.Module, example_inputs: Any, grads: bool = True,
           rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0,
           reference_grads: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
           ) -> dict[str, float]:
    """Run both models in eval mode with the same seed; compare outputs and parameter grads.

    Gradients are matched by the original model's parameter names. ``reference_grads`` maps the
    original's gradients before they are compared (under data parallelism: averaged over the
    ranks, as the sharded model's are). Returns the max abs error per compared tensor; raises
    ``VerificationError`` naming the worst mismatches.
    """
    modes = [(m, m.training) for m in (original, scheduled)]
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is not reset
            original.eval()
            scheduled.eval()
            out_a = _run(original, example_inputs, seed, grads)
            grads_a = _grads_by_key(original) if grads else {}
            if grads and reference_grads is not None:
                grads_a = reference_grads(grads_a)
            out_b = _run(scheduled, example_inputs, seed, grads)
            grads_b = _grads_by_key(scheduled) if grads else {}
    finally:
        for m, mode in modes:
            m.train(mode)
            m.zero_grad(set_to_none=True)
    if list(out_a) != list(out_b):
        raise VerificationError(f"outputs differ in structure: original {list(out_a)} vs scheduled {list(out_b)}")
    pairs = dict(out_a.items())
    errors: dict[str, float] = {}
    failures = []
    for name, a in pairs.items():
        ok, err = _error(a, out_b[name], rtol, atol)
        errors[name] = err
        if not ok:
            failures.append((err, name))
    if grads:
        keys = _parameter_keys(original)
        missing = [k for k in keys if k not in grads_b]
        if missing:
            raise VerificationError(f"scheduled model lacks parameters of the original: {', '.join(missing[:5])}"
                                    + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        for key in keys:
            ok, err = _error(grads_a[key], grads_b[key], rtol, atol)
            errors[f"grad {key}"] = err
            if not ok:
                failures.append((err, f"grad {key}"))
    if failures:
        failures.sort(reverse=True)
        worst = "; ".join(f"{name}: max abs error {err:.3g}" for err, name in failures[:5])
        raise VerificationError(f"scheduled model differs from the original (rtol={rtol}, atol={atol}) in "
                                f"{len(failures)} tensor(s); worst: {worst}")
    return errors
