"""apply_schedule with the shipped specs: numerically equivalent models (outputs and gradients),
original state_dict keys, checkpoints that move both ways, Hydra-style overrides, user-defined
patterns/ops/pass functions, and the report."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import slapo_lightning as slapo
from slapo_lightning.core import TracedModule
from slapo_lightning.op import (FastDropout, FlashAttentionOp, FusedBiasDropoutAddLayerNorm, FusedBiasGELU, FusedMLP,
                                FusedQKV)
from slapo_lightning.report import Report
from slapo_lightning.spec import Match, load_spec, register_op_factory

import tiny_models as fx


def modules_of(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def modules_calling_in_every_variant(model: nn.Module, cls: type) -> int:
    """Traced modules with a ``cls`` child that every specialisation calls (and no other kind)."""
    holders = [m for m in model.modules() if isinstance(m, TracedModule) and any(isinstance(c, cls) for c in m.children())]
    for holder in holders:
        assert len(holder.specialisations) >= 1
        for spec in holder.specialisations:
            called = [n for n in spec.graph.nodes if n.op == "call_module" and isinstance(holder.get_submodule(n.target), cls)]
            assert called, f"{spec.label} does not call {cls.__name__}"
    return len(holders)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_shipped_spec_is_numerically_equivalent(name, impl, padded):
    build, spec = fx.MODELS[name]
    model = build(impl)
    original = copy.deepcopy(model)
    batch = fx.inputs(padded)
    keys = list(model.state_dict())
    report = slapo.apply_schedule(model, spec, example_inputs=batch)
    slapo.verify(original, model, batch, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys
    assert modules_calling_in_every_variant(model, FlashAttentionOp) == fx.LAYERS
    if name == "bert":
        assert report.applied == ["fused_qkv", "flash_attention", "bias_gelu", "bias_dropout_add_layer_norm",
                                  "fast_dropout"]
        assert len(modules_of(model, FusedQKV)) == fx.LAYERS and len(modules_of(model, FusedBiasGELU)) == fx.LAYERS
        assert len(modules_of(model, FusedBiasDropoutAddLayerNorm)) == 2 * fx.LAYERS
    else:
        assert report.applied == ["flash_attention", "fused_mlp", "fast_dropout"]
        assert len(modules_of(model, FastDropout)) == fx.LAYERS + 1
        assert len(modules_of(model, FusedMLP)) == fx.LAYERS
        causal = {op.apply_causal_mask for op in modules_of(model, FlashAttentionOp)}
        # sdpa's is_causal is kept where HF sets it (no mask needed: one variant); eager's mask holds causality
        assert causal == ({True, False} if impl == "sdpa" else {False})


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_checkpoints_move_both_ways_with_strict_loading(name):
    build, spec = fx.MODELS[name]
    scheduled, plain = build(seed=0), build(seed=1)
    slapo.apply_schedule(scheduled, spec)
    plain.load_state_dict(scheduled.state_dict(), strict=True)
    batch = fx.inputs()
    slapo.verify(plain, scheduled, batch, rtol=1e-4, atol=1e-5)
    other = build(seed=2)
    scheduled.load_state_dict(other.state_dict(), strict=True)
    slapo.verify(other, scheduled, batch, rtol=1e-4, atol=1e-5)
    for key, value in other.state_dict().items():
        assert torch.equal(scheduled.state_dict()[key], value), key


def test_checkpointing_pass_keeps_numbers_and_keys():
    model = fx.bert()
    original = copy.deepcopy(model)
    data = OmegaConf.merge(OmegaConf.load(fx.BERT_SPEC), OmegaConf.from_dotlist(["passes.checkpoint.enabled=true"]))
    batch = fx.inputs(padded=True)
    report = slapo.apply_schedule(model, data, example_inputs=batch)
    assert report.applied[-1] == "checkpoint"
    assert type(model.bert.encoder.layer[0]).__name__ == "CheckpointWrapper"
    assert list(model.state_dict()) == list(original.state_dict())
    slapo.verify(original, model, batch, rtol=1e-4, atol=1e-5)


def test_hydra_overrides_toggle_passes_and_set_the_backend():
    data = OmegaConf.merge(OmegaConf.load(fx.BERT_SPEC), OmegaConf.from_dotlist(
        ["passes.fused_qkv.enabled=false", "passes.flash_attention.backend=math"]))
    model = fx.bert()
    report = slapo.apply_schedule(model, data)
    assert "fused_qkv" not in report.applied and report["fused_qkv"].status == "disabled"
    assert not modules_of(model, FusedQKV)
    assert {op.backend_name for op in modules_of(model, FlashAttentionOp)} == {"math"}
    base = load_spec(fx.BERT_SPEC)
    assert load_spec(data).fingerprint() != base.fingerprint()
    assert load_spec(OmegaConf.load(fx.BERT_SPEC)).fingerprint() == base.fingerprint()


def test_fingerprint_ignores_defaults_and_disabled_passes():
    steps = [{"trace": {}}, {"replace": {"pattern": "qkv_linears", "op": "fused_qkv"}}]
    explicit = [{"trace": {"flatten": False, "leaves": None}}, steps[1]]
    a = load_spec({"passes": {"q": {"select": "x", "steps": steps}, "off": {"enabled": False, "steps": steps}}})
    b = load_spec({"passes": {"q": {"select": "x", "steps": explicit}}})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_spec({"passes": {"q": {"select": "y", "steps": steps}}}).fingerprint()


def test_report_lists_changes_and_round_trips_through_json(tmp_path):
    model = fx.bert()
    report = slapo.apply_schedule(model, fx.BERT_SPEC)
    qkv = report["fused_qkv"].changes[0]
    assert qkv.path == "bert.encoder.layer.0.attention.self"
    assert qkv.class_before == "BertSelfAttention" and qkv.class_after == "BertSelfAttention (traced)"
    assert qkv.params_added == ["FusedQKV_0.fused_linear.bias", "FusedQKV_0.fused_linear.weight"]
    assert qkv.params_removed == ["key.bias", "key.weight", "query.bias", "query.weight", "value.bias", "value.weight"]
    assert qkv.state_keys_added == qkv.state_keys_removed == []
    assert qkv.new_modules == {"FusedQKV_0": "FusedQKV"} and qkv.steps[1].matches == 1
    ln = report["bias_dropout_add_layer_norm"].changes[0]
    assert ln.params_added == ln.params_removed == [] and ln.state_keys_added == []
    skipped = report["fused_cross_entropy"]
    assert skipped.status == "skipped" and report["checkpoint"].status == "disabled"
    rows = report.rows()
    assert ("tensor_parallel", "bert.encoder.layer.* (x2)") == rows[0][:2] and "no device mesh" in rows[0][3]
    assert ("fused_qkv", "bert.encoder.layer.*.attention.self (x2)") == rows[1][:2]
    assert ("checkpoint", "", "", "disabled", "") in rows
    assert rows[-1][0] == "fsdp_root" and "no device mesh" in rows[-1][3]
    assert "fused_qkv" in report.render(width=200) and "FusedQKV" in report.render(width=200)
    path = report.save(tmp_path / "r" / "schedule_report.json")
    assert Report.load(path) == report and json.loads(path.read_text())["fingerprint"] == report.fingerprint


# -- user extensions ------------------------------------------------------------------------------------

class ScaledGELU(nn.Module):
    """gelu(x + bias) * scale: an op a user brings (scale 1 is exact)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x, bias):
        return F.gelu(x + bias) * self.scale


