"""Which pass broke it: verify a scheduled model and, on a mismatch, re-apply the spec pass by
pass on a fresh copy of the original until the outputs or gradients first differ."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import VerificationError
from ..tolerances import DEFAULT_ATOL, DEFAULT_RTOL
from ..core.verify import verify
from .apply import apply_schedule
from .schema import ScheduleSpec

Wrap = Callable[[nn.Module], nn.Module]


def _same(module: nn.Module) -> nn.Module:
    return module


def first_breaking_pass(original: nn.Module, spec: ScheduleSpec, inputs: Any, *, wrap: Wrap = _same,
                        example_inputs: Any = None, rtol: float = DEFAULT_RTOL,
                        atol: float = DEFAULT_ATOL) -> tuple[str, str] | None:
    """(pass name, verification message) of the first enabled pass after which a copy of
    ``original`` stops matching it; None if every prefix of the spec matches."""
    candidate = copy.deepcopy(original)
    for p in spec.enabled:
        apply_schedule(candidate, spec.only([p.name]), example_inputs)
        try:
            verify(wrap(original), wrap(candidate), inputs, rtol=rtol, atol=atol)
        except VerificationError as exc:
            return p.name, str(exc)
    return None


def verify_schedule(original: nn.Module, scheduled: nn.Module, spec: ScheduleSpec, inputs: Any, *,
                    wrap: Wrap = _same, example_inputs: Any = None, rtol: float = DEFAULT_RTOL,
                    atol: float = DEFAULT_ATOL, relative: dict[str, float | None] | None = None,
                    reference_grads: Callable | None = None, bisect: bool = True) -> dict[str, float]:
    """``verify(original, scheduled)``; on mismatch a VerificationError naming the first bad pass
    (with ``bisect``; a model sharded over a mesh is not re-scheduled on copies, so there the error
    names the tensors that differ). ``reference_grads`` as in ``verify``.

    ``wrap`` turns a model into what is run on ``inputs`` (e.g. a training step around it);
    ``original`` is left untouched (the bisection works on copies). Returns the max abs error per
    compared tensor (outputs, then ``grad <key>``); a ``relative`` dict is filled with each one
    over the largest magnitude of that tensor in the original's run.
    """
    reference = wrap(original)
    try:
        with recording_scales(reference) as scales:
            errors = verify(reference, wrap(scheduled), inputs, rtol=rtol, atol=atol, reference_grads=reference_grads)
        if relative is not None:
            relative.update(relative_errors(errors, scales))
        return errors
    except VerificationError as exc:
        if not bisect:
            raise VerificationError(f"{exc} (to find the pass, verify the schedule on one device)") from exc
        found = first_breaking_pass(original, spec, inputs, wrap=wrap, example_inputs=example_inputs,
                                    rtol=rtol, atol=atol)
        if found is None:
            raise VerificationError(f"the scheduled model differs from the original, but no prefix of the "
                                    f"schedule reproduces it on a fresh copy: {exc}") from exc
        name, detail = found
        raise VerificationError(f"schedule pass {name!r} breaks equivalence with the original model: {detail}") from exc


@dataclass
class Scales:
    """The largest magnitude of each output and parameter gradient of the reference (original) run."""

    outputs: dict[str, float] = field(default_factory=dict)
    grads: dict[int, float] = field(default_factory=dict)  # by id() of the Parameter
    keys: dict[str, int] = field(default_factory=dict)  # state_dict key -> id() of its Parameter


@contextlib.contextmanager
def recording_scales(wrapped: nn.Module):
    """While ``verify`` runs ``wrapped`` (the original) first: record the scale of each of its
    outputs (named as ``verify`` names them) and of each parameter's accumulated gradient."""
    scales = Scales(keys={k: id(v) for k, v in wrapped.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)})
    done = {"forward": False}

    def on_forward(module, args, kwargs, output):
        if not done["forward"]:
            done["forward"] = True
            scales.outputs.update({k: _scale(v) for k, v in _leaves(output, "output").items()})

    def on_grad(parameter):
        if parameter.grad is not None:
            scales.grads[id(parameter)] = _scale(parameter.grad)

    handles = [wrapped.register_forward_hook(on_forward, with_kwargs=True)]
    handles += [p.register_post_accumulate_grad_hook(on_grad) for p in wrapped.parameters() if p.requires_grad]
    try:
        yield scales
    finally:
        for handle in handles:
            handle.remove()


def relative_errors(errors: dict[str, float], scales: Scales) -> dict[str, float | None]:
    """``errors`` (max abs error per tensor, as ``verify`` returns them) over the reference's largest
    magnitude of that tensor; None where the scale is unknown or zero."""
    out: dict[str, float | None] = {}
    for name, error in errors.items():
        if name.startswith("grad "):
            scale = scales.grads.get(scales.keys.get(name[5:], -1))
        else:
            scale = scales.outputs.get(name)
        out[name] = error / scale if scale else (0.0 if error == 0 else None)
    return out


def _scale(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


def _leaves(value: Any, name: str) -> dict[str, torch.Tensor]:
    """Tensors of ``value`` named like ``verify`` names them (``output``, ``output.loss``, ``output[0]``)."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{name}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{name}[{i}]").items()}
    return {}
