"""ScheduleCallback in real (tiny, CPU) Lightning runs: training with the shipped schedules and
first-batch verification, the pass that breaks equivalence named, idempotence across stages,
networks built in configure_model, checkpoints that keep their keys and refuse to resume under
another schedule, and strategies it cannot support."""
from __future__ import annotations

import copy
import json
import logging
import re
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

import slapo_lightning as slapo
from slapo_lightning.errors import CheckpointMismatchError, ScheduleError, SpecError, VerificationError
from slapo_lightning.lightning import CausalLMModule, MaskedLMModule
from slapo_lightning.op import FlashAttentionOp, FusedLinearCrossEntropy, FusedQKV
from slapo_lightning.spec import Match, register_op_factory
from slapo_lightning.tolerances import DEFAULT_RTOL

import tiny_models as fx


def bert_module(impl: str = "sdpa", seed: int = 0) -> MaskedLMModule:
    torch.manual_seed(seed)
    return MaskedLMModule(sizes=fx.BERT_SIZES, vocab_size=fx.VOCAB, attn_implementation=impl, warmup_steps=1)


def gpt2_module(impl: str = "sdpa", seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(sizes=fx.GPT2_SIZES, vocab_size=fx.VOCAB, attn_implementation=impl, warmup_steps=1,
                          token_ids={"bos_token_id": 0, "eos_token_id": 0})


def loader(mlm: bool, n: int = 3) -> DataLoader:
    return DataLoader(fx.training_batches(n, mlm), batch_size=None)


def trainer(root, callbacks, max_steps: int = 3, **kwargs) -> pl.Trainer:
    settings = dict(max_steps=max_steps, accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                    num_sanity_val_steps=0)
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def optimizer_parameters(t: pl.Trainer) -> set[int]:
    return {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name, impl", [("bert", "sdpa"), ("gpt2", "eager")])
def test_trains_with_the_shipped_schedule_verified_on_the_first_batch(tmp_path, name, impl):
    module = bert_module(impl) if name == "bert" else gpt2_module(impl)
    callback = slapo.ScheduleCallback(fx.MODELS[name][1], verify="first_batch", print_report=False)
    t = trainer(tmp_path, [callback])
    t.fit(module, loader(mlm=name == "bert"))
    assert t.global_step == 3
    assert optimizer_parameters(t) == {id(p) for p in module.parameters()}
    assert count(module.model, FlashAttentionOp) == fx.LAYERS
    assert isinstance(module.model.lm_loss, FusedLinearCrossEntropy)
    if name == "bert":
        assert count(module.model, FusedQKV) == fx.LAYERS
        fused = {id(p) for m in module.model.modules() if isinstance(m, FusedQKV) for p in m.parameters()}
        assert fused <= optimizer_parameters(t)
    saved = json.loads((tmp_path / "schedule_report.json").read_text())
    assert saved["fingerprint"] == callback.fingerprint and "fused_cross_entropy" in callback.report.applied


class ScaledBiasGELU(nn.Module):
    """A deliberately wrong op: gelu(x + bias) * 1.5."""

    def forward(self, x, bias):
        return F.gelu(x + bias) * 1.5


def wrong_gelu(match: Match) -> nn.Module:
    return ScaledBiasGELU()


def test_verification_stops_before_training_and_names_the_pass(tmp_path):
    register_op_factory("test_wrong_gelu", wrong_gelu, overwrite=True)
    spec = OmegaConf.to_container(OmegaConf.load(fx.BERT_SPEC))
    spec["passes"]["bias_gelu"]["steps"][-1]["replace"]["op"] = "test_wrong_gelu"
    module = bert_module()
    callback = slapo.ScheduleCallback(spec, verify="first_batch", print_report=False)
    t = trainer(tmp_path, [callback])
    with pytest.raises(VerificationError) as info:
        t.fit(module, loader(mlm=True))
    message = str(info.value)
    assert "schedule pass 'bias_gelu' breaks equivalence" in message and "max abs error" in message
    assert t.global_step == 0


class OtherRankFailed(pl.strategies.SingleDeviceStrategy):
    """A single process that reports, like a DDP peer would, that another rank's verification failed."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.decisions = []

    def reduce_boolean_decision(self, decision, all=True):
        self.decisions.append((decision, all))
        return True


def test_a_failure_on_another_rank_stops_this_rank_too(tmp_path):
    strategy = OtherRankFailed()
    t = trainer(tmp_path, [slapo.ScheduleCallback(fx.BERT_SPEC, verify="first_batch", print_report=False)],
                strategy=strategy)
    with pytest.raises(VerificationError, match="first-batch verification of 'model' failed on another rank"):
        t.fit(bert_module(), loader(mlm=True))
    assert strategy.decisions == [(False, False)] and t.global_step == 0


def test_a_failing_rank_raises_its_own_error_after_the_ranks_agree(tmp_path):
    register_op_factory("test_wrong_gelu", wrong_gelu, overwrite=True)
    spec = OmegaConf.to_container(OmegaConf.load(fx.BERT_SPEC))
    spec["passes"]["bias_gelu"]["steps"][-1]["replace"]["op"] = "test_wrong_gelu"
    strategy = OtherRankFailed()
    t = trainer(tmp_path, [slapo.ScheduleCallback(spec, verify="first_batch", print_report=False)], strategy=strategy)
    with pytest.raises(VerificationError, match="schedule pass 'bias_gelu' breaks equivalence"):
        t.fit(bert_module(), loader(mlm=True))
    assert strategy.decisions == [(True, False)]


def test_applied_once_across_fit_validate_and_test(tmp_path):
    module = bert_module()
    callback = slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)
    t = trainer(tmp_path, [callback], max_steps=1)
    t.fit(module, loader(mlm=True, n=1))
    report, qkv = callback.report, module.model.bert.encoder.layer[0].attention.self.FusedQKV_0
    t.validate(module, loader(mlm=True, n=1), verbose=False)
    callback.setup(t, module, "test")
    assert callback.report is report and module.model.bert.encoder.layer[0].attention.self.FusedQKV_0 is qkv
    assert count(module.model, FusedQKV) == fx.LAYERS


class LazyBert(pl.LightningModule):
    """Builds its network in configure_model (which Lightning calls after callbacks' setup)."""

    def __init__(self):
        super().__init__()
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = fx.bert()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_network_built_in_configure_model_is_scheduled(tmp_path):
    module = LazyBert()
    t = trainer(tmp_path, [slapo.ScheduleCallback(fx.BERT_SPEC, verify="first_batch", print_report=False)],
                max_steps=2)
    t.fit(module, loader(mlm=True, n=2))
    assert count(module.model, FusedQKV) == fx.LAYERS
    assert optimizer_parameters(t) == {id(p) for p in module.parameters()}


class Holder(pl.LightningModule):
    """Holds a network under another name and has no configure_model."""

    def __init__(self):
        super().__init__()
        self.net = fx.bert()


def test_missing_target_is_named():
    callback = slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)
    stub = SimpleNamespace(strategy=pl.strategies.SingleDeviceStrategy(torch.device("cpu")))
    with pytest.raises(ScheduleError, match=r"Holder has no module 'model' and no configure_model .* children: net"):
        callback.setup(stub, Holder(), "fit")


# -- checkpoints -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny BERT trained 2 steps under the shipped schedule."""
    root = tmp_path_factory.mktemp("ckpt")
    module = bert_module()
    t = trainer(root, [slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)], max_steps=2)
    t.fit(module, loader(mlm=True, n=2))
    path = root / "scheduled.ckpt"
    t.save_checkpoint(path)
    return path, {k: v.clone() for k, v in module.state_dict().items()}


def test_checkpoint_keys_are_the_plain_models(bert_checkpoint, tmp_path):
    path, trained = bert_checkpoint
    state = torch.load(path, weights_only=False)["state_dict"]
    plain = bert_module(seed=5)
    plain.load_state_dict(state, strict=True)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in trained.items())
    scheduled = bert_module(seed=6)
    slapo.apply_schedule(scheduled.model, fx.BERT_SPEC)
    scheduled.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(scheduled.state_dict()[k], v) for k, v in trained.items())


