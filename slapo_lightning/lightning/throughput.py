"""What Lightning's ThroughputMonitor needs to report tokens/s and MFU for the recipes' batches."""
from __future__ import annotations

from typing import Any

from torch import nn


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch (``batch_size_fn`` of ThroughputMonitor)."""
    return int(batch["input_ids"].shape[0])


def tokens_in_batch(batch: dict[str, Any]) -> int:
    """Tokens in a batch, so ThroughputMonitor's ``items_per_sec`` is tokens/s (``length_fn``)."""
    return int(batch["input_ids"].numel())


def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Approximate forward FLOPs per token: 2 per weight of every matmul (embedding tables count
    once, as the tied output projection) plus the attention scores and mixing, ``4 * layers *
    seq_len * hidden`` (the estimate of the PaLM paper, appendix B)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embedding_weights = sum(m.weight.numel() for m in embeddings)
    unique = {id(p): p for p in model.parameters()}
    matmul_weights = sum(p.numel() for p in unique.values()) - embedding_weights
    config = model.config
    output_projection = config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size
    return 2 * (matmul_weights + output_projection) + attention
