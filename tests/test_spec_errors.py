"""Every bad spec gives its own SpecError naming the offending key, pass or value (and what would
have been valid), before anything is applied; failures while applying leave the model untouched."""
from __future__ import annotations

import copy

import pytest
import torch

import slapo_lightning as slapo
from slapo_lightning.errors import BackendError, ScheduleError, SpecError
from slapo_lightning.spec import load_spec

import tiny_models as fx

ATTN = "bert.encoder.layer.*.attention.self"


def spec(**passes):
    return {"passes": passes}


def qkv(**extra):
    body = {"select": ATTN, "steps": [{"trace": {}}, {"replace": {"pattern": "qkv_linears", "op": "fused_qkv"}}]}
    body.update(extra)
    return body


def attention(**replace_args):
    return {"select": ATTN, "steps": [{"replace": {"pattern": "attention", "op": "flash_attention", **replace_args}}]}


def error(data) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    return str(info.value)


def test_unknown_pass_key_names_it_and_the_valid_keys():
    message = error(spec(fused_qkv=qkv(enabeld=False)))
    assert "pass 'fused_qkv'" in message and "unknown key 'enabeld'" in message
    assert "did you mean 'enabled'" in message and "valid: enabled, optional, select, steps, fn" in message


def test_unknown_top_level_key():
    message = error({"pases": {}})
    assert "unknown key 'pases'" in message and "valid: passes" in message


def test_unknown_primitive_lists_the_primitives():
    message = error(spec(p={"select": ATTN, "steps": [{"replce": {}}]}))
    assert "pass 'p' step 1" in message and "unknown primitive 'replce'" in message
    assert "did you mean 'replace'" in message
    for name in ("checkpoint", "decompose", "fuse", "replace", "trace"):
        assert name in message.split("valid:")[1]


def test_unknown_pattern_and_op_are_named_with_the_registered_ones():
    message = error(spec(p={"select": ATTN, "steps": [{"replace": {"pattern": "qkv_linear", "op": "fused_qkv"}}]}))
    assert "unknown pattern 'qkv_linear'" in message and "did you mean 'qkv_linears'" in message
    assert "attention" in message.split("valid:")[1]
    message = error(spec(p={"select": ATTN, "steps": [{"replace": {"pattern": "qkv_linears", "op": "fused_qvk"}}]}))
    assert "unknown op 'fused_qvk'" in message and "fused_qkv" in message.split("valid:")[1]


def test_unknown_op_argument_names_the_op_and_its_arguments():
    message = error(spec(flash=attention(backnd="sdpa")))
    assert "unknown argument of op 'flash_attention': 'backnd'" in message and "did you mean 'backend'" in message
    assert "valid: backend, causal, strict" in message


def test_unknown_step_argument_and_missing_argument():
    message = error(spec(p={"select": ATTN, "steps": [{"trace": {"flaten": True}}]}))
    assert "step 1 (trace)" in message and "unknown argument 'flaten'" in message and "valid: flatten, leaves" in message
    assert "missing argument 'op'" in error(spec(p={"select": ATTN, "steps": [{"replace": {"pattern": "attention"}}]}))
    assert "missing argument 'target'" in error(spec(p={"select": ATTN, "steps": [{"decompose": {}}]}))


def test_parameter_references_must_exist_and_parameters_must_be_used():
    message = error(spec(flash=dict(attention(backend="$backnd"), backend="sdpa")))
    assert "'$backnd' refers to no parameter of the pass; parameters: backend" in message
    message = error(spec(flash=dict(attention(backend="$backend"), backend="sdpa", causel=True)))
    assert "unknown key 'causel'" in message


def test_tensor_parallel_plan_and_style_names_are_checked_when_the_spec_is_read():
    """Without a mesh the step would be skipped; the typo is still named now, not on the cluster."""
    message = error(spec(tp={"steps": [{"parallelize": {"plan": "megatorn"}}]}))
    assert "pass 'tp' step 1 (parallelize): unknown tensor-parallel plan 'megatorn' (did you mean 'megatron'?)" in message
    message = error(spec(tp={"steps": [{"parallelize": {"plan": {"mlp.fc1": "colwse", "mlp.fc2": {"style": "rowwise"}}}}]}))
    assert "unknown parallel style 'colwse' (did you mean 'colwise'" in message
    assert message.count("unknown parallel style") == 1, "the valid {style: rowwise} entry is not a problem"


def test_unknown_compiler_and_bad_types():
    body = {"select": ATTN, "steps": [{"fuse": {"pattern": "bias_gelu", "compiler": "inductr"}}]}
    message = error(spec(p=body))
    assert "unknown compiler 'inductr'" in message and "TorchScript" in message and "inductor" in message
    assert "'enabled' must be true or false, got 'yes'" in error(spec(p=qkv(enabled="yes")))
    assert "'select' must be a selector string" in error(spec(p=qkv(select=3)))


def test_steps_or_fn_exactly_one_and_fn_must_import():
    assert "exactly one of 'steps'" in error(spec(p={"select": ATTN}))
    assert "exactly one of 'steps'" in error(spec(p=qkv(fn="test_spec_errors:noop_pass")))
    message = error(spec(p={"fn": "no_such_module_xyz:schedule"}))
    assert "pass 'p'" in message and "cannot import 'no_such_module_xyz:schedule'" in message
    message = error(spec(p={"fn": "test_spec_errors:noop_pass", "layers": 3}))
    assert "does not accept (schedule, layers=...)" in message


def noop_pass(sch):
    """A pass function without parameters (see the test above)."""


def test_bad_selector_regex():
    assert "invalid regex in selector 're:(('" in error(spec(p=qkv(select="re:((")))


