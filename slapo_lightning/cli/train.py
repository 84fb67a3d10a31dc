"""``slapo-train``: train a recipe (model + data + schedule + trainer) composed by Hydra.

    slapo-train recipe=gpt2 trainer.max_steps=200 schedule.passes.flash_attention.enabled=false
    slapo-train recipe=bert schedule=/path/to/my_schedule.yaml

Also ``python -m slapo_lightning.cli``. Everything the user typed is checked before Hydra makes
the run directory (``overrides.check_overrides`` for keys, groups and types, ``values.check_values``
for ranges, paths, the checkpoint, the schedule, the callbacks and the Trainer's own arguments);
what can only fail later (a checkpoint that does not fit the model, too little text) is reported
the same way, and the run directory this run made is removed again. Every such mistake is one
``error:`` line on stderr and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import RecipeError, ScheduleError
from ..lightning.callback import ScheduleCallback
from ..lightning.export import export_pretrained
from .overrides import CONFIG_NAME, USER_ERRORS, check_overrides, one_line, schedule_file_overrides
from .values import check_checkpoint_file, check_values

EXIT_USER_ERROR = 2
_FRESH_RUN_DIR = "SLAPO_TRAIN_FRESH_RUN_DIR"  # set by main() when the run directory did not exist before


def tokenizer_token_ids(tokenizer) -> dict[str, int]:
    """The special token ids the model config should agree with.

    A padding id equal to the end-of-text id (GPT-2's byte-level BPE) is left out: packed blocks
    have no padding, and transformers would otherwise warn on every separator it sees.
    """
    ids = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if ids["pad_token_id"] == ids["eos_token_id"]:
        del ids["pad_token_id"]
    return {name: value for name, value in ids.items() if value is not None}


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name -> config`` group, skipping ones set to null."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The configured callbacks, less the progress bar and the summary when the trainer turns them off."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    callbacks = instantiate_named(cfg.callbacks)
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_model_summary", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks


def check_checkpoint_fits(ckpt_path: str, module: pl.LightningModule) -> None:
    """The checkpoint's weights must be this model's (same keys and shapes; checkpoints keep the
    original model's keys under any schedule), else the resume would fail deep inside Lightning."""
    saved = check_checkpoint_file(ckpt_path)["state_dict"]
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of this model's weights are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"it has {len(unexpected)} weights this model lacks (e.g. {unexpected[0]})")
        raise RecipeError(f"ckpt_path: {ckpt_path!r} was saved from another model: {'; '.join(parts)}; resume with "
                          "the recipe and model.size it was trained with")
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise RecipeError(f"ckpt_path: {ckpt_path!r} was saved from another model: {key} has shape "
                              f"{tuple(saved[key].shape)} there and {tuple(tensor.shape)} here (another model.size, "
                              "data.vocab_size or tokenizer); resume with the settings it was trained with")


def example_batch(datamodule, rows: int = 1) -> dict:
    """The first ``rows`` training items, collated as a training batch (for counting FLOPs)."""
    datamodule.setup("fit")
    return datamodule.collate([datamodule.train_set[i] for i in range(rows)])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the recipe, validate once more, export if asked; returns what went where."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.ckpt_path:
        check_checkpoint_file(cfg.ckpt_path)
    datamodule = instantiate(cfg.data, _convert_="all")
    tokenizer = datamodule.tokenizer
    module = instantiate(cfg.model, _convert_="all", vocab_size=len(tokenizer), token_ids=tokenizer_token_ids(tokenizer))
    module.check_sequence_length(datamodule.seq_len)
    if cfg.ckpt_path:
        check_checkpoint_fits(cfg.ckpt_path, module)
    module.measure_flops(example_batch(datamodule), datamodule.batch_size)
    from lightning.pytorch.callbacks import ModelSummary

    callbacks = build_callbacks(cfg)
    # a configured summary callback is the summary; Lightning would otherwise announce it is not adding its own
    own_summary = {"enable_model_summary": False} if any(isinstance(c, ModelSummary) for c in callbacks) else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_named(cfg.logger) or False, **own_summary)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    result: dict[str, Any] = {"run_dir": str(cfg.run_dir), "log_dir": trainer.log_dir, "global_step": trainer.global_step}
    if cfg.validate_after_fit and not trainer.fast_dev_run:
        metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        result["val_loss"] = float(metrics["val/loss"])
        result["val_ppl"] = math.exp(result["val_loss"])
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        result["best_checkpoint"] = checkpoint.best_model_path or None
        result["last_checkpoint"] = checkpoint.last_model_path or None
    schedule = next((c for c in trainer.callbacks if isinstance(c, ScheduleCallback)), None)
    report = schedule.report_file(trainer) if schedule is not None else None
    result["schedule_report"] = str(report) if report is not None and report.is_file() else None
    if cfg.export_dir and trainer.is_global_zero:
        result["export_dir"] = str(export_pretrained(module.model, cfg.export_dir, tokenizer))
    if trainer.is_global_zero:
        print_summary(result)
    return result


def print_summary(result: dict[str, Any]) -> None:
    labels = {
        "run_dir": "run directory", "log_dir": "logs", "last_checkpoint": "last checkpoint",
        "best_checkpoint": "best checkpoint", "schedule_report": "schedule report", "export_dir": "exported model",
        "global_step": "steps", "val_loss": "validation loss", "val_ppl": "validation perplexity",
    }
    for key, label in labels.items():
        value = result.get(key)
        if value is not None:
            print(f"{label}: {value:.4f}" if isinstance(value, float) else f"{label}: {value}")


def report_user_error(exc: BaseException) -> None:
    """The one line (or the traceback with ``HYDRA_FULL_ERROR=1``), then exit code 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"error: {one_line(exc)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _run(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except USER_ERRORS as exc:
        _remove_fresh_run_dir()
        report_user_error(exc)


def _remove_fresh_run_dir() -> None:
    """A failed run leaves nothing behind: the run directory goes if this run created it."""
    fresh = os.environ.get(_FRESH_RUN_DIR)
    try:
        output = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - not under Hydra
        return
    if fresh and Path(fresh).resolve() == output.resolve() and output.is_dir():
        _detach_log_files(output)  # Hydra's <run>/train.log handler would re-create the file on the next record
        shutil.rmtree(output, ignore_errors=True)
        parent = output.parent
        while parent != parent.parent and parent.is_dir() and not any(parent.iterdir()) and parent.name != "":
            parent.rmdir()  # outputs/<recipe>/ made for this run alone
            parent = parent.parent
            if parent == Path.cwd() or parent == Path(".").resolve():
                break


def _detach_log_files(directory: Path) -> None:
    """Close and remove every logging file handler that writes under ``directory``."""
    root = directory.resolve()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(root):
                logger.removeHandler(handler)
                handler.close()


_hydra_main = hydra.main(config_path="pkg://slapo_lightning.configs", config_name=CONFIG_NAME, version_base="1.3")(_run)


def main(argv: list[str] | None = None) -> None:
    """Console script: check everything the user typed, then let Hydra run the job."""
    if argv is not None:
        sys.argv = [sys.argv[0] if sys.argv else "slapo-train", *argv]
    args, _ = get_args_parser().parse_known_args()
    checkable = not (args.multirun or args.help or args.hydra_help or args.info or args.cfg or args.config_path
                     or args.config_dir or args.shell_completion)
    if checkable and "LOCAL_RANK" not in os.environ:  # DDP ranks > 0 re-run a command rank 0 has checked
        os.environ.pop(_FRESH_RUN_DIR, None)
        try:
            overrides = schedule_file_overrides(args.overrides)
            cfg = check_overrides(overrides, args.config_name or CONFIG_NAME)
            run_dir = _pin_run_dir(cfg)
            check_values(cfg)
        except USER_ERRORS as exc:
            report_user_error(exc)
        finally:
            HydraConfig.instance().cfg = None
        if not any(o.startswith("hydra.run.dir=") for o in overrides):
            overrides.append(f"hydra.run.dir={_quote(run_dir)}")
        if not Path(run_dir).exists():
            os.environ[_FRESH_RUN_DIR] = str(Path(run_dir).resolve())
        sys.argv = [sys.argv[0], *_flags(sys.argv[1:], args.overrides), *overrides]
    quiet_library_notices()
    _hydra_main()


NOTICES_DROPPED = ("💡 Tip:", "`Trainer(limit_val_batches=1.0)` was configured")
"""Lightning's rank-zero lines that say nothing about this run (an advertisement, a default restated)."""


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOTICES_DROPPED)


def quiet_library_notices() -> None:
    """The first screen shows what the run does: no advertisements, no deprecation notices from
    inside Lightning/torch that a user cannot act on."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNotices())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _pin_run_dir(cfg: DictConfig) -> str:
    """The run directory Hydra will use, resolved once (its default has the time in it); the
    composed config then resolves as in the job (``run_dir`` is ``hydra:runtime.output_dir``)."""
    HydraConfig.instance().set_config(cfg)
    run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(run_dir).resolve())
    HydraConfig.instance().set_config(cfg)
    return run_dir


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _flags(argv: list[str], overrides: list[str]) -> list[str]:
    """The command line's options (``-c``, ``--config-name`` ...), without its overrides."""
    remaining = list(overrides)
    flags = []
    for item in argv:
        if item in remaining:
            remaining.remove(item)
        else:
            flags.append(item)
    return flags


if __name__ == "__main__":
    main()
