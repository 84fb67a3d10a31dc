"""One op registry: every op class builds itself from a match (``from_match``), reading its
hyper-parameters from the matched modules, whichever way a spec names it (CPU, float32; outputs
of the scheduled modules to atol/rtol 1e-6)."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import slapo_lightning.op as op
from slapo_lightning import apply_schedule, create_schedule
from slapo_lightning.errors import ScheduleError
from slapo_lightning.op import OPS, FastDropout, FusedLinearCrossEntropy, GatedMLP, RMSNorm
from slapo_lightning.spec import OP_FACTORIES, Match, op_names, register_op_factory

TOL = dict(atol=1e-6, rtol=1e-6)


def test_every_registered_op_class_builds_itself_from_a_match():
    classes = [obj for _, obj in OPS.items() if isinstance(obj, type) and obj.__module__.startswith("slapo_lightning.op")]
    assert {cls.__name__ for cls in classes} >= {
        "FastDropout", "FlashAttentionOp", "FusedBiasDropoutAddLayerNorm", "FusedBiasGELU", "FusedLinearCrossEntropy",
        "FusedMLP", "FusedQKV", "LinearWithSeparateBias", "RMSNorm", "GatedMLP", "FusedRoPE"}
    for cls in classes:
        assert inspect.ismethod(cls.from_match), cls


def test_one_registry():
    assert OP_FACTORIES is OPS and op_names() == op.list_ops()

    def factory(match):
        return nn.Identity()

    register_op_factory("test_one_registry_identity", factory, overwrite=True)
    assert OPS.get("test_one_registry_identity") is factory and "test_one_registry_identity" in op.list_ops()


@pytest.mark.parametrize("ref", ["fast_dropout", "slapo_lightning.op:FastDropout", {"_target_": "slapo_lightning.op.FastDropout"}])
def test_fast_dropout_takes_the_models_p_however_it_is_named(ref):
    """Built as ``FastDropout()`` an import path would get the default p=0.5; from_match reads 0.1."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    apply_schedule(model, {"passes": {"drop": {"select": "1", "steps": [{"replace": {"op": ref}}]}}})
    assert isinstance(model[1], FastDropout) and model[1].p == 0.1


def llama_layer():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=3e-5)
    return LlamaDecoderLayer(config, layer_idx=0).eval()


def test_rms_norm_and_gated_mlp_through_a_spec_keep_weights_keys_and_numbers():
    layer = llama_layer()
    x = torch.randn(2, 5, 16)
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    want = mlp(norm(x))
    keys = list(layer.state_dict())
    spec = {"passes": {
        "norm": {"select": "post_attention_layernorm", "steps": [{"replace": {"op": "rms_norm"}}]},
        "mlp": {"select": "mlp", "steps": [{"replace": {"op": "gated_mlp"}}]},
    }}
    apply_schedule(layer, spec)
    assert isinstance(layer.post_attention_layernorm, RMSNorm) and isinstance(layer.mlp, GatedMLP)
    assert layer.post_attention_layernorm.weight is norm.weight and layer.post_attention_layernorm.eps == 3e-5
    assert layer.mlp.gate_proj is mlp.gate_proj
    assert list(layer.state_dict()) == keys
    torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(x)), want, **TOL)


def test_ops_refuse_modules_they_do_not_reproduce():
    layer = llama_layer()
    spec = {"passes": {"mlp": {"select": "self_attn.q_proj", "steps": [{"replace": {"op": "gated_mlp"}}]}}}
    with pytest.raises(ScheduleError, match="is not a gated MLP this op knows"):
        apply_schedule(layer, spec)
    spec = {"passes": {"norm": {"select": "mlp.down_proj", "steps": [{"replace": {"op": "rms_norm"}}]}}}
    with pytest.raises(ScheduleError, match="no numeric 'variance_epsilon' or 'eps'"):
        apply_schedule(layer, spec)


class Head(nn.Module):
    """A loss module with the fused op's call signature, on a model whose config caps logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, hidden_states, weight, labels, bias=None):
        raise NotImplementedError


@pytest.mark.parametrize("config, cap", [(Gemma2Config(final_logit_softcapping=5.0), 5.0), (LlamaConfig(), None)])
def test_cross_entropy_reads_the_soft_cap_from_the_config(config, cap):
    built = FusedLinearCrossEntropy.from_match(Match(create_schedule(Head(config))), chunk_size=7)
    assert built.softcap == cap and built.chunk_size == 7
    assert FusedLinearCrossEntropy.from_match(Match(create_schedule(Head(config))), softcap=None).softcap is None
