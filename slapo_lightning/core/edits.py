"""Graph edits that hold in every specialisation of a traced module.

A primitive that edits a graph (replace a subgraph, fuse, checkpoint a subgraph) runs on the
active specialisation, then again on every other one, and is logged so that specialisations
made later (at run time) get it too. What "again" means is the edit's business: a Python
``find`` + ``replace`` finds its pattern anew and takes the same matches; a spec step runs the
whole step again (``spec.steps``). Children, Parameters and op instances are shared.

A variant the edit cannot apply to is handled by the policy in force: ``"raise"`` (a required
spec pass) or ``"skip"`` (that variant keeps the original code for the edit, said once, loudly).
A skip is refused when the original code needs a child whose tensors a replacement took over.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import ScheduleError
from .pattern import find_matches
from .state_keys import keep_original_keys, moved_keys, tensor_keys
from .tracer import TracedModule
from .tracer.specialise import REPLAYING, replaying

_POLICY: contextvars.ContextVar[str] = contextvars.ContextVar("slapo_variant_policy", default="skip")


class VariantError(ScheduleError):
    """An edit that does not apply to one specialisation of a module (names module and variant)."""


@contextlib.contextmanager
def variant_policy(policy: str) -> Iterator[None]:
    """``"raise"``: an edit that fails on a variant is an error; ``"skip"``: the variant keeps the
    original code for it (warned once)."""
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def applying_edit() -> bool:
    """True inside ``apply_everywhere`` or a replay: nested primitive calls belong to the outer edit."""
    return REPLAYING.get()


@dataclass
class EditResult:
    value: Any
    skipped: list[str] = field(default_factory=list)


def apply_everywhere(gm: Any, edit: Any, first: Callable[[], Any]) -> EditResult:
    """Run ``first()`` on the active specialisation of ``gm``, ``edit.replay(gm)`` on the others,
    log ``edit`` for later ones, then drop children no specialisation calls and keep the
    original state_dict keys. Nested calls (from inside an edit) just run ``first()``."""
    if applying_edit():
        return EditResult(first())
    if not isinstance(gm, TracedModule):
        keys_before, called_before, used_before = tensor_keys(gm), gm_called_children(gm), _used_modules(gm)
        with replaying():
            value = first()
        _drop_replaced_children(gm, called_before, gm_called_children(gm))
        _drop_replaced_descendants(gm, used_before, _used_modules(gm))
        keep_original_keys(gm, moved_keys(keys_before, gm))
        return EditResult(value)
    keys_before = tensor_keys(gm)
    called_before = gm.called_children()
    used_before = _used_modules(gm)
    path = gm.__dict__["_slapo_state"].options.path or "<root>"
    skipped: list[str] = []
    with replaying():
        value = first()
        active = gm.active_specialisation
        for spec in gm.specialisations:
            if spec is active:
                continue
            with gm.activated(spec):
                try:
                    edit.replay(gm)
                except Exception as exc:
                    message = f"{path}: {edit.description} does not apply to the variant {spec.label}: {exc}"
                    if _POLICY.get() == "raise":
                        raise VariantError(message) from exc
                    spec.skipped.append(f"{edit.description}: {exc}")
                    skipped.append(message)
    gm.edits.append(edit)
    for spec in gm.specialisations:
        if spec.skipped:
            _refuse_unsafe_skip(gm, spec, called_before, path)
    _drop_replaced_children(gm, called_before, gm.called_children())
    _drop_replaced_descendants(gm, used_before, _used_modules(gm))
    keep_original_keys(gm, moved_keys(keys_before, gm))
    for message in skipped:
        warnings.warn(f"slapo_lightning: {message}; that variant runs the unscheduled code for it",
                      RuntimeWarning, stacklevel=3)
    return EditResult(value, skipped)


@dataclass
class PatternEdit:
    """An edit of matches found by ``find``: made again by finding the same pattern in the
    other trace and taking the same matches (of the same search, so a loop over one ``find``'s
    results replays as it ran). ``action(gm, subgraphs)`` is a module-level function (partial)."""

    description: str
    origins: list
    action: Callable[[Any, list], Any]

    def replay(self, holder: TracedModule) -> None:
        self.action(holder, refind(holder, self.origins))


def refind(holder: TracedModule, origins: list) -> list:
    """The matches of ``holder``'s active specialisation that correspond to ``origins``."""
    if any(o is None for o in origins):
        raise ScheduleError("the subgraph was not made by find(), so it cannot be found in another trace")
    searches = holder.active_specialisation.searches
    result = []
    for origin in origins:
        found = searches.get(origin.search)
        if found is None:
            found = searches[origin.search] = find_matches(holder, origin.pattern, predicate=origin.predicate)
        name = getattr(origin.pattern, "__name__", repr(origin.pattern))
        if len(found) != origin.total:
            raise ScheduleError(f"pattern {name!r} matches {len(found)} time(s) here and {origin.total} in the "
                                f"trace the schedule was applied to")
        sg = found[origin.index]
        if any(n._erased for n in sg.nodes):
            raise ScheduleError(f"match {origin.index} of pattern {name!r} was already replaced")
        result.append(sg)
    return result




