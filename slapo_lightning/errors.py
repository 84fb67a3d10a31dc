"""One exception family for everything a user can get wrong.

Every message names the offending path, pass, key or value and, where there is a finite set,
what would have been valid. The CLI prints ``str(exc)`` as one line.
"""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names from ``candidates`` that look most like ``name`` (for 'did you mean' hints)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not found:
        found = [c for c in candidates if name.split(".")[0] and c.startswith(name.split(".")[0])][:n]
    return found


def unknown(what: str, name: object, valid: Iterable[object], *, did_you_mean: bool = True, more: str = "") -> str:
    """The one wording of "that name does not exist": ``unknown <what> <name!r> (did you mean ...?);
    valid: a, b, c`` (``(none)`` for an empty set; ``more`` is appended to the list, e.g. "or an import path")."""
    names = [str(v) for v in valid]
    hint = closest(str(name), names) if did_you_mean else []
    guess = f" (did you mean {', '.join(map(repr, hint))}?)" if hint else ""
    listed = ", ".join(names) or "(none)"
    return f"unknown {what} {name!r}{guess}; valid: {listed}{' ' + more if more else ''}"


class NoMatch(Exception):
    """A step found nothing to act on (a pattern without match, a target path without module, a
    layer with no tensor-parallel plan): an optional pass skips that module and says why, a
    required one raises a SpecError naming pass, module and step."""


class ScheduleError(Exception):
    """Base class of every error slapo_lightning raises on bad input or a failed schedule step."""


class PathError(ScheduleError, KeyError):
    """A submodule path that does not exist in the schedule tree."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class RegistryError(ScheduleError, KeyError):
    """An unknown name looked up in a registry (primitive, op, pattern, backend...)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TraceError(ScheduleError):
    """A module could not be traced to a torch.fx graph."""


class PatternError(ScheduleError):
    """A pattern could not be built or matched."""


class ReplaceError(ScheduleError):
    """A replacement whose arguments do not bind or whose outputs do not fit."""


class FuseError(ScheduleError):
    """A subgraph that cannot be fused."""


class BackendError(ScheduleError):
    """An attention or kernel backend that is unknown or unavailable (strict mode)."""


class VerificationError(ScheduleError):
    """The scheduled model does not compute what the original computes."""


class SpecError(ScheduleError):
    """A malformed schedule spec (unknown pass, primitive, argument, pattern or op)."""


class CheckpointMismatchError(ScheduleError):
    """A checkpoint made under a different schedule."""


class RecipeError(ScheduleError, ValueError):
    """A configuration value that cannot work; the message names the key and the valid choices."""


class OpError(ScheduleError, ValueError):
    """Bad arguments to an op: shapes that do not fit, an unknown activation, a bad mask dtype.

    It is a ``ValueError`` too, so callers that treat ops like plain torch modules can catch it
    the usual way; the scheduling core catches it as a ``ScheduleError``.
    """
