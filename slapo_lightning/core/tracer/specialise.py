"""A traced module with one graph per set of trace-time decisions.

``TracedModule`` sits where the original module was. Its ``forward`` computes the call key
(``guards.CallKey``), runs the first specialisation with that key whose internal guards hold,
and on a miss traces the original code again for this call, replays the schedule's edits on
the new graph (same Parameters, same op instances) and caches it. So a scheduled module accepts
every input the original accepts, the way torch.compile re-specialises instead of failing.

Primitives edit the *active* graph (``.graph``); ``core.edits`` applies each edit to every
other specialisation too and logs it for the ones that come later.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.fx as fx
from torch import nn

from ...errors import TraceError
from .guards import CallKey, GuardMiss, absent_arguments, changing_parts, describe_key, guard_decisions, has_internal_guards
from .inputs import CallArgs, forward_signature
from .proxies import concrete, has_proxy
from .state import adopt_attributes

log = logging.getLogger("slapo_lightning")

REPLAYING: contextvars.ContextVar[bool] = contextvars.ContextVar("slapo_replaying_edits", default=False)
"""True while edits are being applied or replayed: primitives called inside belong to that edit
and must not log edits of their own."""


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    token = REPLAYING.set(True)
    try:
        yield
    finally:
        REPLAYING.reset(token)

MAX_SPECIALISATIONS = 8
"""Per module. HF training takes two (mask absent, mask present); a few more cover dtype or
autocast changes. More means some decision changes with the data, which would re-trace often."""


class Edit(Protocol):
    """A graph edit that can be applied again to a new specialisation's graph."""

    description: str

    def replay(self, holder: "TracedModule") -> None: ...


@dataclass
class Specialisation:
    key: tuple
    graph: fx.Graph
    label: str
    origin: str = "setup"
    code: Callable | None = None
    internal_guards: bool = False
    skipped: list[str] = field(default_factory=list)
    searches: dict = field(default_factory=dict)  # find() results by search, while edits replay

    def __deepcopy__(self, memo):
        copied = Specialisation(self.key, copy.deepcopy(self.graph, memo), self.label, self.origin, self.code,
                                self.internal_guards, list(self.skipped))
        memo[id(self)] = copied
        return copied

    @property
    def decisions(self) -> list[str]:
        return guard_decisions(self.graph)


@dataclass
class TraceOptions:
    """How the specialisations of one module are traced (the same for all of them)."""

    flatten: bool
    leaves: tuple
    concrete_args: dict
    path: str


