"""An optional pass that finds nothing leaves its module exactly as it was."""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

import slapo_lightning as slapo
from slapo_lightning.op import LinearWithSeparateBias
from slapo_lightning.spec import register_pattern
import tiny_models


def never_matches(x):
    return F.silu(x) * 3.0


def test_optional_pass_without_a_match_is_rolled_back_and_reported_skipped():
    register_pattern("never_matches_for_test", never_matches, overwrite=True)
    model = tiny_models.bert()
    spec = {"passes": {"try_it": {
        "optional": True,
        "select": "bert.encoder.layer.*.intermediate",
        "steps": [{"decompose": {"target": "dense"}}, {"trace": {"flatten": True}},
                  {"fuse": {"pattern": "never_matches_for_test", "compiler": None}}],
    }}}
    report = slapo.apply_schedule(model, spec)
    intermediate = model.bert.encoder.layer[0].intermediate
    assert not isinstance(intermediate, fx.GraphModule)
    assert not isinstance(intermediate.dense, LinearWithSeparateBias)
    assert "skipped" in str(report.to_dict()).lower()
