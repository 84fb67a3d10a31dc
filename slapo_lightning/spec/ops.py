"""Named ops a ``replace`` step can swap in, and how each is built from what was matched.

An op factory receives a ``Match`` (the schedule, the matched subgraphs, the variant's tags) and
the step's arguments, and returns an initialised module: ``FusedQKV`` takes the weights of the
three Linears it replaces, ``FlashAttentionOp`` its scale, dropout probability and causality from
the matched graph. A factory may return ``Built`` to also pass ``concrete_args`` or to choose which
pattern inputs reach the op's ``forward``.

Ops are referenced by name (factories registered here, then any op class in the op library's
``OPS``) or by import path: a class with a ``from_match(match, **args)`` classmethod, any other
``nn.Module`` class (built as ``cls(**args)``), or a factory function ``fn(match, **args)``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import RegistryError, SpecError, unknown
from ..op.registry import OPS
from ..core.pattern import Subgraph
from ..registry import Registry, import_object
from .refs import is_import_path


@dataclass
class Match:
    """What a replacement replaces: whole module (no subgraphs) or the subgraphs of one match."""

    sch: Any
    subgraphs: list[Subgraph] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)

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
        """The first of ``names`` found on the model's HF config (module's own, then the root's)."""
        for owner in (self.module, self.sch.root.mod):
            config = getattr(owner, "config", None)
            for name in names:
                if config is not None and getattr(config, name, None) is not None:
                    return getattr(config, name)
        return default


@dataclass
class Built:
    """A factory's result: the op, ``concrete_args`` for its forward, and which pattern inputs to
    bind (None: every input that is a graph value; literals are hyper-parameters the factory used)."""

    module: nn.Module
    concrete_args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] | None = None


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


OP_FACTORIES: Registry = Registry("op")


def register_op_factory(name: str, factory: Callable | None = None, *, overwrite: bool = False):
    """Register ``factory(match, **args) -> nn.Module | Built`` as ``op: <name>``; usable as a decorator."""
    return OP_FACTORIES.register(name, factory, overwrite=overwrite)


def op_names() -> list[str]:
    return sorted(set(OP_FACTORIES.names()) | set(OPS.names()))


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
    if ref in OP_FACTORIES:
        return _as_ref(ref, OP_FACTORIES.get(ref)), args
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
