"""Up-front checks of the composed config's values, before anything is built or written.

``check_values`` looks at what a user can type (learning rate, batch size, steps, devices,
precision, paths, checkpoint, schedule, callbacks) and raises ``RecipeError`` naming the key, the
value and what would be valid, so the run stops before Hydra makes a run directory. The Trainer
and the callbacks are built once here, with their log output muted, so Lightning's own argument
checks (accelerator, strategy, precision plugin, checkpoint options) answer now rather than after
the data is tokenized. What can only be known later (a checkpoint that does not fit the model)
is checked in ``train`` and reported the same way.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
import zipfile
from numbers import Number
from pathlib import Path
from typing import Any, Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..errors import RecipeError, ScheduleError, unknown
from ..spec import load_spec

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
MIN_VOCAB = {"byte_bpe": 260, "wordpiece": 100}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(float(value))


def need(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise RecipeError(f"{key}={value!r} is not valid: {valid}")


def int_at_least(section: dict, name: str, prefix: str, low: int, allow_none: bool = False, also: Iterable = ()) -> None:
    value = section.get(name)
    if value is None and allow_none:
        return
    extra = list(also)
    ok = (_is_int(value) and value >= low) or value in extra
    alternatives = "".join(f" or {v}" for v in extra) + (" or null" if allow_none else "")
    need(ok, f"{prefix}.{name}", value, f"an integer >= {low}{alternatives}")


def number_in(section: dict, name: str, prefix: str, low: float, high: float, low_open: bool = False,
              high_open: bool = False, allow_none: bool = False) -> None:
    value = section.get(name)
    if value is None and allow_none:
        return
    ok = _is_number(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    need(ok, f"{prefix}.{name}", value, f"a number in {interval}" + (" or null" if allow_none else ""))


def check_values(cfg: DictConfig) -> None:
    """Raise ``RecipeError`` for the first value of ``cfg`` that cannot work."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    _check_top(cfg)
    _check_model(_resolved(cfg, "model"), cfg)
    _check_data(_resolved(cfg, "data"))
    _check_trainer(_resolved(cfg, "trainer"))
    _check_schedule(cfg)
    _check_built(cfg, plain)


def _resolved(cfg: DictConfig, key: str) -> dict:
    node = cfg.get(key)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _check_top(cfg: DictConfig) -> None:
    need(_is_int(cfg.get("seed")), "seed", cfg.get("seed"), "an integer")
    need(isinstance(cfg.get("validate_after_fit"), bool), "validate_after_fit", cfg.get("validate_after_fit"),
         "true or false")
    export = cfg.get("export_dir")
    if export is not None:
        need(isinstance(export, str) and export != "", "export_dir", export, "a directory path or null")
        need(not Path(export).expanduser().is_file(), "export_dir", export, "a directory, not an existing file")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        check_checkpoint_file(ckpt)


