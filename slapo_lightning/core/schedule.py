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

from ..errors import PathError, ScheduleError, closest
from ..registry import import_object
from .primitives.registry import PRIMITIVES
from .tracer import CallArgs, forward_signature, training_defaults
from .tracer.guards import CallKey


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
        """Submodules matching a glob (``*`` one component, ``**`` any), ``re:<regex>``, a class,
        ``class:<import path>``, ``classname:<glob>`` (the class's name, e.g. ``*DecoderLayer``) or
        ``no_split:`` (the model's repeated layers: the classes HF's ``_no_split_modules`` names)."""
        match = _selector(selector, self._root.module)
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
        """The first input this module was seen called with (from a run of the root model)."""
        variants = self.example_variants()
        return variants[0] if variants else None

    def example_variants(self) -> list[Any]:
        """The distinct kinds of input this module was seen called with: one per training variant
        of the root's example batch (no mask, all-ones mask, padding) that reached it differently."""
        return self._root.examples_for(self.path)

    @property
    def device_mesh(self) -> Any:
        """The device mesh the caller gave ``create_schedule`` (None: one process or plain DDP)."""
        return self._root.device_mesh

    def record_example_inputs(self, path: str, calls: list) -> None:
        """Add the distinct calls of ``path`` a trace of its parent saw."""
        recorded = self._root.recorded.setdefault(path, [])
        module = self._root.module.get_submodule(path) if path else self._root.module
        kinds = {call_kind(module, c.args, c.kwargs) for c in recorded}
        for call in calls:
            kind = call_kind(module, call.args, call.kwargs)
            if kind not in kinds:
                kinds.add(kind)
                recorded.append(call)

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

    def __init__(self, module: nn.Module, example_inputs: Any = None, device_mesh: Any = None):
        self.module = module
        self.example_inputs = example_inputs
        self.device_mesh = device_mesh
        self.recorded: dict[str, list[CallArgs]] = {}
        self._captured = False

    def examples_for(self, path: str) -> list[Any]:
        if not path:
            return list(self._root_variants())
        if path not in self.recorded and not self._captured:
            self._capture()
        return list(self.recorded.get(path, []))

    def _root_variants(self) -> list[Any]:
        example = self.example_inputs if self.example_inputs is not None else _hf_dummy_inputs(self.module)
        if example is None:
            return []
        return training_variants(self.module, example)

    def _capture(self) -> None:
        """Run the root on each variant of its example inputs, recording the distinct inputs every
        submodule receives (a layer sees ``attention_mask=None`` for an unpadded batch)."""
        self._captured = True
        variants = _two_kinds(self._root_variants())
        if not variants:
            return
        names = {m: p for p, m in self.module.named_modules()}
        seen: dict[str, set] = {}

        def record(module, args, kwargs):
            path = names.get(module)
            if path is None:
                return
            kind = call_kind(module, args, kwargs)
            if kind not in seen.setdefault(path, set()):
                seen[path].add(kind)
                self.recorded.setdefault(path, []).append(CallArgs(tuple(args), dict(kwargs)))

        handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in names]
        was_training = self.module.training
        try:
            self.module.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for example in variants:
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


