"""The shipped ``auto`` schedule on tiny random models of every supported architecture (dropout 0):
it applies by name, the scheduled model computes the original's outputs and every gradient on
padded and unpadded batches in train and eval mode, the report names what each pass replaced in
every layer, checkpoints move both ways, and an MoE model is scheduled only where patterns match."""
from __future__ import annotations

import copy

import pytest
import torch

import slapo_lightning as slapo
from slapo_lightning.spec.schema import SHIPPED_SPECS as SHIPPED

import decoder_models as dm

NORM, QKV, ROPE, ATTENTION, MLP = "rms_norm", "fused_qkv", "rope", "flash_attention", "gated_mlp"
GELU_MLP = "fused_mlp"
EXPECTED = {
    "llama": {NORM, QKV, ROPE, ATTENTION, MLP},
    "mistral": {NORM, QKV, ROPE, ATTENTION, MLP},
    "qwen2": {NORM, QKV, ROPE, ATTENTION, MLP},
    "qwen3": {NORM, QKV, ROPE, ATTENTION, MLP},
    "phi3": {NORM, ROPE, ATTENTION, MLP},           # q/k/v already one qkv_proj
    "gemma": {NORM, QKV, ROPE, ATTENTION, MLP},
    "gemma2": {NORM, QKV, ROPE, MLP},               # soft-capped attention logits: no kernel reproduces them
    "olmo2": {NORM, QKV, ROPE, ATTENTION, MLP},
    "mixtral": {NORM, QKV, ROPE, ATTENTION},        # the sparse MoE block stays as it is
    "gpt2": {ATTENTION},                            # Conv1D projections, gelu_new written out
    "bert": {QKV, ATTENTION, GELU_MLP},
    "roberta": {QKV, ATTENTION, GELU_MLP},
    "opt": {QKV, ATTENTION},                        # a ReLU MLP
    "gpt_neox": {ROPE, ATTENTION, GELU_MLP},
    "falcon": {ROPE, ATTENTION},                    # q/k/v one query_key_value, a plain GELU MLP
}
"""Which layer passes find their pattern in every layer of each architecture."""
LAYER_PASSES = (NORM, QKV, ROPE, ATTENTION, MLP, GELU_MLP)
OPS = {NORM: "RMSNorm", QKV: "FusedQKV", ROPE: "FusedRoPE", ATTENTION: "FlashAttentionOp", MLP: "GatedMLP",
       GELU_MLP: "FusedMLP"}
IMPLEMENTATION = {"gemma2": "eager", "llama": "eager"}  # Gemma2 has no sdpa path; Llama covers the eager forms