def scaled_gelu_factory(match: Match, scale: float = 1.0) -> nn.Module:
    assert match.subgraphs and match.module is match.sch.mod
    return ScaledGELU(scale)


def add_one_pass(sch, amount: float = 1.0):
    """A pass function: adds ``amount`` to the dense bias (so its effect is visible)."""
    with torch.no_grad():
        sch["dense"].mod.bias.add_(amount)


def bias_relu(x, bias):
    return F.relu(x + bias)


GELU_STEPS = [{"decompose": {"target": "dense"}}, {"trace": {"flatten": True}}]


@pytest.mark.parametrize("op", ["registered", "import_path", "target_mapping"])
def test_user_ops_by_name_import_path_or_target(op):
    register_op_factory("test_scaled_gelu", scaled_gelu_factory, overwrite=True)
    ref = {"registered": "test_scaled_gelu", "import_path": "test_spec_apply:ScaledGELU",
           "target_mapping": {"_target_": "test_spec_apply.scaled_gelu_factory"}}[op]
    model = fx.bert()
    original = copy.deepcopy(model)
    replace = {"replace": {"pattern": "bias_gelu", "op": ref, "scale": 1.0}}
    slapo.apply_schedule(model, {"passes": {"gelu": {"select": "bert.encoder.layer.*.intermediate",
                                                     "steps": GELU_STEPS + [replace]}}})
    assert len(modules_of(model, ScaledGELU)) == fx.LAYERS
    slapo.verify(original, model, fx.inputs())


def test_user_pattern_by_import_path_and_pass_function_with_parameters():
    model = fx.bert()
    model.config.hidden_act = "relu"
    for layer in model.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = nn.ReLU()
    original = copy.deepcopy(model)
    fuse = {"fuse": {"pattern": "test_spec_apply:bias_relu", "compiler": None, "name": "BiasReLU"}}
    report = slapo.apply_schedule(model, {"passes": {
        "relu": {"select": "bert.encoder.layer.*.intermediate", "steps": GELU_STEPS + [fuse]},
        "bump": {"select": "cls.predictions.transform", "fn": "test_spec_apply:add_one_pass", "amount": 0.5}}})
    assert hasattr(model.bert.encoder.layer[0].intermediate, "BiasReLU_0")
    assert report["bump"].changes[0].steps[0].step == "fn"
    assert torch.allclose(model.cls.predictions.transform.dense.bias, original.cls.predictions.transform.dense.bias + 0.5)
    with torch.no_grad():
        original.cls.predictions.transform.dense.bias.add_(0.5)
    slapo.verify(original, model, fx.inputs())


