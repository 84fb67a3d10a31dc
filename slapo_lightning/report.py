"""What a schedule did to a model: per pass, the modules touched, their class before and after,
the parameters that appeared or went away, and what each step matched.

A ``Report`` renders as a rich table (``print(report)`` or ``report.render()``) and round-trips
through JSON (``report.save(path)`` / ``Report.load(path)``), so a run directory keeps a record of
the schedule its checkpoints were trained under.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RegistryError, closest


@dataclass
class StepRecord:
    """One step at one module: what it did and how many pattern matches (or targets) it found."""

    step: str
    detail: str = ""
    matches: int = 0
    skipped_variants: list[str] = field(default_factory=list)  # variants that keep the original code


@dataclass
class ModuleChange:
    """One module a pass was applied to."""

    path: str
    class_before: str
    class_after: str
    steps: list[StepRecord] = field(default_factory=list)
    new_modules: dict[str, str] = field(default_factory=dict)
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    state_keys_added: list[str] = field(default_factory=list)
    state_keys_removed: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """A module (or a whole pass when ``path`` is empty) an optional pass left alone, and why."""

    path: str
    reason: str


@dataclass
class PassReport:
    name: str
    status: str  # "applied", "disabled", "skipped"
    selector: list[str] | None = None
    fn: str | None = None
    changes: list[ModuleChange] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def matches(self) -> int:
        return sum(s.matches for c in self.changes for s in c.steps)


@dataclass
class Variant:
    """One specialisation of a traced module: the kind of call it serves, when it was made (at
    setup or at run time) and the schedule edits it runs without (``skipped``)."""

    label: str
    origin: str
    skipped: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The outcome of ``apply_schedule``; ``fingerprint`` identifies the (normalised) spec;
    ``specialisations`` lists each traced module's variants (``refresh_specialisations`` after a run
    adds the ones made at run time)."""

    model: str
    fingerprint: str
    passes: list[PassReport] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    specialisations: dict[str, list[Variant]] = field(default_factory=dict)

    def refresh_specialisations(self, model: Any) -> None:
        """Read every traced module's specialisations off ``model``."""
        from .core import TracedModule

        self.specialisations = {
            path or "<root>": [Variant(s.label, s.origin, list(s.skipped)) for s in module.specialisations]
            for path, module in model.named_modules() if isinstance(module, TracedModule)}

    @property
    def unscheduled_variants(self) -> list[str]:
        """``path [variant]: edit`` for every variant that runs part of the original code."""
        return [f"{path} [{v.label}]: {skip}" for path, variants in self.specialisations.items()
                for v in variants for skip in v.skipped]

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        names = [p.name for p in self.passes]
        hint = closest(name, names, n=1) if isinstance(name, str) else []
        raise RegistryError(f"no pass {name!r} in the report of {self.model}"
                            f"{f'; did you mean {hint[0]!r}?' if hint else ''}; "
                            f"valid passes: {', '.join(names) or '(none)'}")

    @property
    def applied(self) -> list[str]:
        return [p.name for p in self.passes if p.status == "applied"]

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        passes = []
        for p in data.get("passes", []):
            changes = [ModuleChange(**{**c, "steps": [StepRecord(**s) for s in c.get("steps", [])]})
                       for c in p.get("changes", [])]
            skipped = [Skipped(**s) for s in p.get("skipped", [])]
            passes.append(PassReport(**{**p, "changes": changes, "skipped": skipped}))
        specialisations = {path: [Variant(**v) for v in variants]
                           for path, variants in data.get("specialisations", {}).items()}
        return cls(model=data["model"], fingerprint=data["fingerprint"], passes=passes, spec=data.get("spec", {}),
                   specialisations=specialisations)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).expanduser().read_text()))

    # -- rendering --------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """Table rows; modules a pass changed alike (layer 0, 1, ...) share one row, their paths
        merged with ``*`` where they differ and the count appended."""
        rows: list[tuple[str, str, str, str, str]] = []
        for p in self.passes:
            if p.status == "disabled" or (p.status == "skipped" and not p.changes and not p.skipped):
                rows.append((p.name, "", "", p.status, ""))
                continue
            groups: dict[tuple, list[str]] = {}
            for c in p.changes:
                steps = ", ".join(f"{s.step}{f' {s.detail}' if s.detail else ''} ({s.matches})" for s in c.steps)
                new = sorted({cls for name, cls in c.new_modules.items() if name != "<self>"})
                after = c.class_after + (f" + {', '.join(new)}" if new else "")
                key = (f"{c.class_before} -> {after}", steps, f"+{len(c.params_added)} / -{len(c.params_removed)}")
                groups.setdefault(key, []).append(c.path)
            for (classes, steps, params), paths in groups.items():
                rows.append((p.name, _merged(paths), classes, steps, params))
            reasons: dict[str, list[str]] = {}
            for s in p.skipped:
                reasons.setdefault(s.reason, []).append(s.path)
            for reason, paths in reasons.items():
                rows.append((p.name, _merged(paths) if all(paths) else "(all)", "", f"skipped: {reason}", ""))
        return rows

    def table(self):
        """A ``rich.table.Table`` of ``rows()``."""
        from rich.table import Table

        table = Table(title=f"schedule for {self.model} ({self.fingerprint[:12]})")
        for column in ("pass", "path", "class before -> after", "steps (matches)", "params +/-"):
            table.add_column(column, overflow="fold")
        for row in self.rows():
            table.add_row(*row)
        return table

    def render(self, width: int = 160) -> str:
        """The table as plain text."""
        from rich.console import Console

        console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
        console.print(self.table())
        for line in self.variant_lines():
            console.print(line, markup=False, highlight=False)
        return console.file.getvalue()

    def variant_lines(self) -> list[str]:
        """One line per kind of traced module (its variant count), then every unscheduled variant."""
        counts: dict[tuple, list[str]] = {}
        for path, variants in self.specialisations.items():
            counts.setdefault(tuple(v.label for v in variants), []).append(path)
        lines = [f"specialisations: {_merged(paths)}: {len(labels)} ({'; '.join(labels)})"
                 for labels, paths in counts.items()]
        lines += [f"UNSCHEDULED VARIANT: {line}" for line in self.unscheduled_variants]
        return lines

    def __str__(self) -> str:
        return self.render()


def _merged(paths: list[str]) -> str:
    """``a.0.b`` and ``a.1.b`` -> ``a.*.b (x2)``; paths of different shapes are listed."""
    if len(paths) == 1:
        return paths[0] or "<root>"
    split = [p.split(".") for p in paths]
    if len({len(parts) for parts in split}) != 1:
        return ", ".join(paths)
    merged = [parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*split)]
    return f"{'.'.join(merged)} (x{len(paths)})"
