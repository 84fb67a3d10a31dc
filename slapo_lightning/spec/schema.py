"""A schedule spec: named passes, each a list of steps (or a Python function) applied to the
modules a selector picks.

    passes:
      flash_attention:
        select: "bert.encoder.layer.*.attention.self"
        backend: auto                      # a pass parameter, used below as $backend
        steps:
          - trace: {}
          - replace: {pattern: attention, op: flash_attention, backend: $backend}

Passes are a mapping so Hydra can toggle one (``schedule.passes.flash_attention.enabled=false``)
and set a parameter (``schedule.passes.flash_attention.backend=sdpa``) from the command line.
``parse_spec`` checks everything that can be checked without the model (keys, primitives,
patterns, ops and their arguments, parameter references) and reports all problems at once.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..errors import RegistryError, SpecError, unknown
from ..registry import import_object
from .steps import step_kind

PASS_KEYS = ("enabled", "optional", "select", "steps", "fn", "description", "unless_parallel")
TOP_KEYS = ("passes",)
PARAM_REF = re.compile(r"^\$([A-Za-z_]\w*)$")


@dataclass(frozen=True)
class StepSpec:
    kind: str
    args: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {self.kind: dict(self.args)}


@dataclass(frozen=True)
class PassSpec:
    name: str
    enabled: bool = True
    optional: bool = False
    select: tuple[str, ...] | None = None
    steps: tuple[StepSpec, ...] = ()
    fn: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    unless_parallel: tuple[str, ...] = ()  # device-mesh dimensions under which the pass is skipped

    def as_dict(self) -> dict[str, Any]:
        """The normalised pass (defaults filled in, parameters substituted)."""
        out: dict[str, Any] = {"name": self.name, "optional": self.optional,
                               "select": list(self.select) if self.select is not None else None}
        if self.unless_parallel:
            out["unless_parallel"] = list(self.unless_parallel)
        if self.fn is not None:
            out["fn"] = self.fn
            out["params"] = dict(sorted(self.params.items()))
        else:
            out["steps"] = [s.as_dict() for s in self.steps]
        return out


@dataclass(frozen=True)
class ScheduleSpec:
    passes: tuple[PassSpec, ...] = ()

    @property
    def enabled(self) -> list[PassSpec]:
        return [p for p in self.passes if p.enabled]

    def normalised(self) -> dict[str, Any]:
        """What gets applied, in order: enabled passes with defaults filled in."""
        return {"passes": [p.as_dict() for p in self.enabled]}

    def fingerprint(self) -> str:
        """sha256 of the normalised spec: equal exactly when the same passes would be applied."""
        text = json.dumps(self.normalised(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def only(self, names: list[str]) -> "ScheduleSpec":
        """The same spec with only the named passes enabled (in spec order)."""
        return ScheduleSpec(tuple(replace(p, enabled=p.name in names) for p in self.passes))

    def __getitem__(self, name: str) -> PassSpec:
        for p in self.passes:
            if p.name == name:
                return p
        raise SpecError(f"no pass {name!r}; passes: {', '.join(p.name for p in self.passes) or '(none)'}")


# -- loading -------------------------------------------------------------------------------------------

SHIPPED_SPECS = Path(__file__).resolve().parents[1] / "configs" / "schedule"


def shipped_spec_names() -> list[str]:
    """Names of the schedule specs that ship with the package (``configs/schedule/<name>.yaml``)."""
    return sorted(p.stem for p in SHIPPED_SPECS.glob("*.yaml"))


def _to_container(spec: Any) -> Any:
    """A plain dict from a dict, an OmegaConf DictConfig, a YAML file path or a shipped spec's name."""
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        text = str(spec)
        if isinstance(spec, str) and not path.exists() and "/" not in text and not text.endswith((".yaml", ".yml")):
            if text in shipped_spec_names():
                return _read_yaml(SHIPPED_SPECS / f"{text}.yaml")
            raise SpecError(unknown("schedule", text, shipped_spec_names(), more="(or a path to a YAML spec file)"))
        return _read_yaml(path)
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return spec
    if isinstance(spec, DictConfig):
        try:
            return OmegaConf.to_container(spec, resolve=True)
        except Exception as exc:  # an interpolation that does not resolve
            raise SpecError(f"schedule spec: {type(exc).__name__}: {exc}") from None
    return spec


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise SpecError(f"schedule spec file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"schedule spec file {str(path)!r}{where}: malformed YAML: {problem}") from None


def load_spec(spec: Any) -> ScheduleSpec:
    """A checked ``ScheduleSpec`` from a ScheduleSpec, dict, DictConfig, YAML path, the name of a
    shipped spec (``"gpt2"``, ``"bert"``, ``"none"``) or None."""
    if isinstance(spec, ScheduleSpec):
        return spec
    if spec is None:
        return ScheduleSpec()
    return parse_spec(_to_container(spec))


# -- parsing and checking --------------------------------------------------------------------------

class _Problems(list):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}")


def parse_spec(data: Any) -> ScheduleSpec:
    """Check a plain-dict spec; SpecError listing every problem (one per line) otherwise."""
    problems = _Problems()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"a schedule spec is a mapping with a 'passes' key, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            problems.add("schedule spec", unknown("key", key, TOP_KEYS))
    passes_data = data.get("passes") or {}
    if not isinstance(passes_data, Mapping):
        raise SpecError(f"schedule spec: 'passes' must map pass names to passes, got {type(passes_data).__name__}")
    passes = []
    for name, body in passes_data.items():
        parsed = _parse_pass(str(name), body, problems)
        if parsed is not None:
            passes.append(parsed)
    if len(problems) == 1:
        raise SpecError(f"invalid schedule spec: {problems[0]}")
    if problems:
        raise SpecError(f"invalid schedule spec ({len(problems)} problems)\n" + "\n".join(f"  {p}" for p in problems))
    return ScheduleSpec(tuple(passes))