@pytest.mark.parametrize("compiler", [None, "TorchScript"])
def test_fuse_step(compiler):
    model = fx.bert()
    original = copy.deepcopy(model)
    fuse = {"fuse": {"pattern": "bias_gelu", "compiler": compiler}}
    report = slapo.apply_schedule(model, {"passes": {"gelu": {"select": "bert.encoder.layer.*.intermediate",
                                                              "steps": GELU_STEPS + [fuse]}}})
    assert report["gelu"].matches == 3 * fx.LAYERS
    assert model.bert.encoder.layer[1].intermediate.FusedModule_0.compiler == compiler
    slapo.verify(original, model, fx.inputs(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fuse_step_with_inductor():
    model = fx.bert()
    original = copy.deepcopy(model)
    fuse = {"fuse": {"pattern": "bias_gelu", "compiler": "inductor"}}
    slapo.apply_schedule(model, {"passes": {"gelu": {"select": "bert.encoder.layer.0.intermediate",
                                                     "steps": GELU_STEPS + [fuse]}}})
    slapo.verify(original, model, fx.inputs(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["bert", "gpt2"])
def test_shipped_specs_toggle_and_configure_from_the_hydra_command_line(recipe):
    from hydra import compose, initialize_config_module

    overrides = [f"recipe={recipe}", "schedule.passes.flash_attention.backend=sdpa",
                 "schedule.passes.checkpoint.enabled=true"]
    passes = OmegaConf.load(fx.MODELS[recipe][1]).passes
    overrides += [f"schedule.passes.{name}.enabled=false" for name in passes if name not in ("flash_attention", "checkpoint")]
    with initialize_config_module("slapo_lightning.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    spec = load_spec(cfg.schedule)
    assert [p.name for p in spec.enabled] == ["flash_attention", "checkpoint"]
    assert spec["flash_attention"].steps[-1].args["backend"] == "sdpa"

    model = fx.MODELS[recipe][0]()
    before = Counter(type(m).__name__ for m in model.modules())
    report = slapo.apply_schedule(model, cfg.schedule, fx.inputs())
    assert report.applied == ["flash_attention", "checkpoint"]
    assert all(report[name].status == "disabled" and not report[name].changes
               for name in passes if name not in ("flash_attention", "checkpoint"))
    after = Counter(type(m).__name__ for m in model.modules())
    # the two enabled passes added their modules; the disabled ones added (or replaced) nothing
    # (GPT-2 on sdpa: one causal op for unpadded batches and one taking the mask, per layer)
    per_layer = 2 if recipe == "gpt2" else 1
    assert after - before == Counter({"FlashAttentionOp": per_layer * fx.LAYERS, "CheckpointWrapper": fx.LAYERS})
    assert not before - after
    assert {m.backend_name for m in model.modules() if isinstance(m, FlashAttentionOp)} == {"sdpa"}


def test_fingerprint_fills_in_op_defaults():
    def attention(**args):
        return {"passes": {"a": {"select": "x", "steps": [{"replace": {"pattern": "attention", "op": "flash_attention",
                                                                      **args}}]}}}

    assert load_spec(attention()).fingerprint() == load_spec(attention(backend="auto", causal="auto")).fingerprint()
    assert load_spec(attention()).fingerprint() != load_spec(attention(backend="sdpa")).fingerprint()


def test_verify_schedule_names_the_pass_for_plain_pytorch_users():
    from slapo_lightning.errors import VerificationError
    from slapo_lightning.spec import verify_schedule

    register_op_factory("test_doubled_gelu", lambda match: ScaledGELU(2.0), overwrite=True)
    data = OmegaConf.to_container(OmegaConf.load(fx.BERT_SPEC))
    data["passes"]["bias_gelu"]["steps"][-1]["replace"]["op"] = "test_doubled_gelu"
    model = fx.bert()
    original = copy.deepcopy(model)
    slapo.apply_schedule(model, data)
    with pytest.raises(VerificationError, match="schedule pass 'bias_gelu' breaks equivalence"):
        verify_schedule(original, model, load_spec(data), fx.inputs())


def test_every_kept_key_resolves_by_attribute_access_as_distributed_checkpoints_resolve_keys():
    """torch.distributed.checkpoint finds each state_dict key by getattr through the module tree;
    keys kept by hooks (fused q/k/v, renamed norms) get placeholder paths that add no key."""
    import functools

    import decoder_models

    from slapo_lightning.core.state_keys import KeyPath

    model = decoder_models.build("llama", "sdpa")
    plain = sorted(model.state_dict())
    report = slapo.apply_schedule(model, "auto")
    assert {"fused_qkv", "rms_norm", "gated_mlp"} <= set(report.applied)
    assert sorted(model.state_dict()) == plain
    for key in plain:
        functools.reduce(getattr, key.split("."), model)
    assert not any(isinstance(m, KeyPath) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, KeyPath), "q_proj now lives in the fused op"
