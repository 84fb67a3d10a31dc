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
    assert applied == {"tensor_parallel": 0, "rms_norm": 2, "fused_qkv": 2, "rope": 2, "flash_attention": 2,
                       "gated_mlp": 2, "fused_mlp": 0, "fused_cross_entropy": 1, "checkpoint": 0, "fsdp_layers": 0,
                       "fsdp_root": 0}, applied
    assert {p["name"]: p["status"] for p in report["passes"]}["fsdp_root"] == "skipped", "no mesh on one device"


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


def test_every_auto_pass_can_be_toggled_from_the_command_line(tmp_path):
    for name in load_spec("auto").passes:
        cfg = compose_train("recipe=llama", f"run_dir={tmp_path}", f"schedule.passes.{name.name}.enabled=false")
        assert [p.name for p in load_spec(cfg.schedule).enabled] == [
            p.name for p in load_spec("auto").enabled if p.name != name.name]


@pytest.mark.parametrize("model_type, fields", [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma2", {"head_dim": 8, "final_logit_softcapping": 30.0, "attn_implementation": None}),
])
def test_causal_lm_module_loss_is_the_hf_models_own_for_any_architecture(model_type, fields):
    """The module's loss (base model, then lm_loss on the output embedding, soft-capped where the
    config says) equals the HF model's own loss, before and after the auto schedule."""
    from slapo_lightning import apply_schedule
    from slapo_lightning.lightning import CausalLMModule

    impl = "eager" if model_type == "gemma2" else "sdpa"
    fields = {k: v for k, v in fields.items() if k != "attn_implementation"}
    sizes = {"t": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, **fields)}
    torch.manual_seed(0)
    module = CausalLMModule(size="t", sizes=sizes, vocab_size=101, model_type=model_type, attn_implementation=impl,
                            token_ids={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    assert module.model.config.model_type == model_type
    ids = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    module.eval()
    want = module.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(module.loss(batch)[0], want, rtol=1e-5, atol=1e-6)
    apply_schedule(module.model, "auto")
    assert type(module.model.lm_loss).__name__ == "FusedLinearCrossEntropy"
    torch.testing.assert_close(module.loss(batch)[0], want, rtol=1e-5, atol=1e-5)
