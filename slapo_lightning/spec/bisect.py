"""Which pass broke it: verify a scheduled model and, on a mismatch, re-apply the spec pass by
pass on a fresh copy of the original until the outputs or gradients first differ."""
from __future__ import annotations

import copy
from typing import Any, Callable

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
                    atol: float = DEFAULT_ATOL) -> dict[str, float]:
    """``verify(original, scheduled)``; on mismatch a VerificationError naming the first bad pass.

    ``wrap`` turns a model into what is run on ``inputs`` (e.g. a training step around it);
    ``original`` is left untouched (the bisection works on copies).
    """
    try:
        return verify(wrap(original), wrap(scheduled), inputs, rtol=rtol, atol=atol)
    except VerificationError as exc:
        found = first_breaking_pass(original, spec, inputs, wrap=wrap, example_inputs=example_inputs,
                                    rtol=rtol, atol=atol)
        if found is None:
            raise VerificationError(f"the scheduled model differs from the original, but no prefix of the "
                                    f"schedule reproduces it on a fresh copy: {exc}") from exc
        name, detail = found
        raise VerificationError(f"schedule pass {name!r} breaks equivalence with the original model: {detail}") from exc
