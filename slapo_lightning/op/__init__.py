"""Op library: modules that schedules swap into Hugging Face models (BERT / GPT-2 and today's
decoders: RMSNorm, gated MLP, RoPE, grouped-query attention and QKV, soft-capped fused CE).

Each op is a drop-in for what it replaces (same numbers, same gradients, original weights kept),
runs as plain PyTorch on CPU and takes a faster kernel on CUDA where one pays. Every op class is
registered once in ``OPS`` under a snake_case name (``list_ops()``), so schedule specs can name
it, and builds itself from a match with ``from_match`` (see ``matching.py``).
"""
from . import attention
from .attention import FlashAttentionOp
from .attention_backends import ATTENTION_BACKENDS
from .cross_entropy import FusedLinearCrossEntropy, fused_linear_cross_entropy
from .dropout import FastDropout, fast_dropout
from ..errors import OpError
from .fused import FusedBiasDropoutAddLayerNorm, FusedBiasGELU, bias_dropout_add_layer_norm, bias_gelu
from .gated_mlp import GatedMLP
from .linear import LinearWithSeparateBias
from .mlp import FusedMLP
from .norm import RMSNorm, rms_norm
from .qkv import FusedQKV
from .registry import OPS, list_ops, register_op
from .rotary import FusedRoPE, rope

__all__ = [
    "ATTENTION_BACKENDS",
    "OPS",
    "FastDropout",
    "FlashAttentionOp",
    "FusedBiasDropoutAddLayerNorm",
    "FusedBiasGELU",
    "FusedLinearCrossEntropy",
    "FusedMLP",
    "FusedQKV",
    "FusedRoPE",
    "GatedMLP",
    "LinearWithSeparateBias",
    "OpError",
    "RMSNorm",
    "attention",
    "bias_dropout_add_layer_norm",
    "bias_gelu",
    "fast_dropout",
    "fused_linear_cross_entropy",
    "list_ops",
    "register_op",
    "rms_norm",
    "rope",
]