def test_all_problems_are_reported_at_once():
    message = error(spec(a=qkv(enabeld=True), b={"select": ATTN, "steps": [{"replce": {}}]}))
    assert message.startswith("invalid schedule spec (2 problems)")
    assert "unknown key 'enabeld'" in message and "unknown primitive 'replce'" in message


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("passes:\n  fused_qkv:\n    select: [unclosed\n    steps: []\n")
    message = error(str(path))
    assert str(path) in message and "malformed YAML" in message and "line" in message
    assert "does not exist" in error(str(tmp_path / "missing.yaml"))


def test_selector_without_match_fails_before_anything_changes():
    model = fx.bert()
    before = copy.deepcopy(model.state_dict())
    data = spec(fused_qkv=qkv(), typo=qkv(select="bert.encoder.layers.*.attention.self"))
    with pytest.raises(SpecError) as info:
        slapo.apply_schedule(model, data)
    message = str(info.value)
    assert "pass 'typo'" in message and "'bert.encoder.layers.*.attention.self' matches no module" in message
    assert "closest paths" in message and "optional: true" in message
    assert type(model.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pattern_without_match_rolls_back_every_pass():
    model = fx.bert("eager")
    reference = copy.deepcopy(model)
    layer = model.bert.encoder.layer[0]
    self_attention, output = layer.attention.self, layer.output
    data = spec(fused_qkv=qkv(),
                wrong=dict(select="bert.encoder.layer.*.output",
                           steps=[{"decompose": {"target": "dense"}}, {"trace": {"flatten": True}},
                                  {"replace": {"pattern": "qkv_linears", "op": "fused_qkv"}}]))
    with pytest.raises(SpecError) as info:
        slapo.apply_schedule(model, data)
    message = str(info.value)
    assert "pass 'wrong' at bert.encoder.layer.0.output step 3 (replace)" in message
    assert "pattern 'qkv_linears' matches nothing" in message and "'bert.encoder.layer.*.output'" in message
    assert layer.attention.self is self_attention and layer.output is output
    assert type(output.dense) is torch.nn.Linear and list(self_attention._modules) == ["query", "key", "value", "dropout"]
    slapo.verify(reference, model, fx.inputs(padded=True))


def test_error_while_applying_names_pass_and_rolls_back():
    model = fx.bert()
    data = spec(fused_qkv=qkv(), flash=dict(attention(backend="$backend"), backend="warp_drive"))
    with pytest.raises(BackendError) as info:
        slapo.apply_schedule(model, data)
    message = str(info.value)
    assert message.startswith("pass 'flash' at bert.encoder.layer.0.attention.self step 1 (replace)")
    assert "unknown attention backend 'warp_drive'" in message and "sdpa" in message
    assert type(model.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"


def test_optional_pass_without_match_is_skipped_and_reported():
    model = fx.gpt2()
    data = spec(absent=dict(qkv(select="lm_loss"), optional=True),
                no_qkv=dict(qkv(select="transformer.h.*.attn"), optional=True))
    report = slapo.apply_schedule(model, data)
    assert report["absent"].status == "skipped" and "matches no module" in report["absent"].skipped[0].reason
    assert report["no_qkv"].status == "skipped"
    assert [s.path for s in report["no_qkv"].skipped] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert "pattern 'qkv_linears' matches nothing" in report["no_qkv"].skipped[0].reason


def test_decompose_target_must_exist():
    with pytest.raises(SpecError, match=r"decompose target 'dense_x' matches no submodule"):
        slapo.apply_schedule(fx.bert(), spec(p={"select": "bert.encoder.layer.*.intermediate",
                                               "steps": [{"decompose": {"target": "dense_x"}}]}))


def test_root_module_cannot_be_replaced():
    model = fx.bert()
    with pytest.raises(SpecError, match="replaced the root module"):
        slapo.apply_schedule(model, spec(p={"steps": [{"trace": {}}]}))
    assert type(model).__name__ == "BertForMaskedLM" and not isinstance(model, torch.fx.GraphModule)


def test_unknown_pass_in_a_report_names_the_valid_ones():
    report = slapo.apply_schedule(fx.bert(), spec(fused_qkv=qkv(), flash=attention(backend="sdpa")))
    with pytest.raises(ScheduleError, match=r"no pass 'fused_qvk' in the report of BertForMaskedLM; "
                                            r"did you mean 'fused_qkv'\?; valid passes: fused_qkv, flash$") as info:
        report["fused_qvk"]
    assert isinstance(info.value, KeyError)  # code that caught the old KeyError keeps working
    with pytest.raises(ScheduleError, match=r"no pass 'gelu' in the report of BertForMaskedLM; valid passes: fused_qkv, flash$"):
        report["gelu"]


def test_rollback_restores_graphs_traced_by_an_earlier_schedule():
    model = fx.bert("eager")
    reference = copy.deepcopy(model)
    slapo.apply_schedule(model, spec(fused_qkv=qkv()))
    traced = model.bert.encoder.layer[0].attention.self
    code = traced.code
    data = spec(flash=attention(), broken={"select": "bert.encoder.layer.*.intermediate",
                                           "steps": [{"fuse": {"pattern": "bias_dropout_add_layer_norm"}}]})
    with pytest.raises(SpecError, match="pass 'broken' at bert.encoder.layer.0.intermediate step 1 \\(fuse\\)"):
        slapo.apply_schedule(model, data)
    assert model.bert.encoder.layer[0].attention.self is traced and traced.code == code
    assert not hasattr(traced, "FlashAttentionOp_0") and hasattr(traced, "FusedQKV_0")
    slapo.verify(reference, model, fx.inputs(), rtol=1e-4, atol=1e-5)
