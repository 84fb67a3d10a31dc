"""The masked- and causal-LM LightningModules: loss, checkpoints, optimisation and export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from slapo_lightning.lightning import CausalLMModule, LMHeadLoss, MaskedLMModule, export_pretrained
from slapo_lightning import configs
from slapo_lightning.errors import RecipeError
from slapo_lightning.lightning.hf_models import preset_config
from slapo_lightning.op.cross_entropy import FusedLinearCrossEntropy

CONFIG_DIR = Path(configs.__file__).parent
VOCAB = 300


def model_settings(name: str) -> dict:
    settings = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    settings.pop("_target_")
    return settings


def gpt2(**kwargs) -> CausalLMModule:
    return CausalLMModule(**{**model_settings("gpt2"), "vocab_size": VOCAB, **kwargs})


def bert(**kwargs) -> MaskedLMModule:
    return MaskedLMModule(**{**model_settings("bert"), "vocab_size": VOCAB, **kwargs})


def clm_batch(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def mlm_batch(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=generator)
    labels = torch.where(torch.rand(batch, seq, generator=generator) < 0.3, ids, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_tiny_presets_are_small():
    for module in (gpt2(), bert()):
        config = module.model.config
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 128, 4)
        assert config.max_position_embeddings == 128 and config._attn_implementation == "sdpa"


def test_causal_loss_equals_transformers_loss():
    module = gpt2().eval()
    batch = clm_batch()
    loss, tokens = module.loss(batch)
    reference = module.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, reference)
    assert tokens.ndim == 0 and tokens == 2 * 15


def test_masked_loss_equals_transformers_loss():
    module = bert().eval()
    batch = mlm_batch()
    loss, tokens = module.loss(batch)
    reference = module.model(**batch).loss
    torch.testing.assert_close(loss, reference)
    assert tokens.ndim == 0 and tokens == int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("build, plain", [(gpt2, GPT2LMHeadModel), (bert, BertForMaskedLM)])
def test_lm_loss_adds_no_state_dict_key(build, plain):
    module = build()
    assert isinstance(module.model.lm_loss, LMHeadLoss)
    assert list(module.model.state_dict()) == list(plain(module.model.config).state_dict())
    assert not any(name.startswith("lm_loss") for name, _ in module.model.named_parameters())


def test_lm_loss_can_be_swapped_for_the_fused_op():
    module = gpt2().eval()
    batch = clm_batch()
    expected, _ = module.loss(batch)
    module.model.lm_loss = FusedLinearCrossEntropy(chunk_size=7)
    fused, _ = module.loss(batch)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_size_presets_and_config_overrides():
    gpt2_sizes, bert_sizes = model_settings("gpt2")["sizes"], model_settings("bert")["sizes"]
    assert set(gpt2_sizes) == {"tiny", "base", "medium"} and set(bert_sizes) == {"tiny", "base", "large"}
    assert GPT2Config(**preset_config("medium", gpt2_sizes)).n_layer == 24
    assert BertConfig(**preset_config("base", bert_sizes)).hidden_size == 768
    assert gpt2(config={"n_layer": 1}).model.config.n_layer == 1
    with pytest.raises(RecipeError, match="valid: tiny, base, medium"):
        gpt2(size="huge")


def test_sequence_length_is_checked_against_positions():
    module = gpt2()
    module.check_sequence_length(128)
    with pytest.raises(RecipeError, match="data.seq_len=256"):
        module.check_sequence_length(256)


class _FakeTrainer:
    estimated_stepping_batches = 100


def test_warmup_then_cosine_to_min_lr(monkeypatch):
    module = gpt2(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    monkeypatch.setattr(CausalLMModule, "trainer", _FakeTrainer(), raising=False)
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(5e-4)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


def train_three_steps(module) -> torch.optim.Optimizer:
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    for _ in range(3):
        module.loss(clm_batch())[0].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer


def test_adamw_is_fused_on_cpu_unless_turned_off_and_trains_alike(monkeypatch):
    monkeypatch.setattr(CausalLMModule, "trainer", _FakeTrainer(), raising=False)
    modules = {}
    for setting in (None, False):
        torch.manual_seed(0)
        modules[setting] = gpt2(fused_adamw=setting, config={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
        initial = modules[setting].model.transformer.h[0].mlp.c_fc.weight.detach().clone()
        assert bool(train_three_steps(modules[setting]).defaults["fused"]) is (setting is None)
    for fused, foreach in zip(modules[None].parameters(), modules[False].parameters()):
        torch.testing.assert_close(fused, foreach)
    assert not torch.equal(modules[None].model.transformer.h[0].mlp.c_fc.weight, initial)


@pytest.mark.parametrize("build, plain, batch", [(gpt2, GPT2LMHeadModel, clm_batch), (bert, BertForMaskedLM, mlm_batch)])
def test_export_loads_with_plain_transformers_and_as_pretrained_path(tmp_path, build, plain, batch):
    module = build().eval()
    export_pretrained(module.model, tmp_path)
    loaded = plain.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    torch.testing.assert_close(loaded(**inputs).logits, module.model(**inputs).logits)
    reloaded = build(pretrained_path=str(tmp_path))
    assert reloaded.model.training, "a pretrained model trains with dropout on"
    reloaded.eval()
    torch.testing.assert_close(reloaded.loss(batch())[0], module.loss(batch())[0])


def test_pretrained_path_must_be_a_model_directory(tmp_path):
    with pytest.raises(RecipeError, match="config.json"):
        gpt2(pretrained_path=str(tmp_path))


def _one_step_trainer(tmp_path, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _clm_loader():
    return torch.utils.data.DataLoader([clm_batch(batch=1)[k] for k in ("input_ids",)] * 2, batch_size=None,
                                       collate_fn=lambda ids: {"input_ids": ids, "labels": ids})


def test_mixed_precision_with_clipping_trains_with_the_foreach_adamw(tmp_path):
    module = gpt2()
    trainer = _one_step_trainer(tmp_path, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(module, _clm_loader())
    assert trainer.global_step == 1 and not trainer.optimizers[0].defaults["fused"]
    with pytest.raises(RecipeError, match="model.fused_adamw=true cannot be combined with trainer.gradient_clip_val=1.0"):
        _one_step_trainer(tmp_path, precision="bf16-mixed", gradient_clip_val=1.0).fit(gpt2(fused_adamw=True), _clm_loader())


def test_resumed_optimizer_takes_this_runs_kernel(monkeypatch):
    monkeypatch.setattr(CausalLMModule, "trainer", _FakeTrainer(), raising=False)
    saved = train_three_steps(gpt2(fused_adamw=False)).state_dict()
    resumed = gpt2().configure_optimizers()["optimizer"]
    resumed.load_state_dict(saved)
    assert all(group["fused"] and not group["foreach"] for group in resumed.param_groups)
