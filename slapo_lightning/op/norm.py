"""RMSNorm in every variant Hugging Face decoders use, with a backward that saves less.

The variants differ in two places, and both change the numbers in half precision:

* where the result is cast back to the input dtype: Llama, Mistral, Qwen2/3 and Phi-3 compute
  ``w * x̂.to(dtype)`` (``cast="before_weight"``); Gemma and OLMo2 compute ``(w * x̂).to(dtype)``
  in float32 (``cast="after_weight"``);
* the scale: ``w`` or, in Gemma, ``1 + w`` (``offset=1.0``; its weight starts at zero).

x̂ = x * rsqrt(mean(x²) + eps) is always computed in float32 from the upcast input. The same op
serves Qwen3's per-head q/k norms: it normalises the last dimension of any shape, (batch, seq,
heads, head_dim) included.

Eager autograd keeps the float32 copy of the input, x̂ and its cast for backward; this op keeps the
input in its own dtype and one float32 number per row, and recomputes x̂. Backward writes only new
tensors (nothing saved is modified in place: an in-place RMSNorm backward once broke Gemma2
training elsewhere). On CUDA the forward and backward formulas each go through torch.compile
(one kernel each); on CPU they run as the plain PyTorch below.
"""
from __future__ import annotations

import torch
from torch import nn

from .compiled import compiled_on_cuda
from ..errors import OpError, unknown
from .matching import Built, literal, one_module, parameter
from .registry import register_op

CASTS = ("before_weight", "after_weight")


def _check_cast(cast: str) -> str:
    if cast not in CASTS:
        raise OpError(unknown("RMSNorm cast order", cast, CASTS, did_you_mean=False))
    return cast


def _scale(weight: torch.Tensor, offset: float, dtype: torch.dtype) -> torch.Tensor:
    weight = weight.to(dtype)
    return weight + offset if offset else weight


