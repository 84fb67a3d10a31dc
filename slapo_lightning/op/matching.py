"""What an op's ``from_match(match, **args)`` classmethod receives and may return.

A schedule's ``replace`` step builds the op it swaps in from what it matched: the whole scheduled
module, or the subgraphs of one pattern match. Each op class reads its own hyper-parameters (eps,
activation, dropout probability, heads) from the matched modules and graph, so an op author
registers the class once (``register_op``) and every way of naming it (registered name, import
path) builds it the same way. The match object comes from the schedule spec
(``slapo_lightning.spec.Match``); the op library only relies on the interface below, so it does
not import the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.fx as fx
from torch import nn

from ..errors import OpError


class MatchLike(Protocol):
    """The part of ``slapo_lightning.spec.Match`` that ops use."""

    sch: Any
    subgraphs: list
    tags: dict[str, Any]

    @property
    def module(self) -> nn.Module: ...

    @property
    def values(self) -> dict[str, Any]: ...

    @property
    def nodes(self) -> list[fx.Node]: ...

    def called_modules(self, cls: type | tuple[type, ...] = nn.Module) -> list[nn.Module]: ...

    def config(self, *names: str, default: Any = None) -> Any: ...

    def dropout_probability(self) -> float: ...


@dataclass
class Built:
    """A ``from_match`` result that needs more than the module: ``concrete_args`` for its forward,
    and which pattern inputs to bind (None: every input that is a graph value; literals are
    hyper-parameters the op already read)."""

    module: nn.Module
    concrete_args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] | None = None


def whole_module(match: MatchLike, op: str) -> nn.Module:
    """The scheduled module, for ops that replace a module as a whole (no pattern)."""
    if match.subgraphs:
        raise OpError(f"{op} replaces a whole module: use the replace step without a pattern")
    return match.module


def literal(match: MatchLike, name: str, what: str) -> Any:
    """The constant the pattern parameter ``name`` matched; OpError when it is computed at run time."""
    value = match.values.get(name)
    if isinstance(value, fx.Node) or value is None:
        raise OpError(f"{what}: the matched {name!r} is computed at run time ({value}), expected a constant")
    return value


def parameter(match: MatchLike, name: str, what: str) -> nn.Parameter:
    """The Parameter the pattern parameter ``name`` matched (a flattened trace reads a module's
    weight as a ``get_attr`` node); OpError when it matched something else."""
    value = match.values.get(name)
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        raise OpError(f"{what}: the matched {name!r} is {value}, expected a parameter of the module")
    return match.module.get_parameter(value.target)


def path_of(match: MatchLike) -> str:
    return getattr(match.sch, "path", "") or "<root>"


def one_module(match: MatchLike, op: str, accepts) -> nn.Module:
    """The module an op takes over: the scheduled module itself, or the single module called
    inside the matched subgraphs for which ``accepts(module)`` holds."""
    if not match.subgraphs:
        return match.module
    found = [m for m in match.called_modules() if accepts(m)]
    if len(found) != 1:
        names = [type(m).__name__ for m in match.called_modules()]
        raise OpError(f"{op} takes over one module called in the match, found {len(found)} among {names}")
    return found[0]
