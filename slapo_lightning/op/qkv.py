"""Query, key and value projections as one GEMM instead of three."""
from __future__ import annotations

import torch
from torch import nn

from .amp import autocast_inputs, autocast_off
from ..errors import OpError
from .registry import register_op

PROJECTIONS = ("query", "key", "value")


class _SplitProjection(torch.autograd.Function):
    """``x @ W.T + b`` as one GEMM, returned as column blocks of ``width``.

    Plain ``linear(...).split(...)`` would concatenate the blocks' gradients into one buffer before
    the backward GEMMs; here each block's gradient goes through its own slice of the weight, which
    saves that buffer at the same number of FLOPs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, width: int):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.width = width
        ctx.has_bias = bias is not None
        out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        return tuple(out.split(width, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = weight.new_zeros(weight.shape[0]) if need_bias and ctx.has_bias else None
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            rows = slice(index * ctx.width, (index + 1) * ctx.width)
            if need_x:
                grad_x = grad.mm(weight[rows]) if grad_x is None else grad_x.addmm_(grad, weight[rows])
            if grad_weight is not None:
                torch.mm(grad.t(), x, out=grad_weight[rows])
            if grad_bias is not None:
                grad_bias[rows] = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None


@register_op("fused_qkv")
class FusedQKV(nn.Module):
    """One ``nn.Linear(hidden_size, 3 * hidden_size)`` whose output rows are [Wq; Wk; Wv].

    ``forward(hidden_states)`` returns the tuple ``(q, k, v)``: each (batch, seq, hidden_size), the
    layout of the Linears it replaces, or (batch, heads, seq, head_dim) when ``head_layout=True``.
    The three are views of the one GEMM output (no copies). Backward takes their three gradients
    one by one (see ``_SplitProjection``), so it needs no (tokens, 3 * hidden_size) gradient buffer.

    Checkpoint protocol (used by the scheduling core to keep the original ``query``/``key``/
    ``value`` state_dict keys): ``split_state()`` returns ``[{"weight": Wq, "bias": bq}, {...k},
    {...v}]`` in ``nn.Linear`` layout, as views of the fused parameters (no ``"bias"`` key when the
    op has no bias); ``load_split_state(states)`` writes such a list back into the fused parameters.
    The core's state-dict hooks on the parent translate ``<prefix>query.weight`` and friends to and
    from these two calls.

    GPT-2's ``c_attn`` is already a single fused ``Conv1D``, so there is no ``from_conv1d``: it
    would change the weight layout (and the checkpoint keys) for no saving.
    """

    def __init__(self, hidden_size: int, n_heads: int, bias: bool = True, head_layout: bool = False):
        super().__init__()
        if hidden_size % n_heads:
            raise OpError(f"hidden_size {hidden_size} is not divisible by n_heads {n_heads}")
        self.hidden_size = hidden_size
        self.n_heads = n_heads
        self.head_layout = head_layout
        self.fused_linear = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)

    @classmethod
    def from_linears(
        cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, n_heads: int, head_layout: bool = False
    ) -> "FusedQKV":
        """A FusedQKV computing exactly ``(q(x), k(x), v(x))``, weights copied from the three Linears."""
        linears = dict(zip(PROJECTIONS, (q, k, v)))
        shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
        hidden = q.in_features
        if any(shape != (hidden, hidden) for shape in shapes.values()):
            raise OpError(f"FusedQKV needs three square Linears of the same size, got weight shapes {shapes}")
        has_bias = {name: lin.bias is not None for name, lin in linears.items()}
        if len(set(has_bias.values())) != 1:
            raise OpError(f"FusedQKV needs all three Linears with a bias or all without, got {has_bias}")
        with torch.device("meta"):  # no random init of weights that are overwritten next
            fused = cls(hidden, n_heads, bias=q.bias is not None, head_layout=head_layout)
        fused = fused.to_empty(device=q.weight.device).to(dtype=q.weight.dtype)
        fused.load_split_state([_linear_state(lin) for lin in (q, k, v)])
        fused.fused_linear.weight.requires_grad_(q.weight.requires_grad)
        if fused.fused_linear.bias is not None:
            fused.fused_linear.bias.requires_grad_(q.bias.requires_grad)
        fused.train(q.training)
        return fused

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device_type = hidden_states.device.type
        x, weight, bias = autocast_inputs(
            device_type, hidden_states.reshape(-1, self.hidden_size), self.fused_linear.weight, self.fused_linear.bias
        )
        with autocast_off(device_type):
            parts = _SplitProjection.apply(x, weight, bias, self.hidden_size)
        leading = hidden_states.shape[:-1]
        if not self.head_layout:
            return tuple(part.view(*leading, self.hidden_size) for part in parts)
        head_dim = self.hidden_size // self.n_heads
        return tuple(part.view(*leading, self.n_heads, head_dim).transpose(-3, -2) for part in parts)

    def split_state(self) -> list[dict[str, torch.Tensor]]:
        """``[{"weight": Wq, "bias": bq}, {...k}, {...v}]``: detached views of the fused parameters."""
        weights = self.fused_linear.weight.detach().split(self.hidden_size, dim=0)
        bias = self.fused_linear.bias
        biases = bias.detach().split(self.hidden_size) if bias is not None else (None,) * 3
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
                target[key].copy_(value)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, n_heads={self.n_heads}, head_layout={self.head_layout}"


def _state(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def _linear_state(linear: nn.Linear) -> dict[str, torch.Tensor]:
    return _state(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