class TracedModule(fx.GraphModule):
    """A GraphModule that keeps all of its module's state and holds several specialisations."""

    def recompile(self):
        python_code = super().recompile()
        cls = type(self)
        generated = cls.__dict__["forward"]
        dispatcher = cls.__dict__.get("_slapo_dispatcher")
        if dispatcher is None:
            del cls.forward  # calls go to the dispatcher below
        else:
            cls.forward = dispatcher
        active = self.__dict__.get("_slapo_active")
        if active is not None:
            active.code = generated
            active.internal_guards = has_internal_guards(active.graph)
        else:
            self.__dict__["_slapo_first_code"] = generated
        return python_code

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state: SpecialisationState = self.__dict__["_slapo_state"]
        if has_proxy((args, kwargs)):
            return state.spec_for_trace(self, args, kwargs).code(self, *args, **kwargs)
        key = state.call_key(self, args, kwargs)
        for spec in state.by_key.get(key, ()):
            if not spec.internal_guards:
                return spec.code(self, *args, **kwargs)
            rng = _rng_state(args, kwargs)
            try:
                return spec.code(self, *args, **kwargs)
            except GuardMiss:
                _set_rng_state(rng)
        return state.specialise_at_run_time(self, key, args, kwargs).code(self, *args, **kwargs)

    def install_dispatcher(self, source: nn.Module) -> None:
        """Give this instance's ``forward`` the original's signature (``__wrapped__``), so tracing
        it again, binding example inputs and reading its signature see the module's real
        parameters instead of ``*args, **kwargs``."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return TracedModule.forward(self, *args, **kwargs)

        forward.__wrapped__ = type(source).forward
        cls = type(self)
        cls._slapo_dispatcher = forward
        cls.forward = forward

    # -- specialisations ------------------------------------------------------------------------
    @property
    def specialisations(self) -> list[Specialisation]:
        return list(self.__dict__["_slapo_state"].specs)

    @property
    def active_specialisation(self) -> Specialisation:
        return self.__dict__["_slapo_active"]

    @contextlib.contextmanager
    def activated(self, spec: Specialisation) -> Iterator[None]:
        """Make ``spec`` the graph primitives see (``.graph``) for the duration."""
        previous = self.__dict__["_slapo_active"]
        self._activate(spec)
        try:
            yield
        finally:
            self._activate(previous)

    def _activate(self, spec: Specialisation) -> None:
        self.__dict__["_slapo_active"] = spec
        self.__dict__["_graph"] = spec.graph
        spec.graph.owning_module = self

    def add_specialisation(self, spec: Specialisation, source: nn.Module) -> None:
        state: SpecialisationState = self.__dict__["_slapo_state"]
        adopt_attributes(source, self, spec.graph)
        for name in spec.graph.__dict__.get("_slapo_constants", {}):
            source.__dict__.pop(name, None)
        state.specs.append(spec)
        state.by_key.setdefault(spec.key, []).append(spec)
        with self.activated(spec):
            self.recompile()

    @property
    def edits(self) -> list[Edit]:
        return self.__dict__["_slapo_state"].edits

    @property
    def source_module(self) -> nn.Module:
        """The module as it was before tracing (same children and Parameters): what new
        specialisations are traced from."""
        return self.__dict__["_slapo_state"].source

    def snapshot_specialisations(self) -> Callable[[], None]:
        """A function that puts every specialisation (graph, code), the edit log and the active
        one back as they are now."""
        state: SpecialisationState = self.__dict__["_slapo_state"]
        saved = [(spec, copy.deepcopy(spec.graph), spec.code, spec.internal_guards, list(spec.skipped))
                 for spec in state.specs]
        edits, active = list(state.edits), self.__dict__["_slapo_active"]

        def restore() -> None:
            state.specs = []
            state.by_key = {}
            for spec, graph, code, guards, skipped in saved:
                spec.graph, spec.code, spec.internal_guards, spec.skipped = graph, code, guards, skipped
                spec.searches = {}
                state.specs.append(spec)
                state.by_key.setdefault(spec.key, []).append(spec)
            state.edits[:] = edits
            self._activate(active)

        return restore

    def called_children(self) -> set[str]:
        """Child targets called by any specialisation."""
        return {n.target.split(".")[0] for spec in self.__dict__["_slapo_state"].specs
                for n in spec.graph.nodes if n.op in ("call_module", "get_attr")}

    def __deepcopy__(self, memo):
        fake = nn.Module()
        fake.__dict__ = copy.deepcopy(self.__dict__, memo)
        copied = TracedModule(fake, fake.__dict__["_graph"], class_name=self.__class__.__name__)
        copied.__dict__.update(fake.__dict__)
        state = copied.__dict__["_slapo_state"]
        copied.install_dispatcher(state.source)
        for spec in state.specs:
            with copied.activated(spec):
                copied.recompile()
        copied._activate(copied.__dict__["_slapo_active"])
        return copied


class SpecialisationState:
    """The specialisations of one traced module, its edit log and how to make new ones."""

    def __init__(self, source: nn.Module, options: TraceOptions, tracer: Callable):
        self.source = source
        self.options = options
        self.trace = tracer  # (source, example, options) -> (graph, recorded calls)
        self.signature = forward_signature(source)
        self.call_key = CallKey(self.signature)
        self.specs: list[Specialisation] = []
        self.by_key: dict[tuple, list[Specialisation]] = {}
        self.edits: list[Edit] = []
        self.warned: set[str] = set()

    def __deepcopy__(self, memo):
        copied = SpecialisationState.__new__(SpecialisationState)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = value if name in ("trace", "call_key", "signature") else copy.deepcopy(value, memo)
        copied.by_key = {}
        for spec in copied.specs:
            copied.by_key.setdefault(spec.key, []).append(spec)
        return copied

    def label(self, key: tuple) -> str:
        absent = absent_arguments(key, self.signature)
        present = describe_key(key)
        return present + (f"; None: {', '.join(absent)}" if absent else "")

    def duplicate(self, key: tuple, graph: fx.Graph) -> bool:
        decisions = guard_decisions(graph)
        return any(spec.decisions == decisions for spec in self.by_key.get(key, ()))

    def spec_for_trace(self, holder: TracedModule, args: tuple, kwargs: dict) -> Specialisation:
        """Under a re-trace: the specialisation the concrete values behind the proxies take."""
        c_args, c_kwargs = concrete(tuple(args)), concrete(dict(kwargs))
        key = self.call_key(holder, args, kwargs)
        candidates = self.by_key.get(key, [])
        for spec in candidates:
            if not spec.internal_guards:
                return spec
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]), _executing((args, kwargs)):
                    spec.code(holder, *c_args, **c_kwargs)
                return spec
            except GuardMiss:
                continue
            except Exception:
                break
        if candidates:
            return candidates[0]
        raise TraceError(f"{self.options.path or '<root>'}: traced again with inputs it has no specialisation for "
                         f"({self.label(key)}); call it once with such inputs before tracing its parent")

    def specialise_at_run_time(self, holder: TracedModule, key: tuple, args: tuple, kwargs: dict) -> Specialisation:
        path = self.options.path or "<root>"
        if len(self.specs) >= MAX_SPECIALISATIONS:
            keys = [s.key for s in self.specs] + [key]
            changing = changing_parts(keys) or ["internal decisions: " + "; ".join(
                sorted({d for s in self.specs for d in s.decisions})[:6])]
            raise TraceError(f"{path} needed more than {MAX_SPECIALISATIONS} specialisations; what keeps changing "
                             f"between calls: {', '.join(changing)}. Make that input the same kind on every call "
                             f"(e.g. always pass an attention mask)")
        graph, _ = self.trace(self.source, CallArgs(tuple(args), dict(kwargs)), self.options)
        spec = Specialisation(key, graph, self.label(key), origin="run time")
        holder.add_specialisation(spec, self.source)
        try:
            self._replay_edits(holder, spec, path)
        except BaseException:
            self.specs.remove(spec)
            self.by_key[key].remove(spec)
            raise
        log.info("slapo_lightning: %s specialised for %s (%d of at most %d)", path, spec.label, len(self.specs),
                 MAX_SPECIALISATIONS)
        return spec

    def _replay_edits(self, holder: TracedModule, spec: Specialisation, path: str) -> None:
        borrowed, shadows = _borrow_missing_children(holder, spec.graph, self.source)
        try:
            self._replay_borrowing(holder, spec, path, borrowed)
        finally:
            for name, shadow in shadows.items():
                if name not in holder._modules:
                    holder.__dict__[name] = shadow

    def _replay_borrowing(self, holder: TracedModule, spec: Specialisation, path: str, borrowed: set[str]) -> None:
        with holder.activated(spec), replaying():
            for edit in self.edits:
                try:
                    edit.replay(holder)
                except Exception as exc:  # this variant keeps the original code for that edit
                    spec.skipped.append(f"{edit.description}: {exc}")
                    self._warn_once(f"{path}: the inputs {spec.label} needed a new specialisation, and "
                                    f"'{edit.description}' does not apply to it ({exc}); this variant runs the "
                                    f"unscheduled code for it")
            still_called = {n.target.split(".")[0] for n in spec.graph.nodes if n.op in ("call_module", "get_attr")}
            for name in borrowed - still_called:
                del holder._modules[name]
            restore_needed_children(holder, spec, self.source, path, borrowed)

    def _warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _borrow_missing_children(holder: TracedModule, graph: fx.Graph,
                             source: nn.Module) -> tuple[set[str], dict[str, object]]:
    """A new trace calls the original children; those an edit replaced come back for as long as
    the edits are replayed (their patterns match on them). Plain attributes of the same name
    (the attribute paths of kept checkpoint keys) would hide them and step aside meanwhile."""
    borrowed, shadows = set(), {}
    for node in graph.nodes:
        name = node.target.split(".")[0] if node.op in ("call_module", "get_attr") else None
        if name and name not in holder._modules and name in source._modules:
            holder._modules[name] = source._modules[name]
            borrowed.add(name)
            if name in holder.__dict__:
                shadows[name] = holder.__dict__.pop(name)
    return borrowed, shadows


def restore_needed_children(holder: TracedModule, spec: Specialisation, source: nn.Module, path: str,
                            borrowed: set[str]) -> None:
    """Children ``spec`` still calls after its edits: a borrowed one that holds tensors cannot
    stay (its tensors live in a replacement now); stateless ones can."""
    for node in spec.graph.nodes:
        if node.op != "call_module":
            continue
        name = node.target.split(".")[0]
        if name not in borrowed:
            continue
        original = source._modules.get(name)
        if any(True for _ in original.state_dict(keep_vars=True)):
            del holder._modules[name]
            raise TraceError(f"{path}: the inputs {spec.label} need the original {name!r}, which the schedule "
                             f"replaced (its weights now live in the replacement); apply the schedule with "
                             f"example inputs of this kind so it is scheduled for them too")


@contextlib.contextmanager
def _executing(args: tuple):
    """Run real code in the middle of a trace (fx's patches stay, but no proxies are involved)."""
    proxies: list[fx.Proxy] = []
    fx.node.map_aggregate(args, lambda v: proxies.append(v) if isinstance(v, fx.Proxy) else None)
    tracer = proxies[0].tracer if proxies else None
    if tracer is None or not hasattr(tracer, "_execute"):
        yield
        return
    with tracer._execute():
        yield


def _rng_state(args: tuple, kwargs: dict) -> tuple | None:
    """The random streams a specialisation that misses half-way must give back. Under
    torch.compile there are none to save: the compiled region's own guards find the miss before
    anything runs, and reading the RNG state would break its graph."""
    if torch.compiler.is_compiling():
        return None
    cuda = None
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_cuda:
            cuda = (value.device, torch.cuda.get_rng_state(value.device))
            break
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple | None) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])