def gm_called_children(gm: Any) -> set[str]:
    return {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}


def _holds_tensors(module: Any) -> bool:
    return any(True for _ in module.state_dict(keep_vars=True))


def _drop_replaced_children(gm: Any, called_before: set[str], called_after: set[str]) -> None:
    """Children holding tensors that no graph calls after the edit were replaced: their tensors
    live in the replacement now (or nowhere), so they leave the state_dict. Stateless ones stay,
    so a variant made later can still call them."""
    for name in called_before - called_after:
        child = gm._modules.get(name)
        if child is not None and _holds_tensors(child):
            delattr(gm, name)


def _used_modules(gm: Any) -> set[str]:
    """Dotted paths of the submodules any graph of ``gm`` calls or reads a tensor of, with their
    ancestors (a flattened trace calls ``attention.self.query`` itself)."""
    graphs = [spec.graph for spec in gm.specialisations] if isinstance(gm, TracedModule) else [gm.graph]
    used = set()
    for graph in graphs:
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                parts = node.target.split(".")
                parts = parts if node.op == "call_module" else parts[:-1]
                used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return used


def _drop_replaced_descendants(gm: Any, used_before: set[str], used_after: set[str]) -> None:
    """``_drop_replaced_children`` for nested submodules a flattened graph stopped calling (the
    q/k/v Linears a FusedQKV took over inside a flattened layer)."""
    for path in sorted(used_before - used_after, key=lambda p: p.count(".")):
        parent_path, _, name = path.rpartition(".")
        if not parent_path:
            continue
        try:
            parent = gm.get_submodule(parent_path)
        except AttributeError:
            continue  # an ancestor went already
        child = parent._modules.get(name)
        if child is not None and _holds_tensors(child):
            delattr(parent, name)


def _refuse_unsafe_skip(gm: TracedModule, spec: Any, called_before: set[str], path: str) -> None:
    """A variant left unscheduled must not call a tensor-holding child that other variants no
    longer call: its tensors would train in two places."""
    others = set()
    for other in gm.specialisations:
        if other is not spec:
            others |= {n.target.split(".")[0] for n in other.graph.nodes if n.op in ("call_module", "get_attr")}
    mine = {n.target.split(".")[0] for n in spec.graph.nodes if n.op in ("call_module", "get_attr")}
    for name in sorted(mine & called_before - others):
        child = gm._modules.get(name)
        if child is not None and _holds_tensors(child):
            raise VariantError(f"{path}: the variant {spec.label} would keep the original {name!r} while the "
                               f"other variants use its replacement ({spec.skipped[0]}); the schedule cannot "
                               f"apply to this module unless it applies to every variant")


__all__ = ["EditResult", "PatternEdit", "VariantError", "refind", "apply_everywhere", "applying_edit", "variant_policy"]
