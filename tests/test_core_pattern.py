"""Dataflow-aware pattern matching."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import slapo_lightning as slapo
from slapo_lightning.pattern import call_module


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x, other):
        q = self.q_proj(x).relu()
        k = self.k_proj(x).relu()
        v = self.v_proj(x).relu()
        lookalike = other.relu()  # relu of an unrelated tensor: not a q/k/v match
        return q + k + v + self.out(lookalike)


def test_call_module_regex_matches_in_graph_order_and_ignores_lookalikes():
    sch = slapo.create_schedule(QKV())
    found = sch.find(lambda x: call_module(r"[qkv]_proj", x).relu())
    assert [sg.nodes[0].target for sg in found] == ["q_proj", "k_proj", "v_proj"]
    assert all(len(sg) == 2 for sg in found)
    assert all(sg.inputs == found[0].inputs for sg in found)


def test_no_match_is_an_empty_list():
    sch = slapo.create_schedule(QKV())
    assert sch.find(lambda x: torch.sigmoid(x)) == []


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(8)
        self.act = nn.GELU()

    def forward(self, x, bias, residual):
        return self.act(self.norm(self.dropout(x + bias) + residual))


def test_functional_calls_in_a_pattern_match_module_calls():
    sch = slapo.create_schedule(Block())

    def pattern(x, bias, residual):
        return F.gelu(F.layer_norm(F.dropout(x + bias, 0.1) + residual, 8))

    (match,) = sch.find(pattern)
    assert [n.op for n in match.nodes].count("call_module") == 3
    assert match.param_names == ["x", "bias", "residual"]
    assert [n.name for n in match.inputs] == ["x", "bias", "residual"]


def test_matches_do_not_overlap_and_must_be_self_contained():
    class Chain(nn.Module):
        def forward(self, x):
            y = x.relu().relu().relu()
            leak = x.sigmoid()
            return y + leak.sigmoid().tanh() + leak

    sch = slapo.create_schedule(Chain())
    assert len(sch.find(lambda x: x.relu().relu())) == 1
    assert sch.find(lambda x: x.sigmoid().sigmoid()) == []  # the inner sigmoid also feeds the output


def test_node_predicate():
    sch = slapo.create_schedule(QKV())
    found = sch.find(lambda node: node.op == "call_module" and node.target == "out")
    assert len(found) == 1 and found[0].nodes[0].target == "out"


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, cos, sin):
    return q * cos + _rotate_half(q) * sin


class Rotary(nn.Module):
    """HF's rotation on a head layout, and a look-alike that halves at a different point."""

    def forward(self, x, cos, sin):
        q = x.view(2, 3, 4, 8).transpose(1, 2)
        other = q * cos + torch.cat((-q[..., q.shape[-1] // 4:], q[..., : q.shape[-1] // 4]), dim=-1) * sin
        return _rope(q, cos, sin) + other


def test_values_computed_inside_a_slice_are_matched_as_dataflow():
    found = slapo.create_schedule(Rotary()).find(_rope)
    assert len(found) == 1
    sliced = [n for n in found[0].nodes if n.target is operator.getitem and n.args[0] is found[0].inputs[0]]
    assert len(sliced) == 2  # both halves of q, their bounds computed from q.shape


def _scores(q, k):
    return torch.matmul(q, k.transpose(-1, -2))


class Scores(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x, y):
        q, k = x.view(2, 3, 4, 8), y.view(2, 3, 4, 8)
        return torch.matmul(q, k.transpose(*self.dims))


def test_equivalent_transpose_spellings_match_given_the_rank():
    for dims in [(2, 3), (3, 2), (-1, -2), (-2, 3), (2, -1)]:
        assert len(slapo.create_schedule(Scores(dims)).find(_scores)) == 1, dims
    for dims in [(1, 3), (1, 2), (-3, -1)]:
        assert slapo.create_schedule(Scores(dims)).find(_scores) == [], dims
