"""``slapo-train``: train a recipe (model + data + schedule + trainer) composed by Hydra.

    slapo-train recipe=gpt2 trainer.max_steps=200 schedule.passes.fused_qkv.enabled=false

Also ``python -m slapo_lightning.cli``. Bad input (unknown recipe, key or value, missing path)
is reported as one ``error:`` line on stderr with a non-zero exit; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra._internal.utils import get_args_parser
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..errors import RecipeError
from ..lightning.callback import ScheduleCallback
from ..lightning.export import export_pretrained
from .overrides import CONFIG_NAME, USER_ERRORS, check_overrides, one_line

EXIT_USER_ERROR = 2


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the recipe, validate once more, export if asked; returns what went where."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).expanduser().is_file():
        raise RecipeError(f"ckpt_path: {cfg.ckpt_path!r} is not a checkpoint file")
    datamodule = instantiate(cfg.data, _convert_="all")
    tokenizer = datamodule.tokenizer
    module = instantiate(cfg.model, _convert_="all", vocab_size=len(tokenizer), token_ids=tokenizer_token_ids(tokenizer))
    module.check_sequence_length(datamodule.seq_len)
    trainer = instantiate(cfg.trainer, callbacks=instantiate_named(cfg.callbacks), logger=instantiate_named(cfg.logger) or False)
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


def _run(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except USER_ERRORS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


_hydra_main = hydra.main(config_path="pkg://slapo_lightning.configs", config_name=CONFIG_NAME, version_base="1.3")(_run)


def main() -> None:
    """Console script: check the overrides in one place, then let Hydra run the job."""
    args, _ = get_args_parser().parse_known_args()
    checkable = not (args.multirun or args.help or args.hydra_help or args.info or args.cfg or args.config_path or args.config_dir or args.shell_completion)
    if checkable:
        try:
            check_overrides(args.overrides, args.config_name or CONFIG_NAME)
        except USER_ERRORS as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    _hydra_main()


if __name__ == "__main__":
    main()
