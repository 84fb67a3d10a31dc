"""LM head + cross-entropy without the (tokens x vocab) logits.

For GPT-2 at 8192 tokens the logits alone are 8192 * 50257 * 4 B = 1.6 GB, and their gradient as
much again. Here the tokens go through in chunks: each chunk's logits are made, turned into its
loss and, right away, into its share of the gradients for the hidden states, the weight and the
bias; then they are dropped. Backward only scales the stored gradients (in place) by the incoming
gradient, which works because the loss is a scalar. Peak extra memory is one chunk of logits on top
of the gradients themselves.

Final-logit soft-capping (Gemma2's ``final_logit_softcapping``: ``logits = cap * tanh(logits /
cap)`` before the loss) is applied per chunk, and the chunk's logit gradient is multiplied by the
tanh's derivative ``1 - tanh²``. That needs the tanh next to the capped logits, two chunk-sized
buffers, so with a cap the default chunk holds half as many tokens (same peak memory).
"""
from __future__ import annotations

import torch
from torch import nn

from .amp import autocast_inputs, autocast_off
from ..errors import OpError
from .distributed import whole
from .matching import whole_module
from .registry import register_op

LOGITS_PER_CHUNK = 1 << 26
"""Default chunk budget: 64 Mi logits (256 MiB in float32) per chunk. Every chunk reads the weight
twice and the float32 weight gradient once more; GPT-2's head at 2046 tokens ran 3% faster in two
chunks than in four (CPU, BENCHMARKS.md), for 108 MiB more peak memory."""


ROW_ALIGNMENT = 64
"""Logit rows start this many elements apart (the vocabulary rounded up): with GPT-2's odd 50257
the rows of a dense logits chunk are misaligned for the GEMM that writes them, which measured
1.2x slower on CPU for the whole op (see BENCHMARKS.md)."""


def default_chunk_size(vocab_size: int, softcap: float | None = None) -> int:
    """Tokens per chunk so that a chunk's logit buffers hold about ``LOGITS_PER_CHUNK`` values
    (one buffer, two with ``softcap``)."""
    return max(1, LOGITS_PER_CHUNK // vocab_size // (1 if softcap is None else 2))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``; grads made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_size: int, with_grads: bool,
                softcap: float | None):
        valid = labels != ignore_index
        n_valid = valid.sum()
        row_scale = torch.where(valid, 1.0 / n_valid.float(), 0.0)
        targets = torch.where(valid, labels, 0)
        need_hidden, need_weight, need_bias = (with_grads and g for g in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = _first_or_zeros(weight, hidden.shape[0]) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        want_grads = need_hidden or need_weight or grad_bias is not None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_size = balanced_chunk_size(hidden.shape[0], chunk_size)
        buffer = _aligned_logits_buffer(min(chunk_size, hidden.shape[0]), weight)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows], targets[rows]
            logits = _logits(h, weight, bias, None if buffer is None else buffer[: h.shape[0]]).float()
            if softcap is not None:
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            chunk_loss, grad_logits = _loss_and_logit_grads(logits, y, valid[rows], row_scale[rows], want_grads)
            loss_sum += chunk_loss
            if grad_logits is None:
                continue
            if softcap is not None:
                grad_logits.mul_(tanh.square_().neg_().add_(1.0))
                del tanh
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight:
                _accumulate_mm(grad_weight, grad_logits.t(), h, first=start == 0)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return (loss_sum / n_valid).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice; its gradients are scaled in place and "
                "released by the first backward (retain_graph is not supported for this op)"
            )
        grads, ctx.grads = ctx.grads, None
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None, None, None)


