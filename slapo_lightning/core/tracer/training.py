"""Train/eval correctness of a trace, and what a training graph assumes.

The trace runs in train mode, so HF's ``p = 0.0 if not self.training else self.dropout.p``
records the real probability; afterwards every functional dropout is tied to the module's
``training`` flag, so ``.eval()`` turns it off again without another specialisation.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .guards import records_itself_when_traced
from .inputs import forward_signature


@records_itself_when_traced
def train_only_probability(p: float, training: bool) -> float:
    """A dropout probability that is zero outside training."""
    return p if training else 0.0


TRAIN_ONLY_ARGUMENTS: dict[Callable, tuple[str, int, str]] = {
    F.dropout: ("training", 2, "flag"),
    F.dropout1d: ("training", 2, "flag"),
    F.dropout2d: ("training", 2, "flag"),
    F.dropout3d: ("training", 2, "flag"),
    F.alpha_dropout: ("training", 2, "flag"),
    F.feature_alpha_dropout: ("training", 2, "flag"),
    torch.dropout: ("train", 2, "flag"),
    F.scaled_dot_product_attention: ("dropout_p", 4, "probability"),
}
"""Functions with an argument that must follow the module's train/eval state: (name, position, kind)."""


def make_dropout_follow_training(graph: fx.Graph) -> None:
    """Tie every functional dropout in ``graph`` to its module's ``training`` flag.

    The trace runs in train mode so HF's ``p = 0.0 if not self.training else self.dropout.p``
    records the real probability; afterwards the baked ``training=True`` (or ``dropout_p``)
    is rewired to read ``self.training`` at run time, so ``.eval()`` turns dropout off again.
    """
    training = None
    for node in list(graph.nodes):
        rule = TRAIN_ONLY_ARGUMENTS.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        name, position, kind = rule
        if training is None:
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                training = graph.get_attr("training")
        if kind == "flag":
            traced_flag = node.args[position] if len(node.args) > position else node.kwargs.get(name, True)
            if traced_flag is not True:  # dropout the code turned off stays off
                continue
            if len(node.args) > position:
                node.update_arg(position, training)
            else:
                node.update_kwarg(name, training)
        else:
            p = node.args[position] if len(node.args) > position else node.kwargs.get(name, 0.0)
            already_gated = isinstance(p, fx.Node) and p.target is train_only_probability
            if not isinstance(p, (fx.Node, float, int)) or p == 0 or already_gated:
                continue
            with graph.inserting_before(node):
                gated = graph.call_function(train_only_probability, (p, training))
            if len(node.args) > position:
                node.update_arg(position, gated)
            else:
                node.update_kwarg(name, gated)


def training_defaults(module: nn.Module) -> dict[str, Any]:
    """Values the trace assumes (unguarded) for arguments a training graph ignores.

    HF's KV cache belongs to generation, never to a static training graph.
    """
    return {"use_cache": False} if "use_cache" in forward_signature(module).parameters else {}
