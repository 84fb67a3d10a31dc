"""Specialisations: what a schedule does when a variant of a call does not take one of its edits,
the bound on specialisations, the report, and a hierarchy trace that fails half-way."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import slapo_lightning as slapo
from slapo_lightning.core import TracedModule
from slapo_lightning.core.tracer import MAX_SPECIALISATIONS


def bert() -> nn.Module:
    torch.manual_seed(0)
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))


def unmasked_attention(q, k, v, dropout_p, scale, is_causal):
    """Only the variant without a mask: HF passes ``attn_mask=None`` for unpadded batches."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout_p, scale=scale,
                                          is_causal=is_causal)


def spec(optional: bool) -> dict:
    return {"passes": {"unmasked_attention": {
        "optional": optional, "select": "bert.encoder.layer.*.attention.self",
        "steps": [{"trace": {}}, {"replace": {"pattern": "test_core_specialisation:unmasked_attention",
                                              "op": "flash_attention"}}]}}}


def batches() -> list[dict]:
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return [{"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}]


def test_a_required_pass_that_misses_a_variant_names_pass_module_and_variant():
    model = bert()
    keys = list(model.state_dict())
    with pytest.raises(slapo.ScheduleError) as error:
        slapo.apply_schedule(model, spec(optional=False))
    message = str(error.value)
    assert "pass 'unmasked_attention'" in message
    assert "bert.encoder.layer.0.attention.self" in message
    assert "does not apply to the variant attention_mask=tensor(bool, 4-d)" in message  # the one without a match
    assert not any(isinstance(m, TracedModule) for m in model.modules()), "the model was put back as it was"
    assert list(model.state_dict()) == keys


def test_an_optional_pass_leaves_that_variant_unscheduled_loudly_and_in_the_report():
    model = bert()
    original = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="does not apply to the variant attention_mask=tensor"):
        report = slapo.apply_schedule(model, spec(optional=True))
    assert report.applied == ["unmasked_attention"]
    path = "bert.encoder.layer.0.attention.self"
    variants = report.specialisations[path]
    assert len(variants) == 2 and not variants[0].skipped and variants[1].skipped
    assert any(line.startswith(f"{path} [attention_mask=tensor") for line in report.unscheduled_variants)
    assert "UNSCHEDULED VARIANT" in report.render()
    for inputs in batches():
        slapo.verify(original, model, inputs, rtol=1e-5, atol=1e-6)


def test_report_round_trips_its_specialisations(tmp_path):
    from slapo_lightning.report import Report

    model = bert()
    report = slapo.apply_schedule(model, "slapo_lightning/configs/schedule/bert.yaml")
    assert len(report.specialisations["bert.encoder.layer.0.attention.self"]) == 2
    assert Report.load(report.save(tmp_path / "r.json")).specialisations == report.specialisations
    assert any(line.startswith("specialisations: bert.encoder.layer.*.attention.self (x2): 2") for line in
               report.variant_lines())


class Scaled(nn.Module):
    def forward(self, x, factor: int = 1):
        return x * factor


def test_past_the_bound_a_clear_error_names_the_module_and_what_keeps_changing():
    holder = nn.Module()
    holder.scaled = Scaled()
    sch = slapo.create_schedule(holder)
    sch["scaled"].trace(example_inputs=(torch.ones(2), 1))
    traced = sch["scaled"].mod
    for factor in range(2, MAX_SPECIALISATIONS + 1):
        assert torch.equal(traced(torch.ones(2), factor), torch.full((2,), float(factor)))
    assert len(traced.specialisations) == MAX_SPECIALISATIONS
    with pytest.raises(slapo.TraceError, match=r"scaled needed more than 8 specialisations; what keeps changing "
                                               r"between calls: factor"):
        traced(torch.ones(2), MAX_SPECIALISATIONS + 1)
    assert torch.equal(traced(torch.ones(2), 3), torch.full((2,), 3.0)), "the cached ones still serve"


class NeedsRealTensors(nn.Module):
    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("this module reads real tensors only")
        return x + 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.odd = NeedsRealTensors()

    def forward(self, x):
        return self.odd(self.dense(x))


def test_a_child_that_cannot_be_traced_names_its_path_and_leaves_the_tree_as_it_was():
    model = nn.Sequential()
    model.add_module("block", Block())
    block, odd = model.block, model.block.odd
    sch = slapo.create_schedule(model, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(slapo.TraceError, match=r"cannot trace block\.odd \(NeedsRealTensors\)"):
        sch.trace()
    assert model.block is block and model.block.odd is odd
    assert not any(isinstance(m, TracedModule) for m in model.modules())


def test_hierarchy_trace_makes_every_child_a_traced_module_of_its_own():
    model = bert()
    sch = slapo.create_schedule(model)
    layer = sch["bert.encoder.layer.0"]
    layer.trace(flatten=False)
    for child in ("attention", "attention.self", "attention.output", "intermediate", "output"):
        assert isinstance(layer[child].mod, TracedModule), child
    assert isinstance(layer["attention.self.query"].mod, nn.Linear)  # torch.nn built-ins stay leaves


def test_a_python_schedule_holds_for_a_kind_of_call_first_seen_at_run_time():
    from slapo_lightning.op import FusedQKV
    from slapo_lightning.pattern import call_module

    model = bert()
    original = copy.deepcopy(model)
    unpadded, padded = batches()
    sch = slapo.create_schedule(model, example_inputs=unpadded)
    attention = sch["bert.encoder.layer.0.attention.self"]
    attention.trace(example_inputs=attention.example_inputs())  # this kind of call only
    traced = attention.mod
    assert len(traced.specialisations) == 1
    qkv = attention.find(lambda x: call_module(r"query|key|value", x))
    fused = FusedQKV.from_linears(traced.query, traced.key, traced.value, n_heads=4)
    attention.replace(fused, qkv)
    keys = list(model.state_dict())
    slapo.verify(original, model, padded, rtol=1e-4, atol=1e-5)  # a mask: traced and scheduled now
    assert len(traced.specialisations) == 2 and traced.specialisations[1].origin == "run time"
    new = traced.specialisations[1]
    called = {traced.get_submodule(n.target) for n in new.graph.nodes if n.op == "call_module"}
    assert fused in called and not new.skipped, "the same FusedQKV instance serves the new variant"
    assert not hasattr(traced, "query"), "the replaced Linears stay gone"
    assert list(model.state_dict()) == keys
    slapo.verify(original, model, unpadded, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_scheduled_layers_take_both_kinds_of_batch_without_graph_breaks():
    import torch._dynamo

    model = bert().eval()
    original = copy.deepcopy(model)
    slapo.apply_schedule(model, "slapo_lightning/configs/schedule/bert.yaml")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in model.bert.encoder.layer:
        layer.compile()
    for inputs in batches() + batches():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]
