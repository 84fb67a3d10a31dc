"""Spec steps: each is one primitive call on a selected module, with arguments a YAML file can
hold (pattern and op names instead of Python objects).

``STEPS`` maps a step name to a ``StepKind`` that checks its arguments before anything runs and
then performs the call. Primitives without a dedicated kind (extensions registered with
``register_primitive``) run as ``sch.<name>(**args)``, their arguments checked against the
primitive's signature.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..errors import NoMatch, OpError, ReplaceError, SpecError, TraceError, unknown
from ..core.pattern import Subgraph
from ..core.edits import apply_everywhere
from ..core.primitives.fuse import COMPILERS
from ..core.primitives.parallel import why_not_applicable
from ..core.primitives.registry import PRIMITIVES
from ..core.primitives.replace import unique_child_name
from ..registry import Registry
from ..report import StepRecord
from .ops import Built, Match, build_op, resolve_op
from .patterns import Group, for_each_match, resolve_pattern


@dataclass(frozen=True)
class Param:
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class StepKind:
    """A step's arguments (with defaults), a check run before applying, and the action."""

    name: str
    params: dict[str, Param]
    run: Callable[[Any, dict[str, Any]], StepRecord]
    check: Callable[[dict[str, Any]], list[str]] | None = None
    extra_args: bool = False  # arguments beyond ``params`` go to the op (replace)
    defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # defaults that depend on args
    mesh_dim: Callable[[dict[str, Any]], str] | None = None  # the device-mesh dimension the step needs

    def not_applicable(self, sch, args: dict[str, Any]) -> str | None:
        """Why this step does nothing at ``sch`` (its mesh dimension is missing or of size 1)."""
        if self.mesh_dim is None:
            return None
        return why_not_applicable(sch, self.mesh_dim(args))

    def normalise(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` with every default filled in, so equal calls compare (and fingerprint) equal."""
        full = {k: p.default for k, p in self.params.items() if not p.required}
        if self.defaults is not None:
            full.update(self.defaults(args))
        full.update(args)
        return full

    def problems(self, args: dict[str, Any]) -> list[str]:
        found = []
        if not self.extra_args:
            for key in args:
                if key not in self.params:
                    found.append(unknown("argument", key, self.params))
        for key, param in self.params.items():
            if param.required and key not in args:
                found.append(f"missing argument {key!r}")
        if not found and self.check is not None:
            found.extend(self.check(args))
        return found


STEPS: Registry = Registry("step")


def register_step(kind: StepKind) -> StepKind:
    return STEPS.register(kind.name, kind)


def step_names() -> list[str]:
    return sorted(set(STEPS.names()) | set(PRIMITIVES.names()))


# -- argument checks shared by steps ---------------------------------------------------------------

def _check_pattern(args: dict[str, Any], required: bool) -> list[str]:
    ref = args.get("pattern")
    if ref is None:
        return ["missing argument 'pattern'"] if required else []
    try:
        resolve_pattern(ref)
    except SpecError as exc:
        return [str(exc)]
    return []


def _check_compiler(args: dict[str, Any]) -> list[str]:
    compiler = args.get("compiler", "inductor")
    if compiler is None or compiler in COMPILERS:
        return []
    return [unknown("compiler", compiler, COMPILERS.names(), more="or null (no compilation)")]


def _check_bool(args: dict[str, Any], *names: str) -> list[str]:
    return [f"argument {n!r} must be true or false, got {args[n]!r}" for n in names
            if n in args and not isinstance(args[n], bool)]


def _check_name(args: dict[str, Any]) -> list[str]:
    name = args.get("name")
    if name is None or (isinstance(name, str) and name.isidentifier()):
        return []
    return [f"argument 'name' must be a Python identifier, got {name!r}"]


# -- trace -------------------------------------------------------------------------------------------

def _run_trace(sch, args: dict[str, Any]) -> StepRecord:
    leaves = [_leaf(l) for l in args.get("leaves") or ()]
    detail = "flatten" if args["flatten"] else ""
    try:
        sch.trace(flatten=args["flatten"], leaves=leaves or None)
    except TraceError:
        if not args["leaf_on_failure"]:
            raise
        child = _trace_keeping_one_child(sch, args["flatten"], leaves)
        detail += f"{', ' if detail else ''}{child} kept as a leaf (it does not trace)"
    return StepRecord("trace", detail, 1)


def _trace_keeping_one_child(sch, flatten: bool, leaves: list) -> str:
    """Trace with the first direct child whose staying opaque lets the trace through (an MoE
    block's data-dependent expert loop); TraceError, as the plain trace, when none does."""
    failure = None
    for name, _ in list(sch.mod.named_children()):
        try:
            sch.trace(flatten=flatten, leaves=[*leaves, name])
            return name
        except TraceError as exc:
            failure = exc
    raise failure if failure is not None else TraceError(f"cannot trace {sch.path or '<root>'}")


def _leaf(ref: str) -> Any:
    """A leaf is a child name, or ``class:<import path>`` for a module class."""
    if ref.startswith("class:"):
        from ..registry import import_object

        return import_object(ref[len("class:"):])
    return ref


def _check_trace(args: dict[str, Any]) -> list[str]:
    found = _check_bool(args, "flatten", "leaf_on_failure")
    leaves = args.get("leaves")
    if leaves is not None and (not isinstance(leaves, list) or not all(isinstance(l, str) for l in leaves)):
        found.append(f"argument 'leaves' must be a list of child names or 'class:<import path>', got {leaves!r}")
    return found


register_step(StepKind("trace", {"flatten": Param(False), "leaves": Param(None), "leaf_on_failure": Param(False)},
                       _run_trace, _check_trace))


# -- decompose ---------------------------------------------------------------------------------------

def select_all(sch, selectors: str | list[str] | tuple[str, ...]) -> list:
    """Submodules of ``sch`` matching any of ``selectors``, each once, in selector order."""
    found, seen = [], set()
    for selector in [selectors] if isinstance(selectors, str) else selectors:
        for child in sch.select(selector):
            if child.path not in seen:
                seen.add(child.path)
                found.append(child)
    return found


def _run_decompose(sch, args: dict[str, Any]) -> StepRecord:
    targets = select_all(sch, args["target"])
    if not targets:
        raise NoMatch(f"decompose target {args['target']!r} matches no submodule")
    for child in targets:
        child.decompose()
    return StepRecord("decompose", str(args["target"]), len(targets))


def _check_target(args: dict[str, Any]) -> list[str]:
    target = args.get("target")
    if isinstance(target, str) or (isinstance(target, list) and target and all(isinstance(t, str) for t in target)):
        return []
    return [f"argument 'target' must be a path glob (or a list of them) relative to the selected module, got {target!r}"]


register_step(StepKind("decompose", {"target": Param(required=True)}, _run_decompose, _check_target))


# -- replace -----------------------------------------------------------------------------------------

REPLACE_KEYS = ("pattern", "op", "name")


def _op_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in REPLACE_KEYS}


def _bindable(group: Group, built: Built) -> list[Subgraph]:
    """The group's subgraphs binding only the inputs the op takes (literals went to its factory)."""

    def wanted(name: str, value: Any) -> bool:
        return name in built.inputs if built.inputs is not None else isinstance(value, fx.Node)

    result = []
    for sg in group.subgraphs:
        keep = [(n, v) for n, v in zip(sg.param_names, sg.inputs) if wanted(n, v)]
        result.append(Subgraph(sg.path, sg.nodes, [v for _, v in keep], sg.outputs, [n for n, _ in keep]))
    return result


def _run_replace(sch, args: dict[str, Any]) -> StepRecord:
    op, target_args = resolve_op(args["op"])
    detail = f"{args['pattern']} -> {op.name}" if args.get("pattern") else op.name
    if args.get("pattern") is None:
        built = build_op(op, Match(sch), {**target_args, **_op_args(args)})
        sch.replace(built.module)
        return StepRecord("replace", detail, 1)
    return _in_every_variant(sch, "replace", args, detail)


def _replace_matches(sch, args: dict[str, Any], edit: "StepEdit") -> int:
    op, target_args = resolve_op(args["op"])
    op_args = {**target_args, **_op_args(args)}
    pattern = resolve_pattern(args["pattern"])
    ordinals = itertools.count()

    def replace(group: Group) -> None:
        ordinal = next(ordinals)
        built = build_op(op, Match(sch, group.subgraphs, dict(group.variant.tags), edit.config), op_args)
        module, name = edit.op_for(sch.mod, ordinal, built.module)
        if name is None:
            name = unique_child_name(sch.mod, args.get("name") or type(module).__name__)
            if edit.recording:
                edit.ops[ordinal] = name
        try:
            sch.replace(module, target=_bindable(group, built), name=name, concrete_args=built.concrete_args)
        except ReplaceError as exc:
            raise ReplaceError(f"{op.name} for pattern {pattern.name!r} (variant {group.variant.fn.__name__}): {exc}") from exc

    return for_each_match(sch, pattern, replace)


def _check_replace(args: dict[str, Any]) -> list[str]:
    if "op" not in args:
        return ["missing argument 'op'"]
    found = _check_pattern(args, required=False) + _check_name(args)
    try:
        op, target_args = resolve_op(args["op"])
    except SpecError as exc:
        return found + [str(exc)]
    problem = op.check_args({**target_args, **_op_args(args)})
    return found + ([problem] if problem else [])


def _op_defaults(args: dict[str, Any]) -> dict[str, Any]:
    try:
        op, _ = resolve_op(args["op"])
    except (SpecError, KeyError):
        return {}
    return {name: p.default for name, p in op.signature.parameters.items()
            if p.default is not p.empty and p.kind is not p.VAR_KEYWORD}


register_step(StepKind("replace", {"pattern": Param(None), "op": Param(required=True), "name": Param(None)},
                       _run_replace, _check_replace, extra_args=True, defaults=_op_defaults))


# -- fuse --------------------------------------------------------------------------------------------

def _run_fuse(sch, args: dict[str, Any]) -> StepRecord:
    return _in_every_variant(sch, "fuse", args, f"{args['pattern']}, {args['compiler']}")


def _fuse_matches(sch, args: dict[str, Any], edit: "StepEdit") -> int:
    pattern = resolve_pattern(args["pattern"])
    return for_each_match(sch, pattern, lambda g: sch.fuse(g.subgraphs, compiler=args["compiler"], name=args["name"]))


register_step(StepKind(
    "fuse", {"pattern": Param(required=True), "compiler": Param("inductor"), "name": Param("FusedModule")}, _run_fuse,
    lambda a: _check_pattern(a, required=True) + _check_compiler(a) + _check_name(a)))


# -- checkpoint --------------------------------------------------------------------------------------

def _run_checkpoint(sch, args: dict[str, Any]) -> StepRecord:
    if args.get("pattern") is None:
        sch.checkpoint()
        return StepRecord("checkpoint", "", 1)
    return _in_every_variant(sch, "checkpoint", args, str(args["pattern"]))


def _checkpoint_matches(sch, args: dict[str, Any], edit: "StepEdit") -> int:
    pattern = resolve_pattern(args["pattern"])
    return for_each_match(sch, pattern, lambda g: sch.checkpoint(g.subgraphs))


register_step(StepKind("checkpoint", {"pattern": Param(None)}, _run_checkpoint,
                       lambda a: _check_pattern(a, required=False)))


# -- pattern steps hold in every specialisation ---------------------------------------------------

MATCH_ACTIONS: dict[str, Callable[[Any, dict[str, Any], "StepEdit"], int]] = {
    "replace": _replace_matches, "fuse": _fuse_matches, "checkpoint": _checkpoint_matches}
"""Pattern steps: ``fn(sch, args, edit) -> number of matches handled`` on the active graph."""


@dataclass
class StepEdit:
    """A pattern step, made again on another specialisation of the module: the whole step runs
    again (a mask-present trace matches the masked variant of the pattern), and the op built
    for the n-th match is the very instance the first application built (``ops``: n -> child)."""

    description: str
    kind: str
    args: dict[str, Any]
    ops: dict[int, str] = field(default_factory=dict)
    recording: bool = False

    config: Any = None

    def run(self, sch, first: bool) -> int:
        self.recording = first
        if first:
            self.config = getattr(sch.root.mod, "config", None)
        try:
            return MATCH_ACTIONS[self.kind](sch, self.args, self)
        finally:
            self.recording = False

    def replay(self, holder) -> None:
        from ..core.schedule import create_schedule

        if not self.run(create_schedule(holder), first=False):
            raise NoMatch(f"pattern {self.args.get('pattern')!r} matches nothing in this variant")

    def op_for(self, gm, ordinal: int, fresh: nn.Module) -> tuple[nn.Module, str | None]:
        """The op to call for match ``ordinal``: the first application's instance when it is
        configured alike, else the fresh one when it holds no tensors of its own."""
        name = None if self.recording else self.ops.get(ordinal)
        cached = getattr(gm, name, None) if name else None
        if cached is not None and type(cached) is type(fresh) and _same_config(cached, fresh):
            return cached, name
        if self.recording or not _owns_new_tensors(fresh, gm):
            return fresh, None
        raise OpError(f"this variant needs a {type(fresh).__name__} configured as ({fresh.extra_repr()}), unlike "
                      f"the one the other variants share"
                      + (f" ({cached.extra_repr()})" if cached is not None else "")
                      + ", and a second one would hold weights of its own")


def _same_config(a: nn.Module, b: nn.Module) -> bool:
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict(keep_vars=True).items()]  # noqa: E731
    return a.extra_repr() == b.extra_repr() and shapes(a) == shapes(b)


def _owns_new_tensors(module: nn.Module, gm: nn.Module) -> bool:
    known = {id(t) for t in gm.state_dict(keep_vars=True).values()}
    return any(id(t) not in known for t in module.state_dict(keep_vars=True).values())


def _in_every_variant(sch, kind: str, args: dict[str, Any], detail: str) -> StepRecord:
    """Run a pattern step on the active specialisation and again on every other one."""
    if not isinstance(sch.mod, fx.GraphModule):
        sch.trace()
    edit = StepEdit(f"{kind} {detail}", kind, dict(args))

    def first() -> int:
        count = edit.run(sch, first=True)
        if not count:
            raise NoMatch(f"pattern {args['pattern']!r} matches nothing")
        return count

    result = apply_everywhere(sch.mod, edit, first)
    return StepRecord(kind, detail, result.value, skipped_variants=result.skipped)


# -- any other primitive -------------------------------------------------------------------------------

def primitive_step(name: str) -> StepKind:
    """A step that calls a registered primitive with keyword arguments checked against its signature
    (and by the primitive's own ``check_args(args) -> [problem, ...]`` where it has one)."""
    fn = PRIMITIVES.get(name)
    params = list(inspect.signature(fn).parameters.values())[1:]
    spec = {p.name: Param(None if p.default is p.empty else p.default, p.default is p.empty)
            for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def run(sch, args: dict[str, Any]) -> StepRecord:
        getattr(sch, name)(**args)
        return StepRecord(name, ", ".join(f"{k}={v}" for k, v in args.items() if k != "mesh_dim"), 1)

    mesh_dim = None
    if "mesh_dim" in spec:
        default = spec["mesh_dim"].default
        mesh_dim = lambda args: args.get("mesh_dim", default)  # noqa: E731
    return StepKind(name, spec, run, check=getattr(fn, "check_args", None), mesh_dim=mesh_dim)


def step_kind(name: str) -> StepKind:
    """The step called ``name``; SpecError listing the valid steps (= primitives) otherwise."""
    if name in STEPS:
        return STEPS.get(name)
    if name in PRIMITIVES:
        return primitive_step(name)
    raise SpecError(unknown("primitive", name, step_names()))
