"""Gated MLP of today's decoders, ``down(act(gate(x)) * up(x))``, keeping less for backward.

Llama, Mistral, Qwen2/3, OLMo2 and Gemma have separate ``gate_proj`` and ``up_proj`` Linears;
Phi-3 has one ``gate_up_proj`` whose output is chunked into gate and up. The activation is SiLU
(most) or the tanh GELU (Gemma's ``gelu_pytorch_tanh``). Eager autograd keeps five activations
per token: the input, the gate, act(gate), up and their product. This op keeps the input, gate and
up and recomputes the other two in backward (two elementwise ops), which saves
``2 * tokens * intermediate_size`` values per layer. The GEMMs are those of the modules it
replaces; on CUDA the elementwise gate and its backward go through torch.compile (one kernel each).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import refuse_distributed
from ..errors import OpError, unknown
from .amp import autocast_inputs, autocast_off
from .compiled import compiled_on_cuda
from .fused import gelu_approximate_for
from .matching import whole_module
from .registry import register_op

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

SILU_NAMES = ("silu", "swish")
SILU_CLASSES = ("SiLU", "SiLUActivation")


def activation_for(activation: str | nn.Module | Callable) -> str:
    """The name in ``ACTIVATIONS`` of a model's activation: one of those names, an ACT2FN name, a
    module or a function."""
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return activation
    if isinstance(activation, str) and activation in SILU_NAMES:
        return "silu"
    if activation is F.silu or type(activation).__name__ in SILU_CLASSES:
        return "silu"
    try:
        return {"none": "gelu", "tanh": "gelu_tanh"}[gelu_approximate_for(activation)]
    except OpError:
        raise OpError(
            f"{activation!r} is not an activation this gated MLP reproduces; valid: {', '.join(ACTIVATIONS)}, the "
            f"ACT2FN names {', '.join(SILU_NAMES)} and the GELU names, nn.SiLU, nn.GELU, F.silu, F.gelu"
        ) from None


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise OpError(unknown("gated-MLP activation", activation, ACTIVATIONS, did_you_mean=False))
    return activation


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_backward(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if activation == "gelu_tanh" else "none")


@compiled_on_cuda
def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return _act(gate, activation) * up


@compiled_on_cuda
def _gated_grads(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """(grad_gate, grad_up, h): the gate's backward and the recomputed product for down's weight."""
    act = _act(gate, activation)
    return _act_backward(grad_h * up, gate, activation), grad_h * act, act * up


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


class _GatedMLPFunction(torch.autograd.Function):
    """down(act(gate) * up) on 2-D ``x``. ``w_up is None``: ``w_gate`` is the chunked [gate; up]."""

    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation: str):
        chunked = w_up is None
        if chunked:
            gate_up = _linear(x, w_gate, b_gate)
            gate, up = gate_up.chunk(2, dim=-1)
            ctx.save_for_backward(x, gate_up, w_gate, w_down)
        else:
            gate, up = _linear(x, w_gate, b_gate), _linear(x, w_up, b_up)
            ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        ctx.activation, ctx.chunked = activation, chunked
        ctx.has_bias = (b_gate is not None, b_up is not None, b_down is not None)
        return _linear(_gated(gate, up, activation), w_down, b_down)

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        if ctx.chunked:
            x, gate_up, w_gate, w_down = ctx.saved_tensors
            gate, up = gate_up.chunk(2, dim=-1)
            w_up = None
        else:
            x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        grad_h = grad_out.mm(w_down)
        grad_gate, grad_up, h = _gated_grads(grad_h, gate, up, ctx.activation)
        del grad_h
        grad_w_down = grad_out.t().mm(h) if need[5] else None
        grad_b_down = grad_out.sum(0) if need[6] and ctx.has_bias[2] else None
        del h
        if ctx.chunked:
            grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1)
            del grad_gate, grad_up
            grad_x = grad_gate_up.mm(w_gate) if need[0] else None
            grad_w_gate = grad_gate_up.t().mm(x) if need[1] else None
            grad_b_gate = grad_gate_up.sum(0) if need[2] and ctx.has_bias[0] else None
            return grad_x, grad_w_gate, grad_b_gate, None, None, grad_w_down, grad_b_down, None
        grad_x = grad_gate.mm(w_gate).addmm_(grad_up, w_up) if need[0] else None
        grad_w_gate = grad_gate.t().mm(x) if need[1] else None
        grad_b_gate = grad_gate.sum(0) if need[2] and ctx.has_bias[0] else None
        grad_w_up = grad_up.t().mm(x) if need[3] else None
        grad_b_up = grad_up.sum(0) if need[4] and ctx.has_bias[1] else None
        return grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down, None


@register_op("gated_mlp")
class GatedMLP(nn.Module):
    """``forward(hidden_states)`` = down_proj(act(gate) * up), gate and up from ``gate_proj`` and
    ``up_proj`` or from the two halves of ``gate_up_proj`` (``chunked``).

    The children carry the Hugging Face names, so replacing a ``LlamaMLP`` or ``Phi3MLP`` as a whole
    keeps its state_dict keys. The constructors below reuse the original Linears (the same
    Parameter objects), and :meth:`from_module` checks on a probe input that the op computes what
    the module computes before it returns.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        chunked: bool = False,
    ):
        super().__init__()
        self.activation = _check_activation(activation)
        self.chunked = chunked
        if chunked:
            self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    @classmethod
    def _wrap(cls, projections: dict[str, nn.Module], activation, training: bool) -> "GatedMLP":
        refuse_distributed("gated_mlp", projections.values())
        for name, linear in projections.items():
            if not isinstance(linear, nn.Linear):
                raise OpError(f"GatedMLP: {name} must be an nn.Linear, got {type(linear).__name__}")
        down = projections["down_proj"]
        inner, hidden = down.in_features, down.out_features
        wanted = {"gate_proj": inner, "up_proj": inner, "gate_up_proj": 2 * inner}
        problems = [
            f"{name} is {lin.in_features} -> {lin.out_features}, expected {hidden} -> {wanted[name]}"
            for name, lin in projections.items()
            if name != "down_proj" and (lin.in_features, lin.out_features) != (hidden, wanted[name])
        ]
        if problems:
            raise OpError(
                f"GatedMLP: projections do not fit down_proj ({inner} -> {hidden}): {'; '.join(problems)}"
            )
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.activation = activation_for(activation)
        mlp.chunked = "gate_up_proj" in projections
        for name, linear in projections.items():
            setattr(mlp, name, linear)
        mlp.train(training)
        return mlp

    @classmethod
    def from_linears(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation) -> "GatedMLP":
        """down(act(gate(x)) * up(x)) with these very Linears; ``activation`` as ``activation_for``."""
        return cls._wrap({"gate_proj": gate, "up_proj": up, "down_proj": down}, activation, gate.training)

    @classmethod
    def from_gate_up(cls, gate_up: nn.Linear, down: nn.Linear, activation) -> "GatedMLP":
        """Phi-3 style: ``gate, up = gate_up(x).chunk(2, -1)``, then down(act(gate) * up)."""
        return cls._wrap({"gate_up_proj": gate_up, "down_proj": down}, activation, gate_up.training)

    @classmethod
    def from_module(cls, mlp: nn.Module) -> "GatedMLP":
        """From a Hugging Face gated MLP: ``gate_proj``/``up_proj`` or ``gate_up_proj``, ``down_proj``
        and the activation module ``act_fn`` or ``activation_fn``. The module is run once on a probe
        input (no gradients) and must give the op's output, else ``OpError``."""
        activation = next((getattr(mlp, n) for n in ("act_fn", "activation_fn") if hasattr(mlp, n)), None)
        if activation is None or not hasattr(mlp, "down_proj"):
            raise OpError(
                f"{type(mlp).__name__} is not a gated MLP this op knows: it needs down_proj and act_fn or activation_fn"
            )
        if hasattr(mlp, "gate_up_proj"):
            op = cls.from_gate_up(mlp.gate_up_proj, mlp.down_proj, activation)
        elif hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            op = cls.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation)
        else:
            raise OpError(f"{type(mlp).__name__} has neither gate_proj and up_proj nor gate_up_proj")
        op.train(mlp.training)
        _check_same(op, mlp)
        return op

    @classmethod
    def from_match(cls, match) -> "GatedMLP":
        """The scheduled gated MLP module replaced as a whole (:meth:`from_module`), or the Linears
        of a matched ``down(act(gate(x)) * up(x))`` told apart by dataflow (down makes the output,
        up feeds the product directly, gate through the activation), with the pattern's
        ``activation`` tag."""
        if not match.subgraphs:
            return cls.from_module(whole_module(match, "gated_mlp"))
        nodes = [n for n in match.nodes if n.op == "call_module"
                 and isinstance(match.module.get_submodule(n.target), nn.Linear)]
        output = match.subgraphs[0].outputs[0]
        down = [n for n in nodes if n is output]
        inner = [n for n in nodes if n is not output]
        if len(down) != 1 or len(inner) not in (1, 2) or "activation" not in match.tags:
            raise OpError(f"gated_mlp: expected a down Linear making the output and one or two Linears before it, "
                          f"found {[n.target for n in nodes]} (output {output})")
        linear = lambda n: match.module.get_submodule(n.target)  # noqa: E731
        activation = match.tags["activation"]
        if len(inner) == 1:
            return cls.from_gate_up(linear(inner[0]), linear(down[0]), activation)
        up = [n for n in inner if any(u.target in (operator.mul, "mul") for u in n.users)]
        gate = [n for n in inner if n not in up]
        if len(up) != 1 or len(gate) != 1:
            raise OpError(f"gated_mlp: cannot tell gate from up among {[n.target for n in inner]}")
        return cls.from_linears(linear(gate[0]), linear(up[0]), linear(down[0]), activation)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device_type = hidden_states.device.type
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.chunked:
            projections = (self.gate_up_proj.weight, self.gate_up_proj.bias, None, None)
        else:
            projections = (self.gate_proj.weight, self.gate_proj.bias, self.up_proj.weight, self.up_proj.bias)
        tensors = autocast_inputs(device_type, x, *projections, self.down_proj.weight, self.down_proj.bias)
        with autocast_off(device_type):
            out = _GatedMLPFunction.apply(*tensors, self.activation)
        return out.view(*hidden_states.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, chunked={self.chunked}"


@torch.no_grad()
def _check_same(op: GatedMLP, mlp: nn.Module) -> None:
    weight = op.down_proj.weight
    if weight.device.type == "meta":
        return
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    want, got = mlp(x), op(x)
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    if not (isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(got, want, rtol=tol, atol=tol)):
        raise OpError(
            f"{type(mlp).__name__} does not compute down_proj(act(gate) * up) with activation {op.activation!r} "
            "on a probe input; it is left as it is"
        )