def test_resuming_under_the_same_schedule_continues(bert_checkpoint, tmp_path):
    path, _ = bert_checkpoint
    t = trainer(tmp_path, [slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)], max_steps=3)
    t.fit(bert_module(seed=7), loader(mlm=True, n=3), ckpt_path=path)
    assert t.global_step == 3


def test_resuming_under_another_schedule_is_refused(bert_checkpoint, tmp_path):
    path, _ = bert_checkpoint
    other = OmegaConf.merge(OmegaConf.load(fx.BERT_SPEC), OmegaConf.from_dotlist(["passes.flash_attention.enabled=false"]))
    t = trainer(tmp_path, [slapo.ScheduleCallback(other, print_report=False)], max_steps=3)
    with pytest.raises(CheckpointMismatchError) as info:
        t.fit(bert_module(seed=8), loader(mlm=True, n=3), ckpt_path=path)
    message = str(info.value)
    assert str(path) in message and "different schedule" in message
    assert "passes only in the checkpoint: flash_attention" in message
    assert t.global_step == 0
    unscheduled = trainer(tmp_path, [], max_steps=3)
    plain_path = tmp_path / "plain.ckpt"
    unscheduled.fit(bert_module(seed=9), loader(mlm=True, n=1), ckpt_path=None)
    unscheduled.save_checkpoint(plain_path)
    t = trainer(tmp_path, [slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)], max_steps=3)
    with pytest.raises(CheckpointMismatchError, match="saved without a schedule for 'model'"):
        t.fit(bert_module(seed=10), loader(mlm=True, n=3), ckpt_path=plain_path)