def call_kind(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What tells two calls of ``module`` apart for tracing: the call key its traced form uses."""
    return CallKey(forward_signature(module))(module, tuple(args), dict(kwargs))


def training_variants(model: nn.Module, example: Any) -> list[Any]:
    """The example, then the kinds of batch a padding collator also produces: for a model called
    with ``input_ids``, the same ids without a mask (where the mask is optional), with an all-ones
    mask and with padding (so the layers see both ``attention_mask=None`` and a mask tensor)."""
    if isinstance(example, dict):
        example = {**training_defaults(model), **example}
    ids = example.get("input_ids") if isinstance(example, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        return [example]
    mask = forward_signature(model).parameters.get("attention_mask")
    if mask is None:
        return [example]
    base = {k: v for k, v in example.items() if k != "attention_mask"}
    padded = torch.ones_like(ids)
    padded[0, -max(1, ids.shape[1] // 4):] = 0
    variants = [example, {**base, "attention_mask": torch.ones_like(ids)}, {**base, "attention_mask": padded}]
    if mask.default is not mask.empty:
        variants.insert(1, base)
    unique, seen = [], set()
    for v in variants:
        given = v.get("attention_mask")
        kind = (tuple(sorted(v)), bool(isinstance(given, torch.Tensor) and (given == 0).any()))
        if kind not in seen:
            seen.add(kind)
            unique.append(v)
    return unique


def _two_kinds(variants: list[Any]) -> list[Any]:
    """For running the model: the first variant, and the first that is padded if it is not (or
    unpadded if it is). Inside a Hugging Face model an all-ones mask and no mask reach the layers
    alike (as None), so two runs show every layer both kinds of call; only a trace of the root
    itself needs the other variants."""
    def padded(v: Any) -> bool:
        mask = v.get("attention_mask") if isinstance(v, dict) else None
        return isinstance(mask, torch.Tensor) and bool((mask == 0).any())

    if len(variants) < 2:
        return variants
    other = next((v for v in variants[1:] if padded(v) != padded(variants[0])), None)
    return [variants[0]] + ([other] if other is not None else [])


def _hf_dummy_inputs(model: nn.Module) -> dict | None:
    """A small batch of token ids for a model that takes ``input_ids``: a Hugging Face model, or a
    user's module around one (the vocabulary comes from the first HF config found inside)."""
    params = forward_signature(model).parameters
    if getattr(model, "main_input_name", "input_ids") != "input_ids" or "input_ids" not in params:
        return None
    vocab = next((m.config.vocab_size for m in model.modules()
                  if isinstance(getattr(getattr(m, "config", None), "vocab_size", None), int)), None)
    if not vocab:
        return None
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(n not in ("input_ids", "attention_mask") for n in required):
        return None
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if "attention_mask" in required else {})}


def _glob_match(parts: list[str], path: list[str]) -> bool:
    if not parts:
        return not path
    if parts[0] == "**":
        return any(_glob_match(parts[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], parts[0]) and _glob_match(parts[1:], path[1:])


def no_split_classes(root: nn.Module) -> set[str]:
    """Class names in the ``_no_split_modules`` of every Hugging Face model inside ``root``: the
    blocks HF never splits across devices, i.e. its repeated layers (and e.g. BERT's embeddings)."""
    return {name for m in root.modules() for name in (getattr(m, "_no_split_modules", None) or ())}


def _selector(selector: Any, root: nn.Module | None = None) -> Callable[[str, nn.Module], bool]:
    if isinstance(selector, type):
        return lambda p, m: isinstance(m, selector)
    if not isinstance(selector, str):
        raise ScheduleError(f"selector must be a glob, 're:<regex>', a class, 'class:<path>', 'classname:<glob>' "
                            f"or 'no_split:', got {selector!r}")
    if selector.startswith("no_split:"):
        if selector != "no_split:":
            raise ScheduleError(f"selector {selector!r}: 'no_split:' takes nothing after the colon")
        names = no_split_classes(root) if root is not None else set()
        return lambda p, m: type(m).__name__ in names
    if selector.startswith("classname:"):
        glob = selector[len("classname:"):]
        return lambda p, m: fnmatch.fnmatchcase(type(m).__name__, glob)
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


def create_schedule(model: nn.Module, example_inputs: Any = None, device_mesh: Any = None) -> Schedule:
    """The schedule tree of ``model``.

    ``example_inputs`` (tuple or dict of keyword arguments) is an input the model is really called
    with; submodules are traced with what they receive from it. Hugging Face models default to a
    small unpadded batch of token ids. ``device_mesh`` (a torch ``DeviceMesh`` with named
    dimensions, e.g. Lightning's ``pl_module.device_mesh``) is what the parallel primitives
    (``parallelize``, ``shard``, ``fully_shard``) distribute over; without one they do nothing.
    """
    if not isinstance(model, nn.Module):
        raise ScheduleError(f"create_schedule expects an nn.Module, got {type(model).__name__}")
    return Schedule(_Root(model, example_inputs, device_mesh), "")