def balanced_chunk_size(rows: int, chunk_size: int) -> int:
    """The fewest chunks of at most ``chunk_size`` rows, made equal: 2046 rows at 667 per chunk go
    as 3 x 512 + 510, not 3 x 667 + 45 (a 45-row GEMM runs at a fraction of the speed of the others)."""
    chunks = max(1, -(-rows // chunk_size))
    return max(1, -(-rows // chunks))


def _aligned_logits_buffer(rows: int, weight: torch.Tensor) -> torch.Tensor | None:
    """(rows, vocab) view of a buffer whose rows are ``ROW_ALIGNMENT`` elements apart, reused by
    every chunk (one allocation per call instead of one per chunk). None under torch.compile,
    which cannot write into such a view (the compiler lays out the logits itself)."""
    if torch.compiler.is_compiling():
        return None
    vocab = weight.shape[0]
    padded = -(-vocab // ROW_ALIGNMENT) * ROW_ALIGNMENT
    return torch.empty(rows, padded, dtype=weight.dtype, device=weight.device)[:, :vocab]


def _logits(h, weight, bias, out: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _loss_and_logit_grads(logits, targets, valid, row_scale, want_grads: bool):
    """Summed loss of one chunk and, if wanted, d(mean loss)/d(logits), computed in place of ``logits``.

    softmax is done by hand (max, exp in place, sum) so that no second chunk-sized buffer is needed.
    """
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    row_sum = exps.sum(dim=-1)
    log_norm = row_max.squeeze(1) + row_sum.log()
    loss = torch.where(valid, log_norm - target_logits, 0.0).sum()
    if not want_grads:
        return loss, None
    grad_logits = exps.mul_((row_scale / row_sum)[:, None])
    grad_logits.scatter_add_(1, targets[:, None], -row_scale[:, None])
    return loss, grad_logits


def _first_or_zeros(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """float32 weight-gradient accumulator: uninitialised when the first chunk will overwrite it
    (zero-filling GPT-2's 100 MiB head gradient took 9 ms a step on CPU), zeros when there is no chunk."""
    make = torch.empty_like if rows else torch.zeros_like
    return make(weight, dtype=torch.float32)


def _accumulate_mm(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """total = a @ b (``first``) or total += a @ b, ``total`` in float32, ``a``, ``b`` in the inputs' dtype."""
    if a.dtype == total.dtype and first:
        torch.mm(a, b, out=total)
    elif a.dtype == total.dtype:
        total.addmm_(a, b)
    elif first:
        total.copy_(a.mm(b))
    else:
        total += a.mm(b)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=...)`` (mean over the
    non-ignored tokens) without materialising the logits; with ``softcap`` the logits are
    ``softcap * tanh(logits / softcap)`` first (Gemma2's final-logit soft-capping).

    ``hidden``: (..., hidden_size); ``weight``: (vocab, hidden_size) as in ``nn.Linear``;
    ``labels``: (...) token ids aligned with ``hidden`` (shift them first for causal LM);
    ``chunk_size``: tokens per chunk, default ``default_chunk_size(vocab, softcap)``. The weight may
    be tied to the input embeddings: its gradient adds to theirs as any other use would. With every token
    ignored the loss is NaN and the gradients zero, as with ``F.cross_entropy``. Under autocast the
    inputs are cast to the autocast dtype first, as ``F.linear`` would be. DTensor inputs (a
    vocabulary-parallel head under tensor parallelism) are gathered first, gradients flowing back
    to the shards.
    """
    hidden, weight, bias, labels = whole(hidden, weight, bias, labels)  # a vocabulary-parallel head, gathered
    if hidden.shape[:-1] != labels.shape:
        raise OpError(
            f"labels of shape {tuple(labels.shape)} do not match hidden states of shape {tuple(hidden.shape)} "
            f"(expected labels of shape {tuple(hidden.shape[:-1])})"
        )
    if hidden.shape[-1] != weight.shape[-1]:
        raise OpError(
            f"weight of shape {tuple(weight.shape)} does not fit hidden size {hidden.shape[-1]} "
            "(expected (vocab, hidden_size), the nn.Linear layout)"
        )
    softcap = check_softcap(softcap)
    chunk_size = default_chunk_size(weight.shape[0], softcap) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise OpError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    device_type = hidden.device.type
    hidden, weight, bias = autocast_inputs(device_type, hidden, weight, bias)
    with autocast_off(device_type):
        return _ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
            ignore_index, chunk_size, torch.is_grad_enabled(), softcap,
        )


def check_softcap(softcap) -> float | None:
    """``softcap`` as a float, or None (no capping); OpError unless it is a positive number."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise OpError(f"softcap must be a positive number (the logit cap) or None, got {softcap!r}")
    return float(softcap)


@register_op("fused_linear_cross_entropy")
class FusedLinearCrossEntropy(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`, like ``nn.CrossEntropyLoss``.

    ``forward(hidden_states, weight, labels, bias=None)`` returns the mean loss; the LM head's
    weight (often tied to the embeddings) is passed in, so no parameter is copied or owned.
    ``softcap``: final-logit soft-capping; :meth:`from_config` reads it from a Hugging Face config.
    """

    def __init__(self, ignore_index: int = -100, chunk_size: int | None = None, softcap: float | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.softcap = check_softcap(softcap)

    @classmethod
    def from_config(cls, config, ignore_index: int = -100, chunk_size: int | None = None) -> "FusedLinearCrossEntropy":
        """The loss of a causal LM with this config: its ``final_logit_softcapping`` when it has one."""
        return cls(ignore_index, chunk_size, getattr(config, "final_logit_softcapping", None))

    @classmethod
    def from_match(cls, match, ignore_index: int = -100, chunk_size: int | None = None,
                   softcap: float | str | None = "auto") -> "FusedLinearCrossEntropy":
        """For a module with ``forward(hidden_states, weight, labels, bias=None)``; ``softcap="auto"``
        takes the model config's ``final_logit_softcapping`` (None when it has none)."""
        whole_module(match, "fused_linear_cross_entropy")
        if softcap == "auto":
            softcap = match.config("final_logit_softcapping")
        return cls(ignore_index=ignore_index, chunk_size=chunk_size, softcap=softcap)

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden_states, weight, labels, bias, self.ignore_index, self.chunk_size, self.softcap
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}, softcap={self.softcap}"