def test_weights_load_under_another_schedule_for_evaluation(bert_checkpoint, tmp_path):
    path, _ = bert_checkpoint
    other = OmegaConf.merge(OmegaConf.load(fx.BERT_SPEC), OmegaConf.from_dotlist(["passes.fused_qkv.enabled=false"]))
    scheduled = bert_module(seed=11)
    t = trainer(tmp_path, [slapo.ScheduleCallback(other, print_report=False)])
    metrics = t.validate(scheduled, loader(mlm=True, n=2), ckpt_path=path, verbose=False)
    assert count(scheduled.model, FlashAttentionOp) == fx.LAYERS and count(scheduled.model, FusedQKV) == 0
    plain = bert_module(seed=12)
    expected = trainer(tmp_path, []).validate(plain, loader(mlm=True, n=2), ckpt_path=path, verbose=False)
    assert count(plain.model, FlashAttentionOp) == 0
    torch.testing.assert_close(torch.tensor(metrics[0]["val/loss"]), torch.tensor(expected[0]["val/loss"]),
                               rtol=1e-4, atol=1e-5)
    batch = fx.training_batches(1, True)[0]
    scheduled.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(scheduled.model(**batch).logits, plain.model(**batch).logits, rtol=1e-4, atol=1e-5)


# -- configuration errors --------------------------------------------------------------------------------

def test_sharded_and_unknown_strategies_are_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    callback = slapo.ScheduleCallback(fx.BERT_SPEC, print_report=False)
    module = bert_module()
    with pytest.raises(ScheduleError, match="does not support FSDPStrategy: Lightning.s FSDPStrategy is FSDP1.*use ModelParallelStrategy"):
        callback.setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")
    deepspeed = type("DeepSpeedStrategy", (DDPStrategy,), {})()
    with pytest.raises(ScheduleError, match="does not support DeepSpeedStrategy"):
        callback.setup(SimpleNamespace(strategy=deepspeed), module, "fit")
    assert count(module.model, FusedQKV) == 0


def test_bad_spec_or_mode_fails_when_the_callback_is_built():
    with pytest.raises(SpecError, match="unknown primitive 'replce'"):
        slapo.ScheduleCallback({"passes": {"x": {"steps": [{"replce": {}}]}}})
    with pytest.raises(ScheduleError, match="verify='always' is not supported; valid: false, 'first_batch' \\(or true, the same\\)"):
        slapo.ScheduleCallback(fx.BERT_SPEC, verify="always")


def test_built_by_hydra_and_traced_with_example_input_array(tmp_path):
    callback = instantiate({"_target_": "slapo_lightning.ScheduleCallback", "schedule": OmegaConf.load(fx.GPT2_SPEC),
                            "target": "model", "verify": False, "print_report": False,
                            "report_path": str(tmp_path / "report.json")})
    module = gpt2_module("sdpa")
    module.example_input_array = fx.inputs(padded=True)
    t = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    callback.setup(t, module, "fit")
    assert (tmp_path / "report.json").is_file()
    attn = module.model.transformer.h[0].attn
    # the padded example_input_array is the first specialisation (mask given: not causal); setup also
    # built the unpadded variant (no mask: sdpa's is_causal)
    first, *others = attn.specialisations
    assert "attention_mask=tensor" in first.label and others
    assert {op.apply_causal_mask for op in module.model.modules() if isinstance(op, FlashAttentionOp)} == {False, True}


def test_a_passing_verification_says_what_it_checked_and_by_how_much(tmp_path, caplog):
    module = gpt2_module("sdpa")
    callback = slapo.ScheduleCallback(fx.GPT2_SPEC, verify="first_batch", print_report=False)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [callback]).fit(module, loader(mlm=False))
    (line,) = [r.getMessage() for r in caplog.records if "first-batch verification" in r.getMessage()]
    assert "of 'model' passed on batch 0 (schedule flash_attention, fused_mlp" in line
    assert f"parameter gradient(s) equal the unscheduled model's within rtol={DEFAULT_RTOL:g}" in line
    worst = re.search(r"worst relative error: output ([0-9.e+-]+); gradients ([0-9.e+-]+) \(worst: (\S+)\)", line)
    assert worst, line
    assert float(worst.group(1)) < DEFAULT_RTOL and float(worst.group(2)) < 10 * DEFAULT_RTOL
    assert worst.group(3).startswith("model.transformer.") or worst.group(3).startswith("model.lm_head")


def test_relative_errors_are_abs_errors_over_the_original_scale():
    from slapo_lightning.spec import ScheduleSpec, verify_schedule

    torch.manual_seed(0)
    original = nn.Linear(4, 3)
    scheduled = copy.deepcopy(original)
    with torch.no_grad():
        scheduled.bias += 1e-3
    x = torch.randn(5, 4) * 100
    relative: dict = {}
    errors = verify_schedule(original, scheduled, ScheduleSpec(), (x,), relative=relative, rtol=1e-2, atol=1e-2)
    assert set(relative) == set(errors) == {"output", "grad weight", "grad bias"}
    scale = original(x).abs().max().item()
    assert errors["output"] == pytest.approx(1e-3, rel=1e-2)
    assert relative["output"] == pytest.approx(errors["output"] / scale)
    assert relative["grad weight"] == 0.0 and relative["grad bias"] == 0.0
