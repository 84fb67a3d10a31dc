"""Recipes composed with Hydra's compose API and run end to end on tiny data (CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import GPT2LMHeadModel

import slapo_lightning as slapo
from slapo_lightning.lightning import CausalLMModule, MaskedLMModule
from slapo_lightning.cli.train import train

import tiny_models as fx

RECIPES = {"gpt2": "CausalLMModule", "bert": "MaskedLMModule"}


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
    ]


def compose_train(*overrides: str):
    with initialize_config_module("slapo_lightning.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_model_data_schedule_and_trainer(recipe, tmp_path):
    cfg = compose_train(f"recipe={recipe}", f"run_dir={tmp_path}")
    assert cfg.model._target_.endswith(RECIPES[recipe])
    assert cfg.data.objective == {"gpt2": "clm", "bert": "mlm"}[recipe]
    assert cfg.model.size == "tiny" and cfg.trainer.accelerator == "auto"
    assert cfg.callbacks.checkpoint.dirpath == f"{tmp_path}/checkpoints"
    assert cfg.callbacks.schedule.schedule == cfg.schedule


def test_trainer_presets_compose(tmp_path):
    assert compose_train("trainer=gpu", f"run_dir={tmp_path}", "schedule=none").trainer.precision == "bf16-mixed"
    ddp = compose_train("trainer=ddp", f"run_dir={tmp_path}", "schedule=none").trainer
    assert ddp.strategy == "ddp" and ddp.accelerator == "gpu"
    both = compose_train("logger=[csv,tensorboard]", f"run_dir={tmp_path}", "schedule=none").logger
    assert set(both) == {"csv", "tensorboard"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_with_fast_dev_run(recipe, tmp_path, cache_dir):
    report = tmp_path / "reports" / "schedule.json"
    cfg = compose_train(*tiny_overrides(recipe, tmp_path, cache_dir), "trainer.fast_dev_run=true",
                        f"+callbacks.schedule.report_path={report}")
    result = train(cfg)
    assert result["global_step"] == 1
    assert result["schedule_report"] == str(report) and report.is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_small_corpus_with_fewer_tokens_than_asked_logs_and_trains(recipe, tmp_path):
    """The tokenizer comes out smaller than data.vocab_size; hyper-parameters still log (csv)."""
    overrides = [o for o in tiny_overrides(recipe, tmp_path, tmp_path / "cache") if not o.startswith("data.max_chars")]
    cfg = compose_train(*overrides, "data.max_chars=20000", "data.vocab_size=30000", "trainer.max_steps=1",
                        "trainer.limit_val_batches=1", "validate_after_fit=false")
    result = train(cfg)
    assert result["global_step"] == 1
    assert result["schedule_report"] == str(Path(result["log_dir"]) / "schedule_report.json")


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


def tiny_module(recipe: str):
    torch.manual_seed(0)
    if recipe == "bert":
        return MaskedLMModule(sizes=fx.BERT_SIZES, vocab_size=fx.VOCAB, warmup_steps=1)
    return CausalLMModule(sizes=fx.GPT2_SIZES, vocab_size=fx.VOCAB, warmup_steps=1,
                          token_ids={"bos_token_id": 0, "eos_token_id": 0})


def classes(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_schedule_pass_can_be_toggled_from_the_command_line(recipe, tmp_path):
    """Each pass turned off with ``schedule.passes.<pass>.enabled=false`` leaves the model alone while
    the other passes still apply; ``checkpoint`` (off in the shipped spec) turns on the same way."""
    recipe_overrides = [f"recipe={recipe}", f"run_dir={tmp_path}"]
    passes = list(compose_train(*recipe_overrides).schedule.passes)
    assert "checkpoint" in passes
    reference = tiny_module(recipe)
    full = slapo.apply_schedule(reference.model, compose_train(*recipe_overrides,
                                                               "schedule.passes.checkpoint.enabled=true").schedule)
    parallel = [p.name for p in full.passes if p.status == "skipped" and "no device mesh" in p.skipped[0].reason]
    assert parallel, "the shipped schedules carry parallel passes, skipped on one process"
    passes = [n for n in passes if n not in parallel]
    assert full.applied == passes
    introduced = {p.name: {cls for c in p.changes for cls in c.new_modules.values()} for p in full.passes}
    for name in passes:
        others = set().union(*(introduced[n] for n in passes if n != name))
        own = introduced[name] - others
        assert own, f"pass {name} introduces no module class of its own: {introduced}"
        module = tiny_module(recipe)
        before = classes(module.model)
        spec = compose_train(*recipe_overrides, f"schedule.passes.{name}.enabled=false").schedule
        assert spec.passes[name].enabled is False
        report = slapo.apply_schedule(module.model, spec)
        assert report[name].status == "disabled" and not report[name].changes
        assert report.applied == [n for n in passes if n not in (name, "checkpoint")]  # parallel ones skipped
        assert not own & classes(module.model), f"disabled pass {name} still put {own} into the model"
        for change in full[name].changes:
            touched_by_others = any(c.path == change.path for p in full.passes if p.name != name for c in p.changes)
            if not touched_by_others:
                assert type(module.model.get_submodule(change.path)).__name__ == change.class_before
        assert classes(module.model) != before, f"no pass applied with only {name} disabled"
