"""Core attention as one module, so a schedule can swap the hand-written softmax(QK^T)V for a kernel.

``FlashAttentionOp`` takes q, k, v in the layout of ``F.scaled_dot_product_attention``
(batch, heads, seq, head_dim) and picks a backend from ``ATTENTION_BACKENDS`` per call, because
what a kernel can run depends on the inputs (device, dtype, mask, dropout).
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn

from ..errors import BackendError, OpError, unknown
from .attention_backends import ALIASES, ATTENTION_BACKENDS, AttentionBackend, backends_by_speed
from .matching import Built, literal
from .registry import register_op

AUTO = "auto"
FALLBACK = "sdpa"


def valid_backend_names() -> list[str]:
    """Every name ``FlashAttentionOp`` accepts: ``auto``, the registered backends and the aliases."""
    return [AUTO, *ATTENTION_BACKENDS.names(), *sorted(ALIASES)]


def resolve_backend_name(name: str) -> str:
    """The registered backend (or ``auto``) that ``name`` stands for; BackendError when unknown."""
    if name == AUTO or name in ATTENTION_BACKENDS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise BackendError(unknown("attention backend", name, valid_backend_names()))


@register_op("flash_attention")
class FlashAttentionOp(nn.Module):
    """softmax(q k^T * scale + mask) v with dropout, on the best kernel that handles the inputs.

    Args:
        attn_op_name: ``"auto"`` (fastest backend that supports the inputs), a registered backend
            (``"sdpa"``, ``"flash_attn"``, ``"xformers"``, ``"blocked_dropout"`` (CPU with dropout),
            ``"math"``) or a tutorial alias (``"native_xformers"``/``"cutlass"`` -> xformers,
            ``"triton"``/``"cuda"`` -> flash_attn).
        apply_causal_mask: also mask future keys (bottom-right aligned), independently of any mask.
        scale: softmax scale; None means 1/sqrt(head_dim).
        strict: raise ``BackendError`` when the named backend is missing or cannot run the inputs,
            instead of falling back to ``sdpa`` with one warning per op instance.

    ``forward(q, k, v, attention_mask=None, p=0.0)``: ``attention_mask`` is bool (True = attend) or
    additive float, broadcastable to (batch, heads, q_len, k_len); ``p`` is the dropout probability,
    applied only in training mode. k and v may have fewer heads than q (grouped-query attention:
    query head ``h`` attends with key/value head ``h // (q_heads // kv_heads)``, as HF's
    ``repeat_kv``); they are never repeated (see ``attention_backends``).
    """

    def __init__(
        self,
        attn_op_name: str = AUTO,
        apply_causal_mask: bool = False,
        scale: float | None = None,
        strict: bool = False,
    ):
        super().__init__()
        self.attn_op_name = attn_op_name
        self.backend_name = resolve_backend_name(attn_op_name)
        self.apply_causal_mask = apply_causal_mask
        self.scale = scale
        self.strict = strict
        self._warned = False
        # Resolved once here, so that forward does no registry sorting or package probing (which
        # would also break graphs under torch.compile).
        self._candidates = [b for b in backends_by_speed() if b.installed()]
        self._named = None if self.backend_name == AUTO else ATTENTION_BACKENDS.get(self.backend_name)
        self._named_installed = self._named is None or self._named.installed()
        self._fallback = ATTENTION_BACKENDS.get(FALLBACK)
        if strict and not self._named_installed:
            raise BackendError(
                f"attention backend {attn_op_name!r} needs the package {self._named.package!r}, which is not "
                f"installed; install it or use one of: {', '.join(b.name for b in self._candidates)}"
            )

    @classmethod
    def from_match(cls, match, backend: str = AUTO, causal: bool | str = AUTO, strict: bool = False):
        """The op with the match's scale, dropout probability, mask and causality.

        ``causal="auto"`` keeps what the model does: the ``is_causal`` flag of an sdpa call (HF sets
        it when no mask tensor is needed), and no extra mask for eager attention, whose additive mask
        already holds causality. ``True``/``False`` force it. Replacing a whole module (no pattern)
        builds the op from the arguments alone.
        """
        if causal not in (AUTO, True, False):
            raise OpError(f"flash_attention: causal must be 'auto', true or false, got {causal!r}")
        if not match.subgraphs:
            return cls(backend, apply_causal_mask=causal is True, strict=strict)
        values = match.values
        if match.tags.get("scale") == "div":
            scale = 1.0 / float(literal(match, "d", "flash_attention"))
        elif match.tags.get("scale") == "default":
            scale = None
        else:
            scale = float(literal(match, "scale", "flash_attention"))
        if causal == AUTO:
            causal = values.get("is_causal", False)
            if not isinstance(causal, bool):
                raise OpError(
                    f"flash_attention: is_causal is decided at run time ({causal}); set causal to true or false"
                )
        op = cls(backend, apply_causal_mask=causal, scale=scale, strict=strict)
        inputs = ("q", "k", "v") + (("attention_mask",) if isinstance(values.get("attention_mask"), fx.Node) else ())
        return Built(op, concrete_args={"p": match.dropout_probability()}, inputs=inputs)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        p: float = 0.0,
    ) -> torch.Tensor:
        _check_layout(q, k, v)
        mask = _normalized_mask(attention_mask, q.dtype)
        dropout_p = p if self.training else 0.0
        backend = self.select_backend(q, mask, dropout_p, k)
        return backend.run(q, k, v, mask, dropout_p, self.apply_causal_mask, self.scale)

    def select_backend(
        self, q: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, k: torch.Tensor | None = None
    ) -> AttentionBackend:
        """The backend this op runs these inputs on (falls back, warns or raises as configured);
        ``k`` (for its head count) decides between backends with and without grouped-query support."""
        causal = self.apply_causal_mask
        if self._named is None:
            return next(b for b in self._candidates if b.unsupported_reason(q, mask, dropout_p, causal, k) is None)
        if self._named_installed:
            reason = self._named.unsupported_reason(q, mask, dropout_p, causal, k)
        else:
            reason = f"package {self._named.package!r} is not installed"
        if reason is None:
            return self._named
        message = f"attention backend {self.attn_op_name!r} cannot run here: {reason}"
        if self.strict:
            raise BackendError(f"{message}; pass strict=False to fall back to {FALLBACK!r}")
        if not self._warned:
            self._warned = True
            warnings.warn(f"{message}; falling back to {FALLBACK!r}", RuntimeWarning, stacklevel=3)
        return self._fallback

    def extra_repr(self) -> str:
        return f"attn_op_name={self.attn_op_name!r}, apply_causal_mask={self.apply_causal_mask}, scale={self.scale}"


def _check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise OpError(f"FlashAttentionOp expects q, k, v as (batch, heads, seq, head_dim); got shapes {shapes}")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise OpError(
            f"FlashAttentionOp needs k and v with the same number of heads, dividing q's {q.shape[1]} heads "
            f"(grouped-query attention); got shapes {shapes}"
        )


def _normalized_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool masks stay bool; float masks become ``dtype`` (the kernels want the query's dtype)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise OpError(
            f"attention_mask must be bool (True = attend) or an additive float tensor, got {mask.dtype}"
        )
    return mask.to(dtype)