def check_checkpoint_file(ckpt: Any) -> dict:
    """The checkpoint at ``ckpt`` (memory-mapped, weights only), or RecipeError saying why it is not one."""
    if not isinstance(ckpt, str) or not ckpt:
        raise RecipeError(f"ckpt_path={ckpt!r} is not valid: a path to a Lightning checkpoint (.ckpt) or null")
    path = Path(ckpt).expanduser()
    if path.is_dir() and (path / DISTRIBUTED_METADATA).is_file():
        return _distributed_checkpoint(path, ckpt)
    if path.is_dir():
        raise RecipeError(f"ckpt_path: {ckpt!r} is a directory, not a distributed checkpoint (it has no "
                          f"{DISTRIBUTED_METADATA}); give a checkpoint, e.g. {ckpt.rstrip('/')}/last.ckpt")
    if not path.is_file():
        raise RecipeError(f"ckpt_path: {ckpt!r} is not a checkpoint file (no such file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - anything torch cannot read is not a checkpoint
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"ckpt_path: {ckpt!r} is not a Lightning checkpoint torch can load safely "
                          f"({type(exc).__name__}: {reason[:160]})") from None
    missing = [key for key in ("state_dict", "loops", "global_step") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise RecipeError(f"ckpt_path: {ckpt!r} is not a Lightning training checkpoint (it has no {', '.join(missing)}); "
                          "give a .ckpt that Lightning's ModelCheckpoint wrote, e.g. <run>/checkpoints/last.ckpt")
    return checkpoint


DISTRIBUTED_METADATA = ".metadata"
"""The file torch.distributed.checkpoint writes in a checkpoint directory (ModelParallelStrategy's
``save_distributed_checkpoint=True``); Lightning keeps the rest of the checkpoint in ``meta.pt``."""


def _distributed_checkpoint(path: Path, ckpt: str) -> dict:
    """A distributed checkpoint as :func:`check_checkpoint_file` returns one: the weights' keys and
    shapes (meta tensors, read from the metadata only) next to Lightning's loops and step."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        extra = torch.load(path / "meta.pt", map_location="cpu", weights_only=True) if (path / "meta.pt").is_file() else {}
    except Exception as exc:  # noqa: BLE001 - anything torch cannot read is not a checkpoint
        raise RecipeError(f"ckpt_path: {ckpt!r} is not a distributed checkpoint torch can read "
                          f"({type(exc).__name__}: {str(exc).strip()[:160]})") from None
    prefix = "state_dict."
    weights = {key[len(prefix):]: torch.empty(tuple(entry.size), device="meta")
               for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix) and hasattr(entry, "size")}
    missing = [key for key in ("loops", "global_step") if key not in extra] + ([] if weights else ["state_dict"])
    if missing:
        raise RecipeError(f"ckpt_path: {ckpt!r} is not a Lightning training checkpoint (it has no {', '.join(missing)}); "
                          "give a checkpoint that Lightning's ModelCheckpoint wrote, e.g. <run>/checkpoints/last.ckpt")
    return {**extra, "state_dict": weights}


def _check_model(model: dict, cfg: DictConfig) -> None:
    number_in(model, "lr", "model", 0.0, 10.0, low_open=True)
    number_in(model, "weight_decay", "model", 0.0, 10.0)
    number_in(model, "min_lr_ratio", "model", 0.0, 1.0)
    int_at_least(model, "warmup_steps", "model", 0)
    betas = model.get("betas")
    need(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
         "model.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    need(model.get("fused_adamw") in (None, True, False), "model.fused_adamw", model.get("fused_adamw"),
         "true, false or null")
    attn = model.get("attn_implementation")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise RecipeError(unknown("model.attn_implementation", attn, ATTN_IMPLEMENTATIONS))
    pretrained = model.get("pretrained_path")
    if pretrained:
        directory = Path(str(pretrained)).expanduser()
        if not (directory / "config.json").is_file():
            raise RecipeError(f"model.pretrained_path: {pretrained!r} is not a directory with a config.json "
                              "(a save_pretrained or export_dir directory)")
        return
    sizes = model.get("sizes") or {}
    if model.get("size") not in sizes:
        raise RecipeError(unknown("model.size preset", model.get("size"), sizes))
    config = model.get("config") or {}
    need(isinstance(config, dict), "model.config", config, "a mapping of Hugging Face config fields")
    fields = {**sizes[model["size"]], **config}
    positions = fields.get("n_positions", fields.get("max_position_embeddings"))
    seq_len = cfg.data.get("seq_len") if cfg.get("data") is not None else None
    if _is_int(positions) and _is_int(seq_len) and seq_len > positions:
        raise RecipeError(f"data.seq_len={seq_len} exceeds the model's {positions} positions (model.size="
                          f"{model['size']}); lower data.seq_len or pick a larger model.size")
    for key in ("n_layer", "num_hidden_layers", "n_head", "num_attention_heads", "n_embd", "hidden_size"):
        if key in fields:
            need(_is_int(fields[key]) and fields[key] >= 1, f"model.config.{key}", fields[key], "an integer >= 1")
    width = fields.get("n_embd", fields.get("hidden_size"))
    heads = fields.get("n_head", fields.get("num_attention_heads"))
    if _is_int(width) and _is_int(heads) and heads and width % heads:
        raise RecipeError(f"model: hidden size {width} is not a multiple of the {heads} attention heads; "
                          "change model.config.n_embd/hidden_size or n_head/num_attention_heads")


def _check_data(data: dict) -> None:
    from ..data.blocks import OBJECTIVES
    from ..data.corpus import expand_paths
    from ..data.tokenizer import TOKENIZER_KINDS

    if data.get("objective") not in OBJECTIVES:
        raise RecipeError(unknown("data.objective", data.get("objective"), OBJECTIVES))
    if data.get("tokenizer_kind") not in TOKENIZER_KINDS:
        raise RecipeError(unknown("data.tokenizer_kind", data.get("tokenizer_kind"), TOKENIZER_KINDS))
    if data["objective"] == "mlm" and data["tokenizer_kind"] != "wordpiece" and not data.get("tokenizer_path"):
        raise RecipeError("data.objective=mlm needs [CLS], [SEP] and [MASK] tokens: set data.tokenizer_kind=wordpiece")
    int_at_least(data, "seq_len", "data", 3 if data["objective"] == "mlm" else 2)
    int_at_least(data, "batch_size", "data", 1)
    int_at_least(data, "eval_batch_size", "data", 1, allow_none=True)
    int_at_least(data, "num_workers", "data", 0)
    int_at_least(data, "max_chars", "data", 1, allow_none=True)
    int_at_least(data, "max_files", "data", 2, allow_none=True)
    int_at_least(data, "vocab_size", "data", MIN_VOCAB[data["tokenizer_kind"]])
    number_in(data, "val_fraction", "data", 0.0, 1.0, low_open=True, high_open=True)
    number_in(data, "mlm_probability", "data", 0.0, 1.0, low_open=True, high_open=True)
    paths = data.get("paths")
    if paths is not None and not data.get("hf_dataset"):
        if isinstance(paths, str):
            paths = [paths]
        need(isinstance(paths, list) and all(isinstance(p, str) for p in paths), "data.paths", paths,
             "a list of files, directories or globs, e.g. '[~/corpus, /data/*.txt]', or null")
        expand_paths(paths, data.get("file_glob") or "**/*.txt")
    tokenizer = data.get("tokenizer_path")
    if tokenizer and not Path(str(tokenizer)).expanduser().is_dir():
        raise RecipeError(f"data.tokenizer_path: {tokenizer!r} is not a directory (a tokenizer's save_pretrained directory)")


def _check_trainer(trainer: dict) -> None:
    int_at_least(trainer, "max_steps", "trainer", 1, also=[-1])
    int_at_least(trainer, "max_epochs", "trainer", 1, allow_none=True, also=[-1])
    if trainer.get("max_steps") == -1 and trainer.get("max_epochs") in (None, -1):
        raise RecipeError("trainer.max_steps=-1 with trainer.max_epochs=null never ends (and the learning-rate "
                          "schedule needs an end): set trainer.max_steps or trainer.max_epochs")
    int_at_least(trainer, "accumulate_grad_batches", "trainer", 1)
    int_at_least(trainer, "log_every_n_steps", "trainer", 1)
    int_at_least(trainer, "num_sanity_val_steps", "trainer", 0, also=[-1])
    number_in(trainer, "gradient_clip_val", "trainer", 0.0, math.inf, allow_none=True)
    interval = trainer.get("val_check_interval")
    need(interval is None or (_is_int(interval) and interval >= 1) or (_is_number(interval) and 0 < interval <= 1),
         "trainer.val_check_interval", interval, "a number of steps >= 1, a fraction of an epoch in (0, 1], or null")
    limit = trainer.get("limit_val_batches")
    need(limit is None or (_is_int(limit) and limit >= 0) or (_is_number(limit) and 0 <= limit <= 1),
         "trainer.limit_val_batches", limit, "a number of batches >= 0 or a fraction in [0, 1]")
    devices = trainer.get("devices")
    ok = (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
          or (isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices))
          or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit() and int(devices) != 0))
    need(ok, "trainer.devices", devices, "a count >= 1, -1 (all), 'auto' or a list of device indices")
    accelerator = trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(f"trainer.accelerator={accelerator!r}: this machine has no CUDA GPU torch can use; "
                          "use trainer=cpu (or trainer.accelerator=cpu)")


def _check_schedule(cfg: DictConfig) -> None:
    callbacks = cfg.get("callbacks") or {}
    node = callbacks.get("schedule") if isinstance(callbacks, DictConfig) else None
    source = node.get("schedule") if node is not None else cfg.get("schedule")
    try:
        load_spec(source)
    except ScheduleError as exc:
        raise RecipeError(f"schedule: {exc}") from None


@contextlib.contextmanager
def _quiet():
    """Lightning's info lines and warnings while the trainer is built for checking only."""
    names = ["lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_built(cfg: DictConfig, plain: dict) -> None:
    """Build the callbacks and the Trainer (nothing runs, nothing is written) so their own checks speak now."""
    from hydra.errors import InstantiationException

    from .overrides import one_line

    callbacks = []
    with _quiet():
        for name, node in (cfg.get("callbacks") or {}).items():
            if node is None:
                continue
            try:
                callbacks.append(instantiate(node))
            except (InstantiationException, ScheduleError, ValueError, TypeError) as exc:
                raise RecipeError(f"callbacks.{name}: {one_line(exc)}") from None
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_cfg.pop("default_root_dir", None)
        from hydra.utils import get_class

        kwargs = {k: _built(f"trainer.{k}", v) for k, v in trainer_cfg.items() if k != "_target_"}
        _check_mesh(trainer_cfg)

        target = get_class(trainer_cfg["_target_"])
        keep = [c for c in callbacks if not _is_progress_bar(c)] if not kwargs.get("enable_progress_bar", True) else callbacks
        try:
            with _no_env_side_effects():
                trainer = target(**kwargs, callbacks=keep, logger=False, default_root_dir=os.devnull)
        except Exception as exc:  # noqa: BLE001 - Lightning's argument checks (MisconfigurationException, ValueError, ...)
            raise RecipeError(f"trainer: {one_line(exc)}") from None
    for name, callback in zip([n for n, node in (cfg.get("callbacks") or {}).items() if node is not None], callbacks):
        check = getattr(callback, "check_strategy", None)
        if check is not None:
            try:
                check(trainer.strategy)
            except ScheduleError as exc:
                raise RecipeError(f"callbacks.{name}: {exc} (trainer.strategy is {type(trainer.strategy).__name__})") from None


def _built(key: str, value: Any) -> Any:
    """A Trainer argument given as a config node with a ``_target_`` (``trainer.strategy``), built."""
    if not (isinstance(value, dict) and "_target_" in value):
        return value
    from hydra.errors import InstantiationException

    from .overrides import one_line

    try:
        return instantiate(value)
    except (InstantiationException, ValueError, TypeError, ImportError) as exc:
        raise RecipeError(f"{key}: {one_line(exc)}") from None


def _check_mesh(trainer: dict) -> None:
    """ModelParallelStrategy's mesh must cover every rank; Lightning would say so only after
    launching the processes."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.get("strategy")
    if not (isinstance(strategy, dict) and issubclass(get_class(strategy["_target_"]), ModelParallelStrategy)):
        return
    dp, tp = strategy.get("data_parallel_size", "auto"), strategy.get("tensor_parallel_size", "auto")
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if not all(isinstance(v, int) for v in (dp, tp, devices, nodes)) or devices < 1:
        return
    if dp * tp != devices * nodes:
        raise RecipeError(f"trainer.strategy: data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp} ranks, "
                          f"but trainer.devices={devices} x trainer.num_nodes={nodes} start {devices * nodes}; make "
                          "the product of the mesh sizes equal the number of processes")


def _is_progress_bar(callback: Any) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    return isinstance(callback, ProgressBar)


@contextlib.contextmanager
def _no_env_side_effects():
    """Building a Trainer may set environment variables (e.g. for the launcher); put them back."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
