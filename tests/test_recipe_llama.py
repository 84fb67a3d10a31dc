"""The ``llama`` recipe: Llama presets, the embedded corpus and the ``auto`` schedule, from the
command line's config; a local pretrained directory of another architecture trains the same way."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slapo_lightning.cli.train import train
from slapo_lightning.spec import load_spec

from test_train_recipes import compose_train, read_metric, tiny_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_recipe_composes_the_llama_preset_and_the_auto_schedule(tmp_path):
    cfg = compose_train("recipe=llama", f"run_dir={tmp_path}")
    assert cfg.model.model_type == "llama" and cfg.model.size == "tiny" and cfg.data.objective == "clm"
    assert set(cfg.model.sizes) >= {"tiny", "1b"}
    assert list(cfg.schedule.passes) == [p.name for p in load_spec("auto").passes]


def test_llama_recipe_trains_with_every_pass_verified_on_the_first_batch(tmp_path, cache_dir):
    report_path = tmp_path / "schedule.json"
    cfg = compose_train(*tiny_overrides("llama", tmp_path, cache_dir), "trainer.max_steps=3",
                        "trainer.limit_val_batches=1", "callbacks.schedule.verify=first_batch",
                        f"+callbacks.schedule.report_path={report_path}")
    result = train(cfg)
    assert result["global_step"] == 3
    report = json.loads(report_path.read_text())
    applied = {p["name"]: len(p["changes"]) for p in report["passes"]}
    assert applied == {"rms_norm": 2, "fused_qkv": 2, "rope": 2, "flash_attention": 2, "gated_mlp": 2,
                       "fused_mlp": 0, "fused_cross_entropy": 1, "checkpoint": 0}, applied


@pytest.mark.slow
@pytest.mark.ci
def test_llama_loss_falls_and_a_local_qwen2_directory_trains_too(tmp_path, cache_dir):
    """Loss falls; the export loads as a Llama; a Qwen2 saved in a directory with that tokenizer
    trains under the same recipe (its config.json picks the architecture) and keeps its class."""
    first = train(compose_train(*tiny_overrides("llama", tmp_path / "run", cache_dir), "trainer.max_steps=30",
                                "model.warmup_steps=5", "model.lr=3e-3", "trainer.val_check_interval=30",
                                "trainer.log_every_n_steps=5", "trainer.limit_val_batches=2",
                                f"export_dir={tmp_path / 'export'}"))
    losses = read_metric(Path(first["log_dir"]) / "metrics.csv", "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "export")
    vocab = llama.config.vocab_size

    qwen_dir = tmp_path / "qwen2"
    shutil.copytree(tmp_path / "export", qwen_dir)
    for weights in qwen_dir.glob("*.safetensors"):
        weights.unlink()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(qwen_dir)
    report_path = tmp_path / "qwen_schedule.json"
    cfg = compose_train(*tiny_overrides("llama", tmp_path / "qwen_run", cache_dir), "trainer.fast_dev_run=true",
                        f"model.pretrained_path={qwen_dir}", "callbacks.schedule.verify=first_batch",
                        f"+callbacks.schedule.report_path={report_path}")
    assert train(cfg)["global_step"] == 1
    report = json.loads(report_path.read_text())
    assert report["model"] == "Qwen2ForCausalLM"
    assert all(len(p["changes"]) == 2 for p in report["passes"] if p["name"] in ("rms_norm", "gated_mlp", "rope"))
