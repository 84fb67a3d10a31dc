"""What a run shows first: step progress on max_steps runs, a summary whose FLOPs are measured or
absent, FLOPs per batch for the ThroughputMonitor and MFU against a configurable peak."""
from __future__ import annotations

import io
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import rich
import torch
from rich.console import Console
from torch.utils.data import DataLoader

import tiny_models as fx
from slapo_lightning.lightning import CausalLMModule, MaskedLMModule, ModelSummary, StepProgressBar, ThroughputMonitor
from slapo_lightning.errors import RecipeError


def bar_for(max_epochs, max_steps, global_step=0, batches=50):
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, global_step=global_step,
                                   num_training_batches=batches)
    return bar


def test_step_limited_runs_show_the_epoch_and_the_runs_steps():
    bar = bar_for(max_epochs=-1, max_steps=300, global_step=120)
    assert bar._get_train_description(2).strip() == "Epoch 2 · steps"
    assert "/-2" not in bar._get_train_description(1)
    assert bar.total_train_batches == 300


def test_epoch_limited_runs_show_epoch_of_epochs_and_the_epochs_batches():
    bar = bar_for(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(0).strip() == "Epoch 0/2"
    assert bar.total_train_batches == 50


def gpt2_module() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(sizes=fx.GPT2_SIZES, vocab_size=fx.VOCAB, token_ids={"bos_token_id": 0, "eos_token_id": 0})


def test_flops_are_measured_forward_and_backward_and_follow_the_batch():
    module = gpt2_module()
    example = fx.training_batches(1, mlm=False, batch=1)[0]
    per_batch = module.measure_flops(example, batch_size=4)
    train, val = module.flops_per_row["train"], module.flops_per_row["val"]
    assert 2.5 < train / val < 3.5, (train, val)  # a backward pass costs about two forwards
    assert per_batch == round(4 * train)
    params = sum(p.numel() for p in module.parameters())
    assert val > 2 * (params - fx.VOCAB * fx.HIDDEN - 2 * fx.SEQ * fx.HIDDEN) * fx.SEQ  # 2 FLOPs per weight and token
    assert all(p.grad is None for p in module.parameters()), "measuring leaves no gradients behind"
    batch = fx.training_batches(1, mlm=False, batch=3)[0]
    module.training_step(batch, 0)
    assert module.flops_per_batch == round(3 * train)


def test_masked_lm_flops_count_only_the_predicted_positions():
    torch.manual_seed(0)
    module = MaskedLMModule(sizes=fx.BERT_SIZES, vocab_size=fx.VOCAB)
    example = fx.training_batches(1, mlm=True, batch=1)[0]
    fewer = dict(example, labels=example["labels"].masked_fill(torch.arange(fx.SEQ) >= 5, -100))
    assert module.measure_flops(fewer, 1) < module.measure_flops(example, 1)


def printed_summary(module, monkeypatch) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(rich, "get_console", lambda: Console(file=buffer, width=120))
    trainer = SimpleNamespace(is_global_zero=True, strategy=None)
    summary = ModelSummary(max_depth=1)
    monkeypatch.setattr(summary, "_summary", lambda t, m: __import__(
        "lightning.pytorch.utilities.model_summary", fromlist=["summarize"]).summarize(m, max_depth=1))
    summary.on_fit_start(trainer, module)
    return buffer.getvalue()


def test_the_summary_shows_measured_flops_or_none(monkeypatch):
    module = gpt2_module()
    text = printed_summary(module, monkeypatch)
    assert "FLOPs" not in text and "Total params" in text
    module.measure_flops(fx.training_batches(1, mlm=False, batch=1)[0], batch_size=16)
    text = printed_summary(module, monkeypatch)
    assert "Training FLOPs per batch (measured, forward + backward):" in text
    assert "Total FLOPs: 0" not in text


def test_mfu_is_measured_against_the_configured_peak(tmp_path):
    module = gpt2_module()
    module.measure_flops(fx.training_batches(1, mlm=False, batch=1)[0], batch_size=4)
    monitor = ThroughputMonitor(peak_flops=1e9, window_size=2)
    logged = []

    class Capture(pl.loggers.Logger):
        name, version = "capture", "0"

        def log_metrics(self, metrics, step=None):
            logged.append(metrics)

        def log_hyperparams(self, *args, **kwargs):
            pass

    batches = fx.training_batches(4, mlm=False, batch=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=Capture(), log_every_n_steps=1, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert monitor.available_flops == 10**9
    mfu = [m["train/device/mfu"] for m in logged if "train/device/mfu" in m]
    flops = [m["train/device/flops_per_sec"] for m in logged if "train/device/flops_per_sec" in m]
    assert mfu and mfu[-1] == pytest.approx(flops[-1] / 1e9)


def test_a_peak_that_is_not_a_positive_number_is_refused():
    with pytest.raises(RecipeError, match="peak_flops=0"):
        ThroughputMonitor(peak_flops=0)