def gradients_by_key(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under the original model's state_dict key (fused weights split
    back by the same hooks that save them)."""
    params = list(model.parameters())
    data = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        for p, d in zip(params, data):
            p.data = d


def outputs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch).logits
    (out.float().square().mean()).backward()
    grads = gradients_by_key(model)
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def scheduled(request):
    name = request.param
    original = dm.build(name, IMPLEMENTATION.get(name, "sdpa"))
    model = copy.deepcopy(original)
    report = slapo.apply_schedule(model, "auto", example_inputs=dm.batch(padded=True))
    return name, original, model, report


def test_outputs_and_all_gradients_equal_the_original(scheduled):
    name, original, model, _ = scheduled
    for train in (True, False):
        original.train(train)
        model.train(train)
        for padded in (True, False, True):
            batch = dm.batch(padded=padded)
            want, want_grads = outputs_and_grads(original, batch)
            got, got_grads = outputs_and_grads(model, batch)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} train={train} padded={padded}")
            assert got_grads.keys() == want_grads.keys()
            for key in want_grads:
                torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-5,
                                           msg=f"{name} gradient of {key} (train={train}, padded={padded})")


def test_report_names_the_passes_applied_in_every_layer(scheduled):
    name, original, model, report = scheduled
    layers = set(dm.layers(original))
    decoder_layers = {p for p in layers if "embeddings" not in p}
    applied = {p.name: {c.path: c for c in p.changes} for p in report.passes}
    for pass_name in LAYER_PASSES:
        if pass_name in EXPECTED[name]:
            assert decoder_layers <= set(applied[pass_name]), f"{name}: {pass_name} missing in some layers"
            for path in decoder_layers:
                change = applied[pass_name][path]
                assert any(OPS[pass_name] in m for m in change.new_modules.values()), (name, pass_name, change)
                assert any(s.step == "replace" and s.matches >= 1 for s in change.steps)
        else:
            assert not (decoder_layers & set(applied[pass_name])), f"{name}: {pass_name} applied unexpectedly"
            skipped = {s.path for p in report.passes if p.name == pass_name for s in p.skipped}
            assert decoder_layers <= skipped, f"{name}: the report does not say why {pass_name} skipped a layer"


def test_state_dict_keys_unchanged_and_strict_loading_both_ways(scheduled):
    name, original, model, _ = scheduled
    assert set(model.state_dict()) == set(original.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == count(original), "a replaced module's tensors are still held next to the op's"
    fresh = dm.build(name, IMPLEMENTATION.get(name, "sdpa"), seed=7)
    fresh.load_state_dict(model.state_dict(), strict=True)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    other = dm.build(name, IMPLEMENTATION.get(name, "sdpa"), seed=7)
    model.load_state_dict(other.state_dict(), strict=True)
    batch = dm.batch(padded=True)
    model.eval()
    other.eval()
    torch.testing.assert_close(model(**batch).logits, other(**batch).logits, rtol=1e-5, atol=1e-5)
    model.load_state_dict(original.state_dict(), strict=True)


def test_moe_block_is_left_as_it_is():
    model = dm.build("mixtral", "sdpa")
    moe = {p: type(m) for p, m in model.named_modules() if p.endswith(".mlp")}
    report = slapo.apply_schedule(model, "auto", example_inputs=dm.batch(padded=True))
    assert {p: type(m) for p, m in model.named_modules() if p.endswith(".mlp")}.keys() == moe.keys()
    traces = [s for p in report.passes if p.name == NORM for c in p.changes for s in c.steps if s.step == "trace"]
    assert traces and all("mlp kept as a leaf" in s.detail for s in traces)
    assert all(type(m).__name__ == "MixtralSparseMoeBlock" for p, m in model.named_modules() if p.endswith(".mlp"))


def test_auto_resolves_by_name_for_the_callback_and_apply_schedule():
    from slapo_lightning.spec import load_spec

    callback = slapo.ScheduleCallback("auto")
    assert [p.name for p in callback.spec.passes] == [p.name for p in load_spec(str(SHIPPED / "auto.yaml")).passes]
    assert callback.fingerprint == load_spec(str(SHIPPED / "auto.yaml")).fingerprint()


def test_grouped_key_values_are_never_repeated_in_any_variant():
    """Eager attention's repeat_kv and sdpa's (with a padding mask; a guard of HF's reads the
    repeated k's length) both go: the op reads the grouped heads."""
    for impl in ("eager", "sdpa"):
        model = dm.build("mistral", impl)
        slapo.apply_schedule(model, "auto", example_inputs=dm.batch(padded=True))
        for layer in model.model.layers:
            assert len(layer.specialisations) == (2 if impl == "sdpa" else 1)  # eager always builds a mask
            for spec in layer.specialisations:
                assert not [n for n in spec.graph.nodes if n.target == "expand"], (impl, spec.label)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_checkpoint_pass_keeps_outputs_and_gradients(name):
    import yaml

    spec = yaml.safe_load((SHIPPED / "auto.yaml").read_text())
    spec["passes"]["checkpoint"]["enabled"] = True  # as schedule.passes.checkpoint.enabled=true does
    original = dm.build(name, "sdpa")
    model = copy.deepcopy(original)
    report = slapo.apply_schedule(model, spec, example_inputs=dm.batch(padded=True))
    assert {c.path for p in report.passes if p.name == "checkpoint" for c in p.changes} >= {
        p for p in dm.layers(original) if "embeddings" not in p}
    batch = dm.batch(padded=True)
    want, want_grads = outputs_and_grads(original, batch)
    got, got_grads = outputs_and_grads(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-5, msg=key)
