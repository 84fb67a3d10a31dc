"""The error an op raises when it is built or called with arguments it cannot honour."""
from __future__ import annotations

from ..errors import ScheduleError


class OpError(ScheduleError, ValueError):
    """Bad arguments to an op: shapes that do not fit, an unknown activation, a bad mask dtype.

    It is a ``ValueError`` too, so callers that treat ops like plain torch modules can catch it
    the usual way; the scheduling core catches it as a ``ScheduleError``.
    """
