"""Named patterns a spec step can refer to (``pattern: qkv_linears``).

A ``PatternSpec`` bundles the variants of one idea (the attention core written by BERT and by
GPT-2, with and without a mask) with how its matches are used: one by one (vertical) or all
together (horizontal, e.g. q/k/v feeding one fused op), and an optional ``prepare`` rewrite for
graphs where a match is blocked by a value the module also returns (eager attention returns its
probabilities, which no fused kernel produces).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.fx as fx

from ..errors import PatternError, SpecError
from ..core.pattern import Subgraph, is_node_predicate
from ..registry import Registry
from .refs import resolve

Undo = Callable[[], None]


@dataclass(frozen=True)
class Variant:
    """One way of writing the pattern; ``tags`` tell op factories which one matched."""

    fn: Callable
    tags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PatternSpec:
    name: str
    variants: tuple[Variant, ...]
    group: bool = False
    count: int | None = None
    by_input: bool = False
    normalise: Callable[[fx.GraphModule], None] | None = None
    prepare: Callable[[fx.GraphModule], Undo | None] | None = None
    doc: str = ""


@dataclass
class Group:
    """The subgraphs one replacement (or fusion) consumes, and the variant that found them."""

    subgraphs: list[Subgraph]
    variant: Variant


PATTERNS: Registry = Registry("pattern")


def register_pattern(name: str, *variants: Callable | Variant, group: bool = False, count: int | None = None,
                     by_input: bool = False, normalise: Callable | None = None, prepare: Callable | None = None,
                     doc: str = "", overwrite: bool = False) -> PatternSpec:
    """Register pattern functions (or node predicates) under ``name`` for specs to use.

    ``normalise(gm)`` rewrites the graph into an equivalent one before every search (e.g. shape
    reads moved off a value the match would remove); ``prepare`` see ``for_each_match``.

    ``group``: the matches are replaced together; with ``by_input`` only matches that share their
    inputs form a group, and only groups of ``count`` are used (q/k/v among other Linears)."""
    if not variants:
        raise PatternError(f"pattern {name!r} needs at least one pattern function")
    spec = PatternSpec(name, tuple(v if isinstance(v, Variant) else Variant(v) for v in variants),
                       group=group, count=count, by_input=by_input, normalise=normalise, prepare=prepare, doc=doc or (inspect.getdoc(variants[0]) or ""))
    PATTERNS.register(name, spec, overwrite=overwrite)
    return spec


def resolve_pattern(ref: Any) -> PatternSpec:
    """A registered name, or an import path to a ``PatternSpec``, a pattern function or a node predicate."""
    obj = resolve(ref, PATTERNS, "pattern")
    if isinstance(obj, PatternSpec):
        return obj
    if callable(obj):
        return PatternSpec(str(ref), (Variant(obj),))
    raise SpecError(f"pattern {ref!r} is a {type(obj).__name__}, not a pattern function or PatternSpec")


def _find(sch, variant: Variant) -> list[Subgraph]:
    if is_node_predicate(variant.fn):
        return sch.find_node(variant.fn)
    return sch.find(variant.fn)


def _groups(sch, pattern: PatternSpec, variant: Variant) -> list[Group]:
    found = _find(sch, variant)
    if not found:
        return []
    if not pattern.group:
        return [Group([sg], variant) for sg in found]
    if pattern.by_input:
        shared: dict[tuple, list[Subgraph]] = {}
        for sg in found:
            shared.setdefault(tuple(id(v) for v in sg.inputs), []).append(sg)
        return [Group(sgs, variant) for sgs in shared.values() if pattern.count is None or len(sgs) == pattern.count]
    if pattern.count is not None and len(found) != pattern.count:
        raise PatternError(f"pattern {pattern.name!r} matched {len(found)} subgraphs in {sch.path or '<root>'}, "
                           f"expected {pattern.count} to replace together")
    return [Group(found, variant)]


def _each(sch, pattern: PatternSpec, action: Callable[[Group], Any]) -> int:
    """Run ``action`` on each group, variant by variant; finding again after each variant because
    an action rewrites the graph."""
    done = 0
    for variant in pattern.variants:
        groups = _groups(sch, pattern, variant)
        for group in groups:
            action(group)
        done += len(groups)
    return done


def for_each_match(sch, pattern: PatternSpec, action: Callable[[Group], Any]) -> int:
    """Apply ``action`` to every match of ``pattern`` in ``sch`` (traced first if needed); returns
    how many groups were handled. ``prepare`` runs only when nothing matches without it, and is
    undone when nothing matches with it either."""
    if not isinstance(sch.mod, fx.GraphModule):
        sch.trace()
    if pattern.normalise is not None:
        pattern.normalise(sch.mod)
    done = _each(sch, pattern, action)
    if done or pattern.prepare is None:
        return done
    undo = pattern.prepare(sch.mod)
    done = _each(sch, pattern, action)
    if not done and undo is not None:
        undo()
    return done

