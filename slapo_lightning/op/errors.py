"""The error an op raises when it is built or called with arguments it cannot honour.

``OpError`` lives in ``slapo_lightning.errors`` with the rest of the family; it is re-exported
here so existing imports keep working.
"""
from __future__ import annotations

from ..errors import OpError

__all__ = ["OpError"]
