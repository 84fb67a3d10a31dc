"""Apply a checked spec to a model: all passes, or none.

Order of work: parse and check the spec (no model needed); check every enabled pass's selector
against the model; then apply pass by pass, module by module, step by step. If anything fails on
the way (a required pattern without match, a trace or replace error), the model is put back as it
was (``ModelSnapshot``) and the error, naming pass, module and step, is raised.
"""
from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..errors import ScheduleError, SpecError, closest
from ..report import ModuleChange, PassReport, Report, Skipped, StepRecord
from ..core.schedule import Schedule, create_schedule
from ..core.state_keys import keep_original_keys, make_kept_keys_resolvable, moved_keys, tensor_keys
from .schema import PassSpec, load_spec
from ..core.edits import VariantError, variant_policy
from ..core.primitives.parallel import mesh_dimension
from ..core.snapshot import ModelSnapshot
from .steps import NoMatch, select_all, step_kind


def apply_schedule(model: nn.Module, spec: Any, example_inputs: Any = None, device_mesh: Any = None) -> Report:
    """Apply ``spec`` (dict, DictConfig, YAML path, shipped name or ScheduleSpec) to ``model`` in place.

    ``example_inputs`` (dict of keyword arguments or tuple) is a batch like the real ones; traces
    specialise on it (e.g. on whether an attention mask is present). ``device_mesh`` is what
    parallel steps distribute over (Lightning: the strategy's); steps whose mesh dimension is
    missing or of size 1 are skipped and reported. Returns the ``Report``.
    """
    spec = load_spec(spec)
    if not isinstance(model, nn.Module):
        raise SpecError(f"apply_schedule expects an nn.Module, got {type(model).__name__}")
    sch = create_schedule(model, example_inputs, device_mesh)
    for p in spec.enabled:
        if not p.optional and p.select is not None and not _selected(sch, p):
            raise SpecError(_nothing_selected(sch, p))
    report = Report(model=type(model).__name__, fingerprint=spec.fingerprint(), spec=spec.normalised())
    snapshot = ModelSnapshot(model)
    try:
        for p in spec.passes:
            report.passes.append(_run_pass(sch, p) if p.enabled else PassReport(p.name, "disabled", _sel(p), p.fn))
        if sch.mod is not model:
            raise SpecError("a pass replaced the root module itself; select a submodule instead "
                            "(apply_schedule changes the model in place)")
    except BaseException:
        snapshot.restore()
        raise
    report.refresh_specialisations(model)
    make_kept_keys_resolvable(model)  # distributed checkpoints find every key by attribute access
    return report


def _sel(p: PassSpec) -> list[str] | None:
    return list(p.select) if p.select is not None else None


def _selected(sch: Schedule, p: PassSpec) -> list[Schedule]:
    return [sch] if p.select is None else select_all(sch, p.select)


def _nothing_selected(sch: Schedule, p: PassSpec) -> str:
    paths = [path for path, _ in sch.mod.named_modules() if path]
    hints = sorted({h for s in p.select for h in closest(s.replace("*", "0"), paths, n=3)})
    return (f"pass {p.name!r}: selector {' or '.join(map(repr, p.select))} matches no module of "
            f"{type(sch.mod).__name__}" + (f"; closest paths: {', '.join(hints)}" if hints else "")
            + " (mark the pass optional: true to allow this)")


def _run_pass(sch: Schedule, p: PassSpec) -> PassReport:
    start = time.perf_counter()
    report = PassReport(p.name, "applied", _sel(p), p.fn)
    parallel = [d for d in p.unless_parallel if mesh_dimension(sch, d) is not None]
    if parallel:
        report.status = "skipped"
        report.skipped.append(Skipped("", f"the device mesh shards {', '.join(parallel)}; this pass's ops take "
                                          f"whole weights, so the original code runs (unless_parallel)"))
        return report
    targets = _selected(sch, p)
    if not targets:
        if not p.optional:
            raise SpecError(_nothing_selected(sch, p))
        report.status = "skipped"
        report.skipped.append(Skipped("", f"selector {' or '.join(map(repr, p.select))} matches no module"))
        return report
    for target in targets:
        outcome = _run_on_module(target, p)
        (report.skipped if isinstance(outcome, Skipped) else report.changes).append(outcome)
    if not report.changes:
        report.status = "skipped"
    report.seconds = round(time.perf_counter() - start, 4)
    return report


