"""Recipes composed with Hydra's compose API and run end to end on tiny data (CPU)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import GPT2LMHeadModel

from slapo_lightning import configs
from slapo_lightning.train import train

CONFIG_DIR = Path(configs.__file__).parent
RECIPES = {"gpt2": "CausalLMModule", "bert": "MaskedLMModule"}


def schedule_overrides(recipe: str) -> list[str]:
    """The recipe's own schedule once the callback and its spec file exist; an empty one before."""
    if importlib.util.find_spec("slapo_lightning.lightning.callback") is None:
        return ["schedule=none", "~callbacks.schedule"]
    if not (CONFIG_DIR / "schedule" / f"{recipe}.yaml").is_file():
        return ["schedule=none"]
    return []


def tiny_overrides(recipe: str, run_dir: Path, cache_dir: Path) -> list[str]:
    return [
        f"recipe={recipe}",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "data.max_chars=200000",
        "data.vocab_size=1000",
        "data.seq_len=64",
        "data.batch_size=8",
        "trainer=cpu",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *schedule_overrides(recipe),
    ]


def compose_train(*overrides: str):
    with initialize_config_module("slapo_lightning.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_model_data_schedule_and_trainer(recipe, tmp_path):
    cfg = compose_train(f"recipe={recipe}", f"run_dir={tmp_path}", *schedule_overrides(recipe))
    assert cfg.model._target_.endswith(RECIPES[recipe])
    assert cfg.data.objective == {"gpt2": "clm", "bert": "mlm"}[recipe]
    assert cfg.model.size == "tiny" and cfg.trainer.accelerator == "auto"
    assert cfg.callbacks.checkpoint.dirpath == f"{tmp_path}/checkpoints"
    if "callbacks.schedule" not in " ".join(schedule_overrides(recipe)):
        assert cfg.callbacks.schedule.schedule == cfg.schedule


def test_trainer_presets_compose(tmp_path):
    assert compose_train("trainer=gpu", f"run_dir={tmp_path}", "schedule=none").trainer.precision == "bf16-mixed"
    ddp = compose_train("trainer=ddp", f"run_dir={tmp_path}", "schedule=none").trainer
    assert ddp.strategy == "ddp" and ddp.accelerator == "gpu"
    both = compose_train("logger=[csv,tensorboard]", f"run_dir={tmp_path}", "schedule=none").logger
    assert set(both) == {"csv", "tensorboard"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_with_fast_dev_run(recipe, tmp_path, cache_dir):
    cfg = compose_train(*tiny_overrides(recipe, tmp_path, cache_dir), "trainer.fast_dev_run=true")
    result = train(cfg)
    assert result["global_step"] == 1


@pytest.mark.parametrize("recipe", RECIPES)
def test_small_corpus_with_fewer_tokens_than_asked_logs_and_trains(recipe, tmp_path):
    """The tokenizer comes out smaller than data.vocab_size; hyper-parameters still log (csv)."""
    overrides = [o for o in tiny_overrides(recipe, tmp_path, tmp_path / "cache") if not o.startswith("data.max_chars")]
    cfg = compose_train(*overrides, "data.max_chars=20000", "data.vocab_size=30000", "trainer.max_steps=1",
                        "trainer.limit_val_batches=1", "validate_after_fit=false")
    result = train(cfg)
    assert result["global_step"] == 1


@pytest.mark.slow
@pytest.mark.ci
def test_gpt2_trains_checkpoints_resumes_and_exports(tmp_path, cache_dir):
    """Loss falls; a checkpoint is written; resuming continues from its step; the export loads in
    transformers and as ``model.pretrained_path`` (with its own tokenizer)."""
    common = [
        "model.warmup_steps=5", "model.lr=3e-3", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
        "trainer.limit_val_batches=4",
    ]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = train(compose_train(*tiny_overrides("gpt2", first_dir, cache_dir), *common, "trainer.max_steps=40"))
    losses = read_metric(Path(first["log_dir"]) / "metrics.csv", "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    assert first["global_step"] == 40 and Path(first["last_checkpoint"]).is_file()
    assert first["val_ppl"] < 1000  # below the vocabulary size: better than uniform guessing

    second = train(compose_train(
        *tiny_overrides("gpt2", second_dir, cache_dir), *common, "trainer.max_steps=60",
        f"ckpt_path={first['last_checkpoint']}", f"export_dir={tmp_path / 'export'}",
    ))
    resumed_steps = [step for step, _ in read_metric(Path(second["log_dir"]) / "metrics.csv", "train/loss")]
    assert second["global_step"] == 60 and min(resumed_steps) >= 40
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 1000)

    finetune = compose_train(
        *tiny_overrides("gpt2", tmp_path / "finetune", tmp_path / "empty_cache"), "trainer.fast_dev_run=true",
        f"model.pretrained_path={tmp_path / 'export'}",
    )
    assert finetune.data.tokenizer_path == str(tmp_path / "export")
    assert train(finetune)["global_step"] == 1
    assert not (tmp_path / "empty_cache" / "tokenizers").exists(), "the export's tokenizer is used, none trained"


def read_metric(path: Path, name: str) -> list[tuple[int, float]]:
    with path.open() as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle) if row.get(name)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_schedule_pass_can_be_toggled_from_the_command_line(recipe, tmp_path):
    spec_file = CONFIG_DIR / "schedule" / f"{recipe}.yaml"
    if not spec_file.is_file():
        pytest.skip(f"{spec_file.name} is not there yet")
    passes = compose_train(f"recipe={recipe}", f"run_dir={tmp_path}").schedule.passes
    for name in passes:
        toggled = compose_train(f"recipe={recipe}", f"run_dir={tmp_path}", f"schedule.passes.{name}.enabled=false")
        assert toggled.schedule.passes[name].enabled is False
