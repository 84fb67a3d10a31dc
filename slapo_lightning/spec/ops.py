"""Named ops a ``replace`` step can swap in, and how each is built from what was matched.

There is one registry, the op library's ``OPS``. An op class builds itself from a ``Match`` (the
schedule, the matched subgraphs, the variant's tags) and the step's arguments through its
``from_match(match, **args)`` classmethod: ``FusedQKV`` takes the weights of the three Linears it
replaces, ``FlashAttentionOp`` its scale, dropout probability and causality from the matched
graph, ``FastDropout`` the replaced module's ``p``. ``from_match`` may return ``Built`` to also
pass ``concrete_args`` or to choose which pattern inputs reach the op's ``forward``.

Ops are referenced by registered name or by import path: a class with ``from_match``, any other
``nn.Module`` class (built as ``cls(**args)``), or a factory function ``fn(match, **args)``
(``register_op_factory`` registers such a function in ``OPS`` under a name).
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import OpError, RegistryError, SpecError, unknown
from ..op.matching import Built
from ..op.registry import OPS
from ..core.pattern import Subgraph
from ..core.tracer import train_only_probability
from ..registry import Registry, import_object
from .builtin_patterns import DROPOUT_TARGETS
from .refs import is_import_path


@dataclass
class Match:
    """What a replacement replaces: whole module (no subgraphs) or the subgraphs of one match."""

    sch: Any
    subgraphs: list[Subgraph] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    model_config: Any = None  # the model's HF config when ``sch`` is a layer on its own (a variant made later)

    @property
    def module(self) -> nn.Module:
        """The scheduled module (the one replaced as a whole, or the one holding the match)."""
        return self.sch.mod

    @property
    def values(self) -> dict[str, Any]:
        """Pattern parameter -> matched value (graph node or literal), first subgraph."""
        if not self.subgraphs:
            return {}
        first = self.subgraphs[0]
        return dict(zip(first.param_names, first.inputs))

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for sg in self.subgraphs for n in sg.nodes]

    def called_modules(self, cls: type | tuple[type, ...] = nn.Module) -> list[nn.Module]:
        """Modules called inside the match (in graph order), optionally only instances of ``cls``."""
        found = [self.module.get_submodule(n.target) for n in self.nodes if n.op == "call_module"]
        return [m for m in found if isinstance(m, cls)]

    def config(self, *names: str, default: Any = None) -> Any:
        """The first of ``names`` found on the model's HF config (module's own, the root's, then
        the one the match was made with)."""
        for config in (getattr(self.module, "config", None), getattr(self.sch.root.mod, "config", None),
                       self.model_config):
            for name in names:
                if config is not None and getattr(config, name, None) is not None:
                    return getattr(config, name)
        return default

    def dropout_probability(self) -> float:
        """The dropout probability inside the match: a dropout module's ``p``, a functional
        dropout's literal, or the pattern's ``dropout_p`` (unwrapping the tracer's train-only
        marker); OpError when it is computed at run time."""
        for node in self.nodes:
            if node.op == "call_module":
                module = self.module.get_submodule(node.target)
                if isinstance(module, nn.Dropout):
                    return float(module.p)
            elif node.op == "call_function" and node.target in DROPOUT_TARGETS:
                p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
                if isinstance(p, numbers.Number):
                    return float(p)
        p = self.values.get("dropout_p", 0.0)
        if isinstance(p, fx.Node) and p.target is train_only_probability:
            p = p.args[0]
        if not isinstance(p, numbers.Number):
            raise OpError(f"cannot read the dropout probability of the match (found {p!r})")
        return float(p)


@dataclass(frozen=True)
class OpRef:
    """A resolved ``op:`` reference: ``build(match, **args)`` and the arguments it accepts."""

    name: str
    build: Callable[..., nn.Module | Built]
    signature: inspect.Signature

    def check_args(self, args: dict[str, Any]) -> str | None:
        """A problem description, or None when ``args`` bind."""
        params = self.signature.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = [k for k in args if k not in params and not takes_any]
        if extra:
            valid = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
            return unknown(f"argument of op {self.name!r}:", extra[0], valid)
        try:
            self.signature.bind(**args)
        except TypeError as exc:
            return f"op {self.name!r}: {exc}"
        return None


OP_FACTORIES: Registry = OPS
"""The op registry under its former spec-side name (the same object as ``slapo_lightning.op.OPS``)."""


def register_op_factory(name: str, factory: Callable | None = None, *, overwrite: bool = False):
    """Register ``factory(match, **args) -> nn.Module | Built`` as ``op: <name>`` in ``OPS``; usable
    as a decorator. Op classes register themselves with ``register_op`` and build with ``from_match``."""
    return OPS.register(name, factory, overwrite=overwrite)


def op_names() -> list[str]:
    return OPS.names()


def _without_first(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _as_ref(name: str, obj: Any) -> OpRef:
    if isinstance(obj, type) and callable(getattr(obj, "from_match", None)):
        return OpRef(name, obj.from_match, _without_first(inspect.signature(obj.from_match)))
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return OpRef(name, lambda match, **args: obj(**args), inspect.signature(obj))
    if callable(obj):
        return OpRef(name, obj, _without_first(inspect.signature(obj)))
    raise SpecError(f"op {name!r} is a {type(obj).__name__}, not an nn.Module class or a factory function")


def resolve_op(ref: Any) -> tuple[OpRef, dict[str, Any]]:
    """The op a spec names and the arguments carried by a ``{_target_: ..., **args}`` reference."""
    args: dict[str, Any] = {}
    if isinstance(ref, dict):
        if "_target_" not in ref:
            raise SpecError(f"op given as a mapping needs a '_target_' import path, got keys {sorted(ref)}")
        args = {k: v for k, v in ref.items() if k != "_target_"}
        ref = ref["_target_"]
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"op must be a name or an import path 'pkg.module:attr', got {ref!r}")
    if ref in OPS:
        return _as_ref(ref, OPS.get(ref)), args
    if is_import_path(ref):
        try:
            return _as_ref(ref, import_object(ref)), args
        except RegistryError as exc:
            raise SpecError(f"op {exc}") from None
    raise SpecError(unknown("op", ref, op_names(), more="(or an import path 'pkg.module:attr')"))


def build_op(op: OpRef, match: Match, args: dict[str, Any]) -> Built:
    built = op.build(match, **args)
    if isinstance(built, nn.Module):
        built = Built(built)
    if not isinstance(built, Built):
        raise SpecError(f"op {op.name!r} built a {type(built).__name__}, expected an nn.Module")
    return built