def _rms_norm(x, weight, eps: float, offset: float, cast_first: bool):
    """(output, rstd); the operations of the Hugging Face modules in their order, so that eager
    results are bitwise theirs."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = x32 * rstd
    if weight is None:
        return normed.to(x.dtype), rstd
    if cast_first:
        return _scale(weight, offset, weight.dtype) * normed.to(x.dtype), rstd
    wide = torch.promote_types(weight.dtype, torch.float32)
    return (normed * _scale(weight, offset, wide)).to(x.dtype), rstd


def _rms_norm_grads(grad_out, x, rstd, weight, offset: float, cast_first: bool, need_weight: bool):
    """(grad_x, grad_weight) of ``_rms_norm``, every result a new tensor."""
    normed = x.to(torch.float32) * rstd
    grad_weight = None
    if weight is None:
        grad_normed = grad_out.to(x.dtype).to(torch.float32)
    elif cast_first:
        rounded = normed.to(x.dtype)
        grad_normed = (grad_out * _scale(weight, offset, weight.dtype)).to(x.dtype).to(torch.float32)
        if need_weight:
            grad_weight = _sum_rows(grad_out.to(torch.float32) * rounded.to(torch.float32), weight)
    else:
        grad32 = grad_out.to(torch.float32)
        grad_normed = grad32 * _scale(weight, offset, torch.promote_types(weight.dtype, torch.float32))
        if need_weight:
            grad_weight = _sum_rows(grad32 * normed, weight)
    mean_dot = (grad_normed * normed).mean(-1, keepdim=True)
    grad_x = (grad_normed - normed * mean_dot) * rstd
    return grad_x.to(x.dtype), grad_weight


def _sum_rows(product: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return product.reshape(-1, product.shape[-1]).sum(0).to(weight.dtype)


_forward = compiled_on_cuda(_rms_norm)
_backward = compiled_on_cuda(_rms_norm_grads)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, cast_first: bool):
        out, rstd = _forward(x, weight, eps, offset, cast_first)
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset, ctx.cast_first = offset, cast_first
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight = _backward(grad_out, x, rstd, weight, ctx.offset, ctx.cast_first, need_weight)
        return (grad_x if need_x else None), grad_weight, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast: str = "before_weight",
) -> torch.Tensor:
    """RMSNorm of the last dimension of ``x``; see the module docstring for ``offset`` and ``cast``."""
    _check_cast(cast)
    if weight is not None and weight.shape != x.shape[-1:]:
        raise OpError(
            f"RMSNorm weight of shape {tuple(weight.shape)} does not fit inputs of shape {tuple(x.shape)} "
            f"(expected ({x.shape[-1]},))"
        )
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), cast == "before_weight")


@register_op("rms_norm")
class RMSNorm(nn.Module):
    """``forward(hidden_states)`` = RMSNorm over the last dimension, as ``LlamaRMSNorm``,
    ``GemmaRMSNorm``, ``Olmo2RMSNorm`` or ``Qwen3RMSNorm`` (q/k head norms too) compute it.

    ``offset``: 0 for ``w * x̂``, 1 for Gemma's ``(1 + w) * x̂`` (a fresh weight starts at ones or
    zeros so that a fresh norm is the identity scale either way). ``cast``: ``"before_weight"`` or
    ``"after_weight"`` (module docstring). :meth:`from_module` wraps an existing norm's own weight
    Parameter and finds its variant by running it.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        cast: str = "before_weight",
        elementwise_affine: bool = True,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.offset = float(offset)
        self.cast = _check_cast(cast)
        init = torch.zeros if offset else torch.ones
        self.register_parameter("weight", nn.Parameter(init(hidden_size)) if elementwise_affine else None)

    @classmethod
    def from_module(cls, norm: nn.Module) -> "RMSNorm":
        """An RMSNorm holding ``norm.weight`` (the same Parameter), with ``norm``'s eps and variant.

        The variant is read off ``norm`` itself: it is run on a small probe in bfloat16 (with a
        probe weight, on CPU, leaving ``norm`` untouched) and has to equal one variant of this op
        bitwise. A module that computes something else raises ``OpError`` instead of being
        replaced by an approximation.
        """
        eps = next((getattr(norm, name) for name in ("variance_epsilon", "eps") if hasattr(norm, name)), None)
        if not isinstance(eps, (int, float)):
            raise OpError(
                f"{type(norm).__name__} has no numeric 'variance_epsilon' or 'eps' attribute to read the RMSNorm "
                f"epsilon from (found {eps!r})"
            )
        weight = getattr(norm, "weight", None)
        others = [n for n, _ in norm.named_parameters() if n != "weight"] + [n for n, _ in norm.named_buffers()]
        if others or (weight is not None and weight.dim() != 1):
            raise OpError(
                f"{type(norm).__name__} is not an RMSNorm this op reproduces: it needs one 1-D 'weight' and nothing "
                f"else, found weight shape {None if weight is None else tuple(weight.shape)} and {others or 'no'} "
                "other tensors"
            )
        if weight is None:
            raise OpError(f"{type(norm).__name__} has no weight; build RMSNorm(..., elementwise_affine=False) directly")
        offset, cast = _probe_variant(norm, weight, float(eps))
        op = cls(weight.shape[0], eps=eps, offset=offset, cast=cast, elementwise_affine=False)
        op.weight = weight
        op.train(norm.training)
        return op

    @classmethod
    def from_match(cls, match) -> "RMSNorm | Built":
        """The scheduled RMSNorm module, or the one norm module called inside a pattern match,
        through :meth:`from_module` (variant and eps read off the module); for a match of the norm's
        own dataflow (a flattened trace calls no norm module), its weight and eps, and the variant
        from the pattern's ``offset`` and ``cast`` tags."""
        if match.subgraphs and "weight" in match.values and not match.called_modules():
            weight = parameter(match, "weight", "rms_norm")
            op = cls(weight.shape[0], eps=literal(match, "eps", "rms_norm"), offset=match.tags.get("offset", 0.0),
                     cast=match.tags.get("cast", "before_weight"), elementwise_affine=False)
            op.weight = weight
            return Built(op, inputs=("x",))
        return cls.from_module(one_module(match, "rms_norm", _looks_like_rms_norm))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, self.offset, self.cast)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, cast={self.cast!r}"


def _looks_like_rms_norm(module: nn.Module) -> bool:
    return any(hasattr(module, name) for name in ("variance_epsilon", "eps")) and hasattr(module, "weight")


VARIANTS = tuple((offset, cast) for offset in (0.0, 1.0) for cast in CASTS)


@torch.no_grad()
def _probe_variant(norm: nn.Module, weight: torch.Tensor, eps: float) -> tuple[float, str]:
    """(offset, cast) of the variant ``norm`` computes on a probe, bitwise; OpError if none does."""
    size = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    row_scales = torch.logspace(-4, 1, 16, dtype=torch.float64)[:, None]
    x = (torch.randn(16, size, generator=gen, dtype=torch.float64) * row_scales).to(dtype)
    probe_weight = torch.randn(size, generator=gen).to(weight.dtype)
    try:
        want = torch.func.functional_call(norm, {"weight": probe_weight}, (x,))
    except Exception as exc:  # noqa: BLE001 - any failure means the module is not one we reproduce
        raise OpError(f"{type(norm).__name__} could not be probed as an RMSNorm ({type(exc).__name__}: {exc})") from None
    for offset, cast in VARIANTS:
        got, _ = _rms_norm(x, probe_weight, eps, offset, cast == "before_weight")
        if isinstance(want, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want):
            return offset, cast
    raise OpError(
        f"{type(norm).__name__} (eps={eps}) computes none of the RMSNorm variants this op reproduces "
        f"(offset 0 or 1, cast {' or '.join(CASTS)})"
    )
