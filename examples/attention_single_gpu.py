"""The "Optimize Attention Module on A Single Device" tutorial, runnable.

Every schedule call is as the tutorial writes it. The tutorial's model code has bugs, fixed here
and marked FIX:
- ``torch.sqrt(d_k)`` on an int -> ``math.sqrt(d_k)``;
- ``F.dropout(attn_probs, 0.1)`` is always on (``training`` defaults to True), so the model
  could never be evaluated; the model applies that dropout with an ``nn.Dropout`` module, and the
  tutorial's ``scaled_dot_product`` stays the pattern (a functional dropout in a pattern matches
  a dropout module);
- ``output.permute(...)`` / ``output.view(...)`` results were discarded in ``SelfAttention``;
- ``FusedQKV`` split its output with ``torch.split(x, 1, dim=-1)`` on a (b, s, h, 3*d) view; the
  fixed version views (b, s, 3, h, d) and unbinds dim 2, matching the Linears' layout.

Run: ``python examples/attention_single_gpu.py [--hidden 1024 --heads 16]``.
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import slapo_lightning as slapo
from slapo_lightning.op.attention import FlashAttentionOp
from slapo_lightning.pattern import call_module


def scaled_dot_product(q, k, v):
    # (bs, head, seq, hs // head)
    d_k = q.shape[-1]
    attn_score = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)  # FIX: math.sqrt
    # (bs, head, seq, seq)
    attn_probs = F.softmax(attn_score, dim=-1)
    attn_probs = F.dropout(attn_probs, 0.1)
    # (bs, head, seq, hs // head)
    attn = torch.matmul(attn_probs, v)
    return attn


class SelfAttention(nn.Module):
    def __init__(self, hidden_size, n_heads):
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.n_heads = n_heads
        self.attn_dropout = nn.Dropout(0.1)  # FIX: dropout that follows train/eval

    def permute_for_scores(self, x):
        # x: (batch_size, seq_len, hidden_size)
        new_shape = x.shape[:-1] + (self.n_heads, -1)
        x = x.view(new_shape)
        # output: (bs, head, seq, hs // head)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        q = self.permute_for_scores(self.q_proj(hidden_states))
        k = self.permute_for_scores(self.k_proj(hidden_states))
        v = self.permute_for_scores(self.v_proj(hidden_states))
        # core attention: scaled_dot_product with the dropout module (FIX)
        d_k = q.shape[-1]
        attn_score = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)
        attn_probs = F.softmax(attn_score, dim=-1)
        attn_probs = self.attn_dropout(attn_probs)
        output = torch.matmul(attn_probs, v)
        # output: (bs, seq, head, hs // head)
        output = output.permute(0, 2, 1, 3)  # FIX: keep the results
        output = output.reshape(output.shape[0], output.shape[1], -1)
        return output


class Projection(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(0.1)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.layer_norm(hidden_states + input_tensor)
        return hidden_states


class Attention(nn.Module):
    def __init__(self, hidden_size, n_heads):
        super().__init__()
        self.self_attn = SelfAttention(hidden_size, n_heads)
        self.proj = Projection(hidden_size)

    def forward(self, hidden_states):
        self_output = self.self_attn(hidden_states)
        attention_output = self.proj(self_output, hidden_states)
        return attention_output


class FusedQKV(nn.Module):
    def __init__(self, hidden_size, n_heads) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.fused_linear = nn.Linear(hidden_size, hidden_size * 3)

    def forward(self, hidden_states):
        qkv = self.fused_linear(hidden_states)
        # FIX: (b, s, 3, heads, d) so q, k, v are the three Linears' outputs
        qkv = qkv.view(qkv.shape[:-1] + (3, self.n_heads, -1))
        q, k, v = torch.unbind(qkv, dim=2)
        return [x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v)]

    # Not in the tutorial: the state-key protocol (see slapo_lightning.state_keys), so the
    # scheduled model still saves and loads q_proj/k_proj/v_proj weights.
    def split_state(self):
        weights = self.fused_linear.weight.chunk(3)
        biases = self.fused_linear.bias.chunk(3)
        return [{"weight": w, "bias": b} for w, b in zip(weights, biases)]

    @torch.no_grad()
    def load_split_state(self, states):
        self.fused_linear.weight.copy_(torch.cat([s["weight"] for s in states]))
        self.fused_linear.bias.copy_(torch.cat([s["bias"] for s in states]))


def schedule_attention(model: Attention, hidden_size: int, n_heads: int, verbose: bool = False):
    """The tutorial's schedule, verbatim; returns the built model."""
    show = print if verbose else (lambda *a, **k: None)
    sch = slapo.create_schedule(model)
    show(sch.mod)
    attn_sch = sch["self_attn"]
    show(attn_sch.mod)

    def pattern(x):
        x = call_module(r"[qkv]_proj", x)
        new_shape = x.shape[:-1] + (n_heads, -1)
        x = x.view(new_shape)
        return x.permute(0, 2, 1, 3)

    qkv_subgraphs = attn_sch.find(pattern)
    show(attn_sch.mod)
    show(qkv_subgraphs)

    fused_qkv = FusedQKV(hidden_size=hidden_size, n_heads=n_heads)
    # Not in the tutorial (its FusedQKV starts from fresh weights): start from the model's own
    # q/k/v weights so the built model computes the same function as the original.
    fused_qkv.load_split_state([dict(model.self_attn.get_submodule(n).named_parameters())
                                for n in ("q_proj", "k_proj", "v_proj")])
    attn_sch.replace(fused_qkv, qkv_subgraphs)
    show(attn_sch.mod)

    core_attn_subgraph = attn_sch.find(scaled_dot_product)
    show(core_attn_subgraph)

    flash_attn = FlashAttentionOp(attn_op_name="native_xformers", apply_causal_mask=False)
    attn_sch.replace(
        flash_attn, core_attn_subgraph, concrete_args={"attention_mask": None, "p": 0.1}
    )
    show(attn_sch.mod)

    proj_sch = sch["proj"]
    show(proj_sch.mod)
    proj_sch["dense"].decompose()
    show(proj_sch.mod)
    proj_sch.trace(flatten=True)
    show(proj_sch.mod)

    def ln_pattern(x, bias, residual):
        return F.layer_norm(F.dropout(x + bias) + residual, hidden_size)

    ln_subgraph = proj_sch.find(ln_pattern)
    show(ln_subgraph)
    proj_sch.fuse(ln_subgraph, compiler="TorchScript", name="FusedLayerNorm")
    show(proj_sch.mod)

    opt_model, _ = slapo.build(sch, init_weights=False)
    show(opt_model)
    return opt_model, qkv_subgraphs, core_attn_subgraph, ln_subgraph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    model = Attention(hidden_size=args.hidden, n_heads=args.heads)
    original = copy.deepcopy(model)
    opt_model, *_ = schedule_attention(model, args.hidden, args.heads, verbose=True)
    errors = slapo.verify(original, opt_model, (torch.randn(2, 16, args.hidden),), rtol=1e-4, atol=1e-5)
    print(f"verified: outputs and gradients match (max abs error {max(errors.values()):.2e})")


if __name__ == "__main__":
    main()
