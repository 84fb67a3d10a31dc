"""Command-line overrides checked against the config tree, and errors reduced to one line.

Hydra reports a bad override with several lines (and a traceback for errors raised while the job
runs). ``check_overrides`` composes the config first and names, in one line, the unknown group
option, the unknown key or the constructor argument of the wrong type, with what would have been
valid.
"""
from __future__ import annotations

import collections.abc
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from lightning.fabric.utilities.exceptions import MisconfigurationException
from hydra.utils import get_object
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError, ScheduleError, unknown
from ..spec import load_spec

CONFIG_MODULE = "slapo_lightning.configs"
CONFIG_NAME = "train"
_ABSENT = object()

# Errors that mean "the user asked for something that cannot work": reported in one line.
USER_ERRORS = (ScheduleError, HydraException, OmegaConfBaseException, MisconfigurationException)


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: the project's own error (also when Hydra wrapped it) or a condensed message."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in chain:
        if isinstance(error, ScheduleError) and str(error).strip():
            return _condense(str(error))
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return unknown(group or "config", name, exc.options or [], did_you_mean=False)
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        key = _full_key(exc)
        return f"{key + ': ' if key else ''}{type(exc.__cause__).__name__}: {_condense(str(exc.__cause__))}"
    for error in chain:
        if str(error).strip():
            return _condense(str(error))
    return type(exc).__name__


def _condense(message: str) -> str:
    """Hydra/OmegaConf messages joined into one line, without the config search path dump."""
    message = message.split("Config search path")[0]
    lines = [" ".join(line.split()) for line in message.splitlines()]
    return "; ".join(line for line in lines if line)


def _full_key(exc: InstantiationException) -> str:
    for line in str(exc).splitlines():
        if line.strip().startswith("full_key:"):
            return line.split(":", 1)[1].strip()
    return ""


def _group_options(group: str) -> list[str]:
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _check_group(override: Override, options: list[str]) -> None:
    if override.is_delete():
        return
    value = override.value()
    chosen = value if isinstance(value, list) else [value]
    for choice in chosen:
        if choice is not None and str(choice) not in options:
            raise RecipeError(unknown(override.key_or_group, choice, options))


def _describe_keys(node: Any) -> str:
    keys = list(node) if isinstance(node, dict) else []
    return ", ".join(map(str, keys)) if keys else "(none)"


def _lookup(tree: Any, parts: list[str]) -> Any:
    """The raw (unresolved) value at ``parts`` of a plain container tree, or ``_ABSENT``."""
    for part in parts:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return _ABSENT
    return tree


def _check_key(override: Override, tree: dict) -> None:
    """A value override must name an existing key (``+key=`` adds one) with a value of its type."""
    key = override.key_or_group
    if override.is_add() or override.is_force_add() or override.is_hydra_override():
        return
    parts = key.split(".")
    current = _lookup(tree, parts)
    if current is _ABSENT:
        for depth in range(len(parts) - 1, -1, -1):
            parent = _lookup(tree, parts[:depth])
            if parent is not _ABSENT:
                where = ".".join(parts[:depth]) or "the top level"
                raise RecipeError(
                    f"unknown key {key!r}: {where} has no {parts[depth]!r} (valid: {_describe_keys(parent)}); "
                    f"to add a new key use +{key}=..."
                )
    if override.is_delete() or override.is_sweep_override():
        return
    _check_type(tree, parts, override.value())


def _check_type(tree: dict, parts: list[str], new: Any) -> None:
    """A value for a constructor argument (the key's parent has a ``_target_``) must fit the
    argument's annotation; keys that are not constructor arguments are left to the code using them."""
    parent = _lookup(tree, parts[:-1])
    target = parent.get("_target_") if isinstance(parent, dict) else None
    if not isinstance(target, str) or (isinstance(new, str) and "${" in new):
        return
    try:
        hints = typing.get_type_hints(_callable_of(get_object(target)))
    except Exception:  # an unimportable target or unresolvable hints: instantiation will tell
        return
    annotation = hints.get(parts[-1])
    if annotation is not None and not _fits(new, annotation):
        raise RecipeError(
            f"bad value {'.'.join(parts)}={new!r}: {target.rsplit('.', 1)[-1]} takes {_describe(annotation)}"
        )


def _callable_of(target: Any) -> Any:
    return target.__init__ if isinstance(target, type) else target


def _fits(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return isinstance(value, list)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, dict)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


SCHEDULE_FILE_SUFFIXES = (".yaml", ".yml")
_GRAMMAR_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def is_schedule_file(value: str) -> bool:
    """``schedule=<value>`` names a YAML file rather than a shipped schedule."""
    return value.endswith(SCHEDULE_FILE_SUFFIXES) or "/" in value or value.startswith("~") or (
        Path(value).expanduser().is_file())


def schedule_file_overrides(overrides: list[str]) -> list[str]:
    """``schedule=/path/my.yaml`` becomes ``schedule=none ++schedule.passes={...the file's passes...}``:
    the user's spec is then part of the composed (and saved) config like a shipped one, and later
    overrides such as ``schedule.passes.my_pass.enabled=false`` apply to it (every pass gets its
    default ``enabled: true`` written out for that)."""
    out: list[str] = []
    for line in overrides:
        key, sep, value = line.partition("=")
        value = value.strip().strip("'\"")
        if not sep or key.strip() != "schedule" or not value or not is_schedule_file(value):
            out.append(line)
            continue
        path = Path(value).expanduser()
        load_spec(path)  # SpecError naming the file: missing, malformed YAML or an invalid spec
        data = yaml.safe_load(path.read_text()) or {}
        passes = {name: {"enabled": True, **(body or {})} for name, body in (data.get("passes") or {}).items()}
        out.extend(["schedule=none", f"++schedule.passes={_grammar(passes, where=str(value))}"])
    return out


def _grammar(value: Any, where: str) -> str:
    """``value`` written in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_grammar(v, where) for v in value) + "]"
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or not _GRAMMAR_KEY.match(key):
                raise RecipeError(f"schedule file {where!r}: key {key!r} cannot be passed through Hydra; use names "
                                  "of letters, digits, '_' and '-'")
        return "{" + ", ".join(f"{k}: {_grammar(v, where)}" for k, v in value.items()) + "}"
    raise RecipeError(f"schedule file {where!r}: value {value!r} of type {type(value).__name__} is not YAML data")


def check_overrides(overrides: list[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose ``config_name`` with ``overrides``; raise ``RecipeError`` naming the first bad one.

    Returns the composed config (with the ``hydra`` node) for callers that want to look at it.
    """
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except OverrideParseException as exc:
            reason = _condense(str(exc)).split("; See https://")[0]
            raise RecipeError(f"cannot parse override {line!r}: {reason}") from None
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        groups = {o.key_or_group: _group_options(o.key_or_group) for o in parsed}
        group_overrides = [o for o in parsed if groups[o.key_or_group]]
        for override in group_overrides:
            _check_group(override, groups[override.key_or_group])
        # force-adds (``++key=value``, e.g. a schedule file's passes) are part of the tree the later keys are checked in
        forced = [o for o in parsed if not groups[o.key_or_group] and o.is_force_add()]
        base = compose(config_name, overrides=[o.input_line for o in group_overrides + forced])
        tree = OmegaConf.to_container(base, resolve=False)
        for override in parsed:
            if not groups[override.key_or_group]:
                _check_key(override, tree)
        return compose(config_name, overrides=overrides, return_hydra_config=True)
