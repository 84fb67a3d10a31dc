"""Default tolerances for comparing a scheduled model with the original (outputs and gradients).

One place for ``verify``, the pass bisection and the ScheduleCallback's first-batch check, so the
three agree on what "equivalent" means. The values are float32 ones: fused kernels reorder sums
(a fused bias+GELU, a chunked linear+cross-entropy, blocked attention), which moves results by a
few ulps relative to eager PyTorch, and gradients accumulate that over a whole training step; 1e-4
relative with a 1e-5 absolute floor (for entries near zero) passes every shipped op in float32 and
still catches a wrong scale, mask or dropout placement, which are off by far more.
"""
from __future__ import annotations

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL"]