def _parse_pass(name: str, body: Any, problems: _Problems) -> PassSpec | None:
    where = f"pass {name!r}"
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        problems.add(where, f"must be a mapping of {', '.join(PASS_KEYS)}, got {type(body).__name__}")
        return None
    enabled, optional = body.get("enabled", True), body.get("optional", False)
    for key, value in (("enabled", enabled), ("optional", optional)):
        if not isinstance(value, bool):
            problems.add(where, f"{key!r} must be true or false, got {value!r}")
    select = _parse_select(body.get("select"), where, problems)
    unless = body.get("unless_parallel") or ()
    unless = (unless,) if isinstance(unless, str) else tuple(unless)
    if not all(isinstance(d, str) and d for d in unless):
        problems.add(where, f"'unless_parallel' must name device-mesh dimensions (e.g. tensor_parallel), got "
                            f"{body.get('unless_parallel')!r}")
    params = {k: v for k, v in body.items() if k not in PASS_KEYS}
    has_steps, has_fn = "steps" in body, body.get("fn") is not None
    if has_steps == has_fn:
        problems.add(where, "needs exactly one of 'steps' (a list of primitive calls) or 'fn' (an import path)")
        return None
    if has_fn:
        _check_fn(body["fn"], params, where, problems)
        return PassSpec(name, enabled is True, optional is True, select, (), body["fn"], params,
                        str(body.get("description") or ""), unless)
    used: set[str] = set()
    steps = _parse_steps(body["steps"], params, used, where, problems)
    for key in params:
        if key not in used:
            problems.add(where, unknown("key", key, list(PASS_KEYS) + sorted(used)))
    return PassSpec(name, enabled is True, optional is True, select, tuple(steps), None, params,
                    str(body.get("description") or ""), unless)


def _parse_select(select: Any, where: str, problems: _Problems) -> tuple[str, ...] | None:
    if select is None:
        return None
    selectors = [select] if isinstance(select, str) else select
    if not isinstance(selectors, list) or not selectors or not all(isinstance(s, str) and s for s in selectors):
        problems.add(where, f"'select' must be a selector string or a list of them, got {select!r}")
        return None
    for s in selectors:
        message = _selector_problem(s)
        if message:
            problems.add(where, message)
    return tuple(selectors)


def _selector_problem(selector: str) -> str | None:
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as exc:
            return f"invalid regex in selector {selector!r}: {exc}"
    if selector.startswith("class:"):
        try:
            import_object(selector[len("class:"):])
        except RegistryError as exc:
            return f"selector {selector!r}: {exc}"
    return None


def _check_fn(ref: Any, params: dict[str, Any], where: str, problems: _Problems) -> None:
    if not isinstance(ref, str):
        problems.add(where, f"'fn' must be an import path 'pkg.module:function', got {ref!r}")
        return
    try:
        fn = import_object(ref)
    except RegistryError as exc:
        problems.add(where, f"fn {exc}")
        return
    if not callable(fn):
        problems.add(where, f"fn {ref!r} is not callable")
        return
    try:
        inspect.signature(fn).bind(None, **params)
    except TypeError as exc:
        problems.add(where, f"fn {ref!r} does not accept (schedule, {', '.join(f'{k}=...' for k in params)}): {exc}")
    except ValueError:
        pass  # no signature to check (a builtin); the call will tell


def _substitute(value: Any, params: dict[str, Any], used: set[str], where: str, problems: _Problems) -> Any:
    """Replace ``$name`` strings by the pass parameter ``name`` (``$$x`` is a literal ``$x``)."""
    if isinstance(value, str):
        if value.startswith("$$"):
            return value[1:]
        ref = PARAM_REF.match(value)
        if ref:
            key = ref.group(1)
            if key not in params:
                problems.add(where, f"{value!r} refers to no parameter of the pass; "
                                    f"parameters: {', '.join(sorted(params)) or '(none)'}")
                return value
            used.add(key)
            return params[key]
        return value
    if isinstance(value, list):
        return [_substitute(v, params, used, where, problems) for v in value]
    if isinstance(value, Mapping):
        return {k: _substitute(v, params, used, where, problems) for k, v in value.items()}
    return value


def _parse_steps(steps: Any, params: dict[str, Any], used: set[str], where: str,
                 problems: _Problems) -> list[StepSpec]:
    if not isinstance(steps, list) or not steps:
        problems.add(where, f"'steps' must be a non-empty list of primitive calls, got {steps!r}")
        return []
    parsed = []
    for index, entry in enumerate(steps, start=1):
        at = f"{where} step {index}"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, Mapping) or len(entry) != 1:
            problems.add(at, f"a step is a mapping with one primitive name, e.g. {{trace: {{}}}}; got {entry!r}")
            continue
        (kind_name, args), = entry.items()
        args = {} if args is None else args
        if not isinstance(args, Mapping):
            problems.add(at, f"arguments of {kind_name!r} must be a mapping, got {args!r}")
            continue
        try:
            kind = step_kind(str(kind_name))
        except SpecError as exc:
            problems.add(at, str(exc))
            continue
        args = _substitute(dict(args), params, used, f"{at} ({kind_name})", problems)
        for message in kind.problems(args):
            problems.add(f"{at} ({kind_name})", message)
        parsed.append(StepSpec(kind.name, kind.normalise(args)))
    return parsed
