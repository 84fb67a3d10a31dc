"""Attention kernels behind :class:`~slapo_lightning.op.attention.FlashAttentionOp`.

Each backend is registered in ``ATTENTION_BACKENDS`` and says for itself which inputs it can run
(``unsupported_reason``) and how (``run``). All take and return (batch, heads, seq, head_dim).

Conventions every backend honours, so that switching backends never changes the numbers beyond
rounding:

* ``mask`` is None, a bool tensor (True = attend) or an additive float tensor in the query's dtype,
  broadcastable to (batch, heads, q_len, k_len).
* ``causal`` is independent of the mask and aligned to the bottom-right corner: query ``i`` sees
  keys ``j <= i + k_len - q_len`` (the usual meaning with a KV cache; for q_len == k_len it is the
  plain lower triangle).
* A query row whose keys are all masked out gives zeros, like ``F.scaled_dot_product_attention``.
* Grouped-query attention: k and v may have fewer heads than q (a divisor of its heads; query head
  ``h`` reads key/value head ``h // groups``, HF's ``repeat_kv``). No backend repeats k/v: kernels
  that read grouped heads natively get them as they are, the others see the queries of one group
  as one longer sequence (``grouped_queries``).

``flash_attn`` and ``xformers`` are imported only inside ``run``, never when this module loads.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from ..registry import Registry
from .blocked_attention import blocked_attention
from .dropout import quantisable

ATTENTION_BACKENDS: Registry = Registry("attention backend")

ALIASES: dict[str, str] = {
    "native_xformers": "xformers",
    "cutlass": "xformers",
    "triton": "flash_attn",
    "cuda": "flash_attn",
}
"""Backend names used by the original Slapo tutorials, mapped to today's kernel families."""

