"""Both seed tutorials run with every schedule call as written, and keep what the model computes."""
from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from torch import fx

import slapo_lightning as slapo
from slapo_lightning.op import LinearWithSeparateBias

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_tutorial_structures_and_equivalence():
    tutorial = load("attention_single_gpu")
    model = tutorial.Attention(hidden_size=32, n_heads=4)
    original = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="falling back to 'sdpa'"):
        opt_model, qkv, core, ln = tutorial.schedule_attention(model, 32, 4)
        slapo.verify(original, opt_model, (torch.randn(2, 6, 32),), rtol=1e-4, atol=1e-5)
    assert len(qkv) == 3 and [sg.nodes[0].target for sg in qkv] == ["q_proj", "k_proj", "v_proj"]
    assert len(core) == 1 and len(ln) == 1
    children = dict(opt_model.self_attn.named_children())
    assert {"FusedQKV_0", "FlashAttentionOp_0"} <= set(children)
    assert isinstance(opt_model.self_attn, fx.GraphModule)
    assert isinstance(opt_model.proj.dense, LinearWithSeparateBias)
    assert "FusedLayerNorm_0" in dict(opt_model.proj.named_children())
    assert sorted(opt_model.state_dict()) == sorted(original.state_dict())


def test_quick_start_structures_and_equivalence():
    tutorial = load("quick_start")
    bert = tutorial.BertLMHeadModel(tutorial.bert_large_config(layers=2, hidden=32, heads=4))
    original = copy.deepcopy(bert)
    sch, subgraphs = tutorial.schedule_bert(bert)
    assert len(subgraphs) == 1 and [n.name for n in subgraphs[0].nodes] == ["add", "gelu"]
    assert repr(subgraphs) == "[[('', add), ('', gelu)]]"  # as the tutorial prints it: paths relative to subsch
    intermediate = sch["bert.encoder.layer.0.intermediate"].mod
    assert isinstance(intermediate.dense, LinearWithSeparateBias)
    assert "FusedBiasGeLU_0" in dict(intermediate.named_children())
    model, _ = slapo.build(sch, init_weights=False)
    slapo.verify(original, model, {"input_ids": torch.randint(0, 100, (2, 7))}, rtol=1e-4, atol=1e-5)
