"""FastDropout / op.dropout: F.dropout's contract with a 16-bit keep mask on CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slapo_lightning import op
from slapo_lightning.op import ATTENTION_BACKENDS
from slapo_lightning.op import FastDropout, OpError, fast_dropout
from slapo_lightning.op.dropout import LEVELS
from slapo_lightning.spec import apply_schedule
from slapo_lightning.errors import ScheduleError


def test_identity_in_eval_or_without_probability():
    x = torch.randn(8, 8)
    assert fast_dropout(x, 0.3, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))


def test_drops_p_of_the_elements_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    out = fast_dropout(x, 0.1)
    kept = out != 0
    quantised_p = round(0.1 * LEVELS) / LEVELS
    assert abs(1 - kept.float().mean().item() - quantised_p) < 2e-3
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - quantised_p)))
    assert abs(out.mean().item() - 1.0) < 3e-3


@pytest.mark.parametrize("p", [1 - 2**-18, 2**-18])
def test_probabilities_too_close_to_0_or_1_to_quantise_use_torch_dropout(p):
    torch.manual_seed(0)
    x = torch.ones(4096)
    out = fast_dropout(x, p)
    assert ((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - p)))).all()
    reason = ATTENTION_BACKENDS.get("blocked_dropout").unsupported_reason(x.view(1, 1, 64, 64), None, p, True)
    assert "steps of 1/65536" in reason


def test_bfloat16_keeps_its_dtype_and_gradient():
    x = (torch.rand(32, 32) + 1).bfloat16().requires_grad_()  # never zero: zeros in out are dropped entries
    out = fast_dropout(x, 0.5)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad != 0, out.detach() != 0) and 0 < int((out == 0).sum()) < x.numel()


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = fast_dropout(x, 0.25)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad * x.detach(), out.detach())


def test_seeded_runs_repeat():
    x = torch.randn(3, 17, 5)
    torch.manual_seed(7)
    first = fast_dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(first, fast_dropout(x, 0.5))


def test_module_takes_over_nn_dropout():
    original = nn.Dropout(0.2).eval()
    fast = FastDropout.from_dropout(original)
    assert fast.p == 0.2 and not fast.training and "fast_dropout" in op.list_ops()
    with pytest.raises(OpError, match=r"in \[0, 1\], got 1.5"):
        FastDropout(1.5)


def test_compiles_to_one_graph():
    x = torch.randn(4, 8, requires_grad=True)
    out = torch.compile(lambda t: fast_dropout(t, 0.5), backend="eager", fullgraph=True)(x)
    assert out.shape == x.shape and ((out == 0) | torch.isclose(out, 2 * x)).all()


def test_spec_refuses_a_module_that_is_not_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    spec = {"passes": {"drop": {"select": "0", "steps": [{"replace": {"op": "fast_dropout"}}]}}}
    with pytest.raises(ScheduleError, match="fast_dropout replaces an nn.Dropout, got Linear at 0"):
        apply_schedule(model, spec)
    spec["passes"]["drop"]["select"] = "1"
    apply_schedule(model, spec)
    assert isinstance(model[1], FastDropout) and model[1].p == 0.1
