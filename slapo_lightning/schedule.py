"""The schedule tree: addresses submodules by dotted path and binds primitives to them.

A ``Schedule`` is a light handle (root + path); ``.mod`` is looked up live, so handles stay
valid while primitives swap modules underneath (trace, replace, decompose).
"""
from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import PathError, ScheduleError, closest
from .primitives.registry import PRIMITIVES
from .registry import import_object
from .tracer import CallArgs, training_defaults


class Schedule:
    """A node of the schedule tree; primitives (``sch.trace()``, ``sch.replace(...)``) are
    looked up in the primitive registry, so extensions appear as methods too."""

    def __init__(self, root: "_Root", path: str):
        self._root = root
        self.path = path

    # -- tree -------------------------------------------------------------------------------------
    @property
    def mod(self) -> nn.Module:
        return self._root.module if not self.path else self._root.module.get_submodule(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> "Schedule | None":
        if not self.path:
            return None
        return Schedule(self._root, self.path.rpartition(".")[0])

    @property
    def child(self) -> dict[str, "Schedule"]:
        return {name: Schedule(self._root, self._join(name)) for name, _ in self.mod.named_children()}

    @property
    def root(self) -> "Schedule":
        return Schedule(self._root, "")

    def _join(self, relative: str) -> str:
        return f"{self.path}.{relative}" if self.path and relative else (self.path or relative)

    def __getitem__(self, relative: str) -> "Schedule":
        path = self._join(relative)
        try:
            self._root.module.get_submodule(path)
        except AttributeError:
            known = [p for p, _ in self.mod.named_modules() if p]
            hint = closest(relative, known)
            raise PathError(
                f"no submodule {relative!r} under {self.path or '<root>'}"
                + (f"; closest: {', '.join(hint)}" if hint else "")
            ) from None
        return Schedule(self._root, path)

    def __contains__(self, relative: str) -> bool:
        try:
            self[relative]
            return True
        except PathError:
            return False

    def select(self, selector: Any) -> list["Schedule"]:
        """Submodules matching a glob (``*`` one component, ``**`` any), ``re:<regex>`` or a class."""
        match = _selector(selector)
        return [Schedule(self._root, self._join(p)) for p, m in self.mod.named_modules() if p and match(p, m)]

    def replace_module(self, new: nn.Module) -> None:
        """Put ``new`` where this schedule's module is (parent attribute or root)."""
        if not self.path:
            self._root.module = new
            return
        parent_path, _, name = self.path.rpartition(".")
        parent = self._root.module.get_submodule(parent_path) if parent_path else self._root.module
        setattr(parent, name, new)

    # -- example inputs (for tracing HF code with concrete values) -----------------------------------
    def example_inputs(self) -> Any:
        """Inputs this module was seen called with, captured from a run of the root model."""
        return self._root.examples_for(self.path)

    def record_example_inputs(self, path: str, args: tuple, kwargs: dict) -> None:
        self._root.recorded[path] = (args, kwargs)

    # -- primitives --------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in PRIMITIVES:
            return functools.partial(PRIMITIVES.get(name), self)
        raise AttributeError(
            f"Schedule has no attribute or primitive {name!r}; primitives: {', '.join(PRIMITIVES.names())}"
        )

    def __repr__(self) -> str:
        return f"Schedule(path={self.path or '<root>'!r}, mod={type(self.mod).__name__})"

    def __iter__(self) -> Iterator["Schedule"]:
        return iter(self.child.values())


class _Root:
    """State shared by every handle of one tree: the (current) root module and captured inputs."""

    def __init__(self, module: nn.Module, example_inputs: Any = None):
        self.module = module
        self.example_inputs = example_inputs
        self.recorded: dict[str, tuple[tuple, dict]] = {}
        self._captured = False

    def examples_for(self, path: str) -> Any:
        if path not in self.recorded and not self._captured:
            self._capture()
        if path in self.recorded:
            args, kwargs = self.recorded[path]
            return _as_example(args, kwargs)
        if not path and self.example_inputs is not None:
            return self.example_inputs
        return None

    def _capture(self) -> None:
        """Run the root once on its example inputs, recording what every submodule receives."""
        self._captured = True
        example = self.example_inputs if self.example_inputs is not None else _hf_dummy_inputs(self.module)
        if example is None:
            return
        if isinstance(example, dict):
            example = {**training_defaults(self.module), **example}
        names = {m: p for p, m in self.module.named_modules()}
        handles = []

        def record(module, args, kwargs):
            path = names.get(module)
            if path is not None and path not in self.recorded:
                self.recorded[path] = (args, dict(kwargs))

        for module in names:
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
        was_training = self.module.training
        try:
            self.module.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                if isinstance(example, dict):
                    self.module(**example)
                else:
                    self.module(*example)
        except Exception as exc:
            raise ScheduleError(f"running the model on its example inputs failed: {type(exc).__name__}: {exc}") from exc
        finally:
            for h in handles:
                h.remove()
            self.module.train(was_training)


def _as_example(args: tuple, kwargs: dict) -> CallArgs:
    return CallArgs(tuple(args), dict(kwargs))


def _hf_dummy_inputs(model: nn.Module) -> dict | None:
    """A small packed batch for Hugging Face models (no padding: the common training case)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or getattr(model, "main_input_name", None) != "input_ids":
        return None
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=generator)}


def _glob_match(parts: list[str], path: list[str]) -> bool:
    if not parts:
        return not path
    if parts[0] == "**":
        return any(_glob_match(parts[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], parts[0]) and _glob_match(parts[1:], path[1:])


def _selector(selector: Any) -> Callable[[str, nn.Module], bool]:
    if isinstance(selector, type):
        return lambda p, m: isinstance(m, selector)
    if not isinstance(selector, str):
        raise ScheduleError(f"selector must be a glob, 're:<regex>', a class or 'class:<path>', got {selector!r}")
    if selector.startswith("class:"):
        cls = import_object(selector[len("class:"):])
        return lambda p, m: isinstance(m, cls)
    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as exc:
            raise ScheduleError(f"invalid regex in selector {selector!r}: {exc}") from None
        return lambda p, m: pattern.fullmatch(p) is not None
    parts = selector.split(".")
    return lambda p, m: _glob_match(parts, p.split("."))


def create_schedule(model: nn.Module, example_inputs: Any = None) -> Schedule:
    """The schedule tree of ``model``.

    ``example_inputs`` (tuple or dict of keyword arguments) is an input the model is really called
    with; submodules are traced with what they receive from it. Hugging Face models default to a
    small unpadded batch of token ids.
    """
    if not isinstance(model, nn.Module):
        raise ScheduleError(f"create_schedule expects an nn.Module, got {type(model).__name__}")
    return Schedule(_Root(model, example_inputs), "")