class _Before:
    """What a module looked like before a pass, to describe the change afterwards."""

    def __init__(self, module: nn.Module):
        self.cls = _class_name(module)
        self.modules = {id(m) for m in module.modules()}
        self.params = {id(t): n for n, t in module.named_parameters()}
        self.keys = set(module.state_dict(keep_vars=True))

    def change(self, path: str, module: nn.Module, steps: list[StepRecord]) -> ModuleChange:
        params = {id(t): n for n, t in module.named_parameters()}
        keys = set(module.state_dict(keep_vars=True))
        new_modules: dict[str, str] = {}
        for name, m in module.named_modules():
            inside_new = any(name.startswith(f"{outer}.") for outer in new_modules)
            if id(m) not in self.modules and not _is_traced(m) and not inside_new:
                new_modules[name or "<self>"] = type(m).__name__
        return ModuleChange(
            path=path, class_before=self.cls, class_after=_class_name(module), steps=steps, new_modules=new_modules,
            params_added=sorted(n for i, n in params.items() if i not in self.params),
            params_removed=sorted(n for i, n in self.params.items() if i not in params),
            state_keys_added=sorted(keys - self.keys), state_keys_removed=sorted(self.keys - keys))


def _is_traced(module: nn.Module) -> bool:
    import torch.fx as fx

    return isinstance(module, fx.GraphModule)


def _class_name(module: nn.Module) -> str:
    name = type(module).__name__
    return f"{name} (traced)" if _is_traced(module) else name


def _run_on_module(sch: Schedule, p: PassSpec) -> ModuleChange | Skipped:
    """All steps of ``p`` on one module, or why an optional pass found nothing to do there."""
    before = _Before(sch.mod)
    policy = variant_policy("skip" if p.optional else "raise")
    if p.fn is not None:
        keys = tensor_keys(sch.mod)
        with _context(p, sch, "fn"), policy:
            _call_fn(sch, p)
        keep_original_keys(sch.mod, moved_keys(keys, sch.mod))
        return before.change(sch.path, sch.mod, [StepRecord("fn", p.fn, 1)])
    records = []
    for index, step in enumerate(p.steps, start=1):
        reason = step_kind(step.kind).not_applicable(sch, dict(step.args))
        if reason:
            return Skipped(sch.path, f"step {index} ({step.kind}): {reason}")
    undo = ModelSnapshot(sch.parent.mod if sch.parent is not None else sch.mod) if p.optional else None
    for index, step in enumerate(p.steps, start=1):
        try:
            with _context(p, sch, f"step {index} ({step.kind})"), variant_policy("skip" if p.optional else "raise"):
                records.append(step_kind(step.kind).run(sch, dict(step.args)))
        except (NoMatch, VariantError) as exc:
            if isinstance(exc, VariantError) and not p.optional:
                raise
            if not p.optional:
                raise SpecError(f"pass {p.name!r} at {sch.path or '<root>'} step {index} ({step.kind}): {exc} "
                                f"(selector {' or '.join(map(repr, p.select or ('<root>',)))}; "
                                f"mark the pass optional: true to allow this)") from None
            undo.restore()  # an optional pass that finds nothing leaves no half-applied steps
            return Skipped(sch.path, f"step {index} ({step.kind}): {exc}")
    return before.change(sch.path, sch.mod, records)


def _call_fn(sch: Schedule, p: PassSpec) -> None:
    from ..registry import import_object

    import_object(p.fn)(sch, **p.params)


class _context:
    """Name the pass, module and step in any error raised inside (same exception family)."""

    def __init__(self, p: PassSpec, sch: Schedule, what: str):
        self.where = f"pass {p.name!r} at {sch.path or '<root>'} {what}"
        self.optional = p.optional

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, NoMatch) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, VariantError) and self.optional:
            return False
        if isinstance(exc, ScheduleError):
            try:
                wrapped = type(exc)(f"{self.where}: {exc}")
            except TypeError:
                wrapped = ScheduleError(f"{self.where}: {exc}")
        else:
            wrapped = ScheduleError(f"{self.where}: {type(exc).__name__}: {exc}")
        raise wrapped from exc