_MASKED_OUT = -1.0e4
"""Additive mask values at or below this give exactly zero weight after softmax in every float
dtype (exp(-1e4) underflows), so such a mask is a padding mask in disguise."""


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool (q_len, k_len) mask, True where a query may attend, aligned to the bottom-right."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def merged_mask(mask: torch.Tensor | None, causal: bool, q: torch.Tensor, k: torch.Tensor):
    """One mask that carries both ``mask`` and the causal constraint (None when there is neither)."""
    if not causal:
        return mask
    allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as an additive float tensor of ``dtype`` (bool False -> -inf)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def key_padding(mask: torch.Tensor, batch: int) -> torch.Tensor | None:
    """(batch, k_len) bool of the keys to keep when ``mask`` only masks keys, else None.

    A key-padding mask has shape (batch or 1, 1, 1, k_len) and, if additive, only the values 0 and
    "masked out" (see ``_MASKED_OUT``). Checking the values of a float mask reads them on the host.
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool(torch.all(keep | (mask <= _MASKED_OUT))):
            return None
    return keep.expand(batch, 1, 1, mask.shape[-1]).reshape(batch, mask.shape[-1])


def kv_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return q.shape[1] // k.shape[1]


def grouped_queries(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None):
    """``q`` as (batch, kv_heads, groups * q_len, head_dim) and ``mask`` in that layout.

    The query heads that share a key/value head are stacked into one longer sequence of queries,
    so attention runs on k and v as they are (HF's ``repeat_kv`` would copy them ``groups`` times).
    The output, (batch, kv_heads, groups * q_len, head_dim), is ``q``'s layout again after
    ``.view(q.shape)``. A mask shared by all heads is copied ``groups`` times (masks are smaller
    than k and v by a factor of head_dim at equal lengths); a per-head mask is only reshaped.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, groups = k.shape[1], kv_groups(q, k)
    grouped_q = q.reshape(batch, kv_heads, groups * q_len, head_dim)
    if mask is None:
        return grouped_q, None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    mask_batch, mask_heads, _, k_len = mask.shape
    rows = mask.expand(mask_batch, mask_heads, q_len, k.shape[-2])
    if mask_heads == 1:
        grouped_mask = rows.unsqueeze(2).expand(mask_batch, 1, groups, q_len, k.shape[-2])
        return grouped_q, grouped_mask.reshape(mask_batch, 1, groups * q_len, k.shape[-2])
    return grouped_q, rows.reshape(mask_batch, kv_heads, groups * q_len, k.shape[-2])


@functools.cache
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class AttentionBackend:
    """One kernel family. ``priority``: lower is faster, tried first by ``auto``; ``package``: what
    must be installed; ``devices``/``dtypes``: what the kernel runs on (None: anything);
    ``grouped_kv``: whether it runs k/v with fewer heads than q without repeating them."""

    name: str = ""
    priority: int = 100
    package: str | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    grouped_kv: bool = False

    def installed(self) -> bool:
        return self.package is None or _installed(self.package)

    def unsupported_reason(
        self, q: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, causal: bool, k: torch.Tensor | None = None
    ) -> str | None:
        """Why this (installed) backend cannot run these inputs, or None when it can."""
        if self.devices is not None and q.device.type not in self.devices:
            return f"it needs {' or '.join(self.devices)} tensors, got {q.device.type}"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            return f"it needs {' or '.join(map(str, self.dtypes))}, got {q.dtype}"
        if k is not None and kv_groups(q, k) > 1 and not self.grouped_kv:
            return "it needs as many key/value heads as query heads (no grouped-query attention)"
        return self.unsupported_input(q, mask, dropout_p, causal)

    def unsupported_input(self, q, mask, dropout_p: float, causal: bool) -> str | None:
        """Backend-specific limits beyond device, dtype and head grouping (shapes, masks), or None."""
        return None

    def run(self, q, k, v, mask, dropout_p: float, causal: bool, scale: float | None) -> torch.Tensor:
        raise NotImplementedError


def _register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Register one instance of ``cls`` under ``cls.name``."""
    ATTENTION_BACKENDS.register(cls.name, cls())
    return cls


@_register
class SDPABackend(AttentionBackend):
    """``F.scaled_dot_product_attention``: torch picks flash / memory-efficient / cuDNN / CPU kernels."""

    name = "sdpa"
    priority = 10
    grouped_kv = True

    def run(self, q, k, v, mask, dropout_p, causal, scale):
        plain_causal = causal and mask is None and q.shape[-2] == k.shape[-2]
        if not plain_causal:
            mask = merged_mask(mask, causal, q, k)
        grouped = kv_groups(q, k) > 1
        if grouped and not self.native_gqa(q, k, mask, dropout_p):
            if plain_causal:
                mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
            grouped_q, grouped_mask = grouped_queries(q, k, mask)
            out = F.scaled_dot_product_attention(
                grouped_q, k, v, attn_mask=grouped_mask, dropout_p=dropout_p, scale=scale
            )
            return out.view(q.shape[:-1] + v.shape[-1:])
        extra = {"enable_gqa": True} if grouped else {}
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=plain_causal, scale=scale, **extra
        )

    @staticmethod
    def native_gqa(q, k, mask, dropout_p) -> bool:
        """Whether torch's kernel for these inputs reads grouped k/v heads itself (``enable_gqa``)
        instead of repeating them: the CPU flash kernel, which runs without dropout (measured with
        a shape probe, tests/test_op_gqa_attention.py), and the CUDA flash kernel without a mask
        in half precision (transformers' sdpa integration uses the same rule without the dtype
        condition; the float32 kernels are not known to read grouped heads)."""
        if q.device.type == "cpu":
            return dropout_p == 0.0
        half = q.dtype in (torch.float16, torch.bfloat16)
        return q.device.type == "cuda" and half and mask is None and q.shape[-1] <= 256


@_register
class BlockedDropoutBackend(AttentionBackend):
    """Attention with dropout on CPU, one block of queries at a time (``blocked_attention.py``):
    causal blocks see only the keys they may, and the dropout mask costs a quarter of
    ``bernoulli_``. There torch's sdpa leaves its flash kernel for the full-matrix math kernel;
    forward + backward measured 3.6x (GPT-2, causal) and 1.7x (BERT) faster. Without dropout
    sdpa's flash kernel is faster. Under torch.compile the kernel is one opaque custom op, traced
    once per sequence length (the number of blocks is part of its output signature)."""

    name = "blocked_dropout"
    priority = 5
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64)

    def unsupported_input(self, q, mask, dropout_p, causal):
        if mask is not None:
            return "it takes no mask besides causality"
        if not quantisable(dropout_p):
            return (f"it is for dropout in (0, 1) in steps of 1/65536, got {dropout_p} (sdpa's flash kernel runs "
                    "attention without dropout)")
        return None

    def run(self, q, k, v, mask, dropout_p, causal, scale):
        if causal and q.shape[-2] > k.shape[-2]:
            return ATTENTION_BACKENDS.get("sdpa").run(q, k, v, mask, dropout_p, causal, scale)
        return blocked_attention(q, k, v, dropout_p, causal, scale)


@_register
class MathBackend(AttentionBackend):
    """The textbook computation, written out: the reference the other backends are tested against."""

    name = "math"
    priority = 30
    grouped_kv = True

    def run(self, q, k, v, mask, dropout_p, causal, scale):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        batch, heads, q_len, _ = q.shape
        grouped_q, _ = grouped_queries(q, k, None)
        scores = torch.matmul(grouped_q, k.transpose(-2, -1)).view(batch, heads, q_len, k.shape[-2]) * scale
        mask = merged_mask(mask, causal, q, k)
        if mask is not None:
            scores = scores + additive_mask(mask, scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if mask is not None:
            probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
        probs = F.dropout(probs.to(q.dtype), p=dropout_p, training=dropout_p > 0)
        out = torch.matmul(probs.view(batch, k.shape[1], -1, k.shape[-2]), v)
        return out.view(batch, heads, q_len, v.shape[-1])


@_register
class FlashAttnBackend(AttentionBackend):
    """The ``flash-attn`` package (CUDA, fp16/bf16). Padding masks run unpadded through the varlen
    kernel: padded keys are skipped, every query row is still computed. Masks that are not key
    padding, and padding combined with causal, are left to other backends. Grouped k/v heads go
    to the kernels as they are (flash-attn reads them natively)."""

    name = "flash_attn"
    priority = 0
    grouped_kv = True
    package = "flash_attn"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)

    def unsupported_input(self, q, mask, dropout_p, causal):
        if q.shape[-1] > 256:
            return f"it supports head_dim <= 256, got {q.shape[-1]}"
        if mask is not None and causal:
            return "it cannot combine a mask with the causal flag"
        if mask is not None and key_padding(mask, q.shape[0]) is None:
            return "it supports only key-padding masks of shape (batch, 1, 1, k_len)"
        return None

    def run(self, q, k, v, mask, dropout_p, causal, scale):
        from flash_attn import flash_attn_func

        if mask is not None:
            return self._run_padded(q, k, v, key_padding(mask, q.shape[0]), dropout_p, scale)
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=dropout_p, softmax_scale=scale, causal=causal,
        )
        return out.transpose(1, 2)

    @staticmethod
    def _run_padded(q, k, v, keep, dropout_p, scale):
        from flash_attn import flash_attn_varlen_func

        batch, heads, q_len, head_dim = q.shape
        k_len, kv_heads = k.shape[-2], k.shape[1]
        kept = keep.reshape(-1).nonzero().squeeze(1)
        k_lens = keep.sum(dim=1, dtype=torch.int32)
        cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(
            q.transpose(1, 2).reshape(batch * q_len, heads, head_dim),
            k.transpose(1, 2).reshape(batch * k_len, kv_heads, head_dim).index_select(0, kept),
            v.transpose(1, 2).reshape(batch * k_len, kv_heads, head_dim).index_select(0, kept),
            cu_q, cu_k, q_len, int(k_lens.max()),
            dropout_p=dropout_p, softmax_scale=scale, causal=False,
        )
        return out.view(batch, q_len, heads, head_dim).transpose(1, 2)


@_register
class XFormersBackend(AttentionBackend):
    """``xformers.ops.memory_efficient_attention`` (CUDA). ``auto`` prefers ``sdpa``, which ships the
    same memory-efficient kernel; this backend runs when it is named."""

    name = "xformers"
    priority = 20
    package = "xformers"
    devices = ("cuda",)

    def run(self, q, k, v, mask, dropout_p, causal, scale):
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

        if mask is None:
            bias = LowerTriangularFromBottomRightMask() if causal else None
        else:
            bias = self._aligned_bias(additive_mask(merged_mask(mask, causal, q, k), q.dtype), q, k)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)

    @staticmethod
    def _aligned_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The full (b, h, q, k) bias in memory whose rows start on 8-element boundaries (xformers needs it)."""
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[-2]
        padded_len = (k_len + 7) // 8 * 8
        storage = torch.empty(batch, heads, q_len, padded_len, dtype=q.dtype, device=q.device)
        aligned = storage[..., :k_len]
        aligned.copy_(bias.expand(batch, heads, q_len, k_len))
        return aligned


def backends_by_speed() -> list[AttentionBackend]:
    """Registered backends (instances), fastest first: the order ``auto`` tries them in."""
    return sorted((backend for _, backend in ATTENTION_BACKENDS.items()), key=lambda b: b.priority)
