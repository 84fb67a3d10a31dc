"""Query, key and value projections as one GEMM instead of three."""
from __future__ import annotations

import torch
from torch import nn

from .amp import autocast_inputs, autocast_off
from .distributed import refuse_distributed, whole
from ..errors import OpError
from .registry import register_op

PROJECTIONS = ("query", "key", "value")


class _SplitProjection(torch.autograd.Function):
    """``x @ W.T + b`` as one GEMM, returned as column blocks of the given ``widths``.

    Plain ``linear(...).split(...)`` would concatenate the blocks' gradients into one buffer before
    the backward GEMMs; here each block's gradient goes through its own slice of the weight, which
    saves that buffer at the same number of FLOPs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, widths: tuple[int, ...]):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.widths = widths
        ctx.has_bias = bias is not None
        out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        return tuple(out.split(list(widths), dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = weight.new_zeros(weight.shape[0]) if need_bias and ctx.has_bias else None
        start = 0
        for width, grad in zip(ctx.widths, grads):
            rows = slice(start, start + width)
            start += width
            if grad is None:
                continue
            if need_x:
                grad_x = grad.mm(weight[rows]) if grad_x is None else grad_x.addmm_(grad, weight[rows])
            if grad_weight is not None:
                torch.mm(grad.t(), x, out=grad_weight[rows])
            if grad_bias is not None:
                grad_bias[rows] = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None


@register_op("fused_qkv")
class FusedQKV(nn.Module):
    """One ``nn.Linear(hidden_size, q_width + 2 * kv_width)`` whose output rows are [Wq; Wk; Wv].

    ``q_width = n_heads * head_dim`` and ``kv_width = n_kv_heads * head_dim``: equal for multi-head
    attention (BERT, GPT-2), smaller k/v for grouped-query attention (Llama, Mistral, Qwen: fewer
    key/value heads), and ``head_dim`` need not be ``hidden_size / n_heads`` (Qwen3, Gemma).

    ``forward(hidden_states)`` returns the tuple ``(q, k, v)``: each (batch, seq, width), the
    layout of the Linears it replaces, or (batch, heads, seq, head_dim) when ``head_layout=True``
    (k and v with ``n_kv_heads`` heads). The three are views of the one GEMM output (no copies).
    Backward takes their three gradients one by one (see ``_SplitProjection``), so it needs no
    (tokens, total width) gradient buffer.

    Checkpoint protocol (used by the scheduling core to keep the original ``query``/``key``/
    ``value`` state_dict keys): ``split_state()`` returns ``[{"weight": Wq, "bias": bq}, {...k},
    {...v}]`` in ``nn.Linear`` layout and in each Linear's own shape, as views of the fused
    parameters (no ``"bias"`` key when the op has no bias); ``load_split_state(states)`` writes such
    a list back into the fused parameters. The core's state-dict hooks on the parent translate
    ``<prefix>query.weight`` and friends to and from these two calls.

    GPT-2's ``c_attn`` is already a single fused ``Conv1D``, so there is no ``from_conv1d``: it
    would change the weight layout (and the checkpoint keys) for no saving.
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        bias: bool = True,
        head_layout: bool = False,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
    ):
        super().__init__()
        if head_dim is None:
            if hidden_size % n_heads:
                raise OpError(
                    f"hidden_size {hidden_size} is not divisible by n_heads {n_heads} (pass head_dim when the heads "
                    "are not hidden_size / n_heads wide)"
                )
            head_dim = hidden_size // n_heads
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise OpError(f"n_kv_heads {n_kv_heads} must divide n_heads {n_heads} (grouped-query attention)")
        self.hidden_size = hidden_size
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.head_layout = head_layout
        self.widths = (n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim)
        self.fused_linear = nn.Linear(hidden_size, sum(self.widths), bias=bias)

    @classmethod
    def from_linears(
        cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, n_heads: int, head_layout: bool = False
    ) -> "FusedQKV":
        """A FusedQKV computing exactly ``(q(x), k(x), v(x))``, weights copied from the three Linears.

        ``head_dim`` is ``q.out_features / n_heads`` and the key/value head count
        ``k.out_features / head_dim``; k and v must have the same width.
        """
        refuse_distributed("fused_qkv", [q, k, v])
        linears = dict(zip(PROJECTIONS, (q, k, v)))
        shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
        hidden = q.in_features
        fits = (
            all(lin.in_features == hidden for lin in (k, v))
            and k.out_features == v.out_features
            and q.out_features % n_heads == 0
            and k.out_features % (q.out_features // n_heads or 1) == 0
        )
        if not fits:
            raise OpError(
                f"FusedQKV needs Linears reading the same input, k and v of one width, q of n_heads={n_heads} heads and "
                f"k/v of whole heads of that size; got weight shapes {shapes}"
            )
        has_bias = {name: lin.bias is not None for name, lin in linears.items()}
        if len(set(has_bias.values())) != 1:
            raise OpError(f"FusedQKV needs all three Linears with a bias or all without, got {has_bias}")
        head_dim = q.out_features // n_heads
        n_kv_heads = k.out_features // head_dim
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise OpError(
                f"FusedQKV: k/v have {n_kv_heads} heads of size {head_dim}, which does not divide n_heads={n_heads}; "
                f"got weight shapes {shapes}"
            )
        with torch.device("meta"):  # no random init of weights that are overwritten next
            fused = cls(hidden, n_heads, bias=q.bias is not None, head_layout=head_layout, n_kv_heads=n_kv_heads,
                        head_dim=head_dim)
        fused = fused.to_empty(device=q.weight.device).to(dtype=q.weight.dtype)
        fused.load_split_state([_linear_state(lin) for lin in (q, k, v)])
        fused.fused_linear.weight.requires_grad_(q.weight.requires_grad)
        if fused.fused_linear.bias is not None:
            fused.fused_linear.bias.requires_grad_(q.bias.requires_grad)
        fused.train(q.training)
        return fused

    @classmethod
    def from_match(cls, match, n_heads: int | None = None) -> "FusedQKV":
        """One GEMM for the three q/k/v Linears of the match, initialised from their weights;
        ``n_heads`` defaults to the model config's ``num_attention_heads`` (or ``n_head``)."""
        linears = match.called_modules(nn.Linear)
        if len(linears) != 3:
            raise OpError(f"fused_qkv replaces three Linears (q, k, v), the match calls {len(linears)}")
        n_heads = n_heads or match.config("num_attention_heads", "n_head")
        if n_heads is None:
            raise OpError("fused_qkv: pass n_heads (the model has no config.num_attention_heads)")
        return cls.from_linears(*linears, n_heads=int(n_heads))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device_type = hidden_states.device.type
        x, weight, bias = autocast_inputs(
            device_type, hidden_states.reshape(-1, self.hidden_size), self.fused_linear.weight, self.fused_linear.bias
        )
        with autocast_off(device_type):
            parts = _SplitProjection.apply(x, weight, bias, self.widths)
        leading = hidden_states.shape[:-1]
        if not self.head_layout:
            return tuple(part.view(*leading, width) for part, width in zip(parts, self.widths))
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        return tuple(part.view(*leading, n, self.head_dim).transpose(-3, -2) for part, n in zip(parts, heads))

    def split_state(self) -> list[dict[str, torch.Tensor]]:
        """``[{"weight": Wq, "bias": bq}, {...k}, {...v}]``: detached views of the fused parameters."""
        weights = self.fused_linear.weight.detach().split(list(self.widths), dim=0)
        bias = self.fused_linear.bias
        biases = bias.detach().split(list(self.widths)) if bias is not None else (None,) * 3
        return [_state(w, b) for w, b in zip(weights, biases)]

    @torch.no_grad()
    def load_split_state(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Copy per-projection ``{"weight", "bias"}`` dicts (q, k, v order) into the fused parameters."""
        if len(states) != 3:
            raise OpError(f"load_split_state needs 3 states (query, key, value), got {len(states)}")
        for name, target, state in zip(PROJECTIONS, self.split_state(), states):
            if set(state) != set(target):
                raise OpError(f"{name} state has keys {sorted(state)}, expected {sorted(target)}")
            for key, value in state.items():
                if value.shape != target[key].shape:
                    raise OpError(
                        f"{name}.{key} has shape {tuple(value.shape)}, expected {tuple(target[key].shape)}"
                    )
        for key, param in self.fused_linear.named_parameters():
            if _is_dtensor(param):  # sharded (FSDP2): write whole tensors, laid out as the shard is
                from torch.distributed.tensor import distribute_tensor

                joined = torch.cat([whole(state[key])[0].to(param.device) for state in states])
                param.copy_(distribute_tensor(joined.to(param.dtype), param.device_mesh, param.placements))
            else:
                param.copy_(torch.cat([whole(state[key])[0].to(param.device) for state in states]))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, head_layout={self.head_layout}")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _state(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def _linear_state(linear: nn.Linear) -> dict[str, torch.Tensor]:
    return _state(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
