"""Dataflow-aware pattern matching."""
from __future__ import annotations

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
