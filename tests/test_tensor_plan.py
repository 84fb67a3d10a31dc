"""The ``megatron`` tensor-parallel plan is read off each layer's dataflow, with no module names:
the Linears reading the layer's stream are colwise, the ones that make their shards whole again
rowwise, in groups (attention, MLP) that are kept or left whole on their own; a layer without
such pairs gets no plan, and says why."""
from __future__ import annotations

import pytest

import decoder_models
import slapo_lightning as slapo
from slapo_lightning.core.primitives.tensor_plan import megatron_plan
from slapo_lightning.errors import NoMatch

ATTENTION = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
             "self_attn.o_proj": "rowwise"}
GATED = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
PLANS = {
    "llama": [ATTENTION, GATED], "mistral": [ATTENTION, GATED], "qwen2": [ATTENTION, GATED],
    "qwen3": [ATTENTION, GATED], "gemma": [ATTENTION, GATED], "olmo2": [ATTENTION, GATED],
    "phi3": [{"self_attn.qkv_proj": "colwise", "self_attn.o_proj": "rowwise"},
             {"mlp.gate_up_proj": "colwise", "mlp.down_proj": "rowwise"}],
    "opt": [{"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
             "self_attn.out_proj": "rowwise"}, {"fc1": "colwise", "fc2": "rowwise"}],
    "gpt_neox": [{"attention.query_key_value": "colwise", "attention.dense": "rowwise"},
                 {"mlp.dense_h_to_4h": "colwise", "mlp.dense_4h_to_h": "rowwise"}],
}


def first_layer(name: str):
    model = decoder_models.build(name, "eager")
    return model, slapo.create_schedule(model).select("no_split:")[0]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_the_plan_pairs_each_layers_linears_by_dataflow(name):
    model, layer = first_layer(name)
    keys = list(model.state_dict())
    plans = megatron_plan(layer)
    assert sorted(plans, key=lambda p: sorted(p)) == sorted(PLANS[name], key=lambda p: sorted(p))
    assert list(model.state_dict()) == keys and not hasattr(layer.mod, "graph"), "reading the plan changes nothing"


def test_the_plan_lists_modules_in_graph_order_on_every_call():
    """Every rank shards its modules in one order (their collectives must line up)."""
    _, layer = first_layer("llama")
    first = megatron_plan(layer)
    assert [list(p) for p in first] == [list(p) for p in megatron_plan(layer)]
    assert list(first[0]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


@pytest.mark.parametrize("name, reason", [
    ("gpt2", "no Linear whose sharded output another Linear makes whole again"),  # Conv1D: its own schedule's plan
    ("mixtral", "its dataflow cannot be traced"),
])
def test_a_layer_without_pairs_gets_no_plan_and_the_reason(name, reason):
    _, layer = first_layer(name)
    with pytest.raises(NoMatch, match=reason):
        megatron_plan(layer)
