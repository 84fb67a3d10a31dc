"""The patterns shipped with slapo_lightning: what Hugging Face BERT / GPT-2 and the decoders'
attention (transformers 5.x) and the Slapo tutorials write, in the forms the tracer records; the
decoders' norms, MLPs and rotary embeddings are in ``decoder_patterns``."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..core.pattern import call_module
from .patterns import Variant, register_pattern

# -- q, k, v projections -------------------------------------------------------------------------


def qkv_linear(x):
    """The query, key and value projections of one attention (BERT ``query/key/value``, tutorial
    ``q_proj/k_proj/v_proj``), replaced together: three matches, in q, k, v order."""
    return call_module(r"query|key|value|q_proj|k_proj|v_proj", x)


register_pattern("qkv_linears", qkv_linear, group=True, count=3)


def linear_projection(x):
    """Any ``nn.Linear`` called on ``x``: three of them on one input are an attention's q, k, v
    (in graph order), whatever the Linears are called."""
    return F.linear(x, x)  # matched on its input alone: the module holds the weight


register_pattern("qkv_projections", linear_projection, group=True, count=3, by_input=True)

# -- attention core --------------------------------------------------------------------------------


def bert_eager_attention(q, k, v, scale):
    """HF eager attention (BERT family): softmax(q k^T * scale) -> dropout -> @ v."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1)), v)


def bert_eager_attention_masked(q, k, v, scale, attention_mask):
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + attention_mask
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1)), v)


def gpt2_eager_attention(q, k, v, scale):
    """HF eager attention (GPT-2): as BERT's, with transpose(-1, -2) and a cast to v's dtype."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1).type(v.dtype)), v)


def gpt2_eager_attention_masked(q, k, v, scale, attention_mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + attention_mask
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1).type(v.dtype)), v)


def tutorial_attention(q, k, v, d):
    """The Slapo tutorial's ``scaled_dot_product``: softmax(q k^T / sqrt(d)) -> dropout -> @ v."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / d
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1)), v)


def sdpa_attention(q, k, v, attention_mask, dropout_p, scale, is_causal):
    """The ``F.scaled_dot_product_attention`` call of HF's sdpa attention path."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=scale,
                                          is_causal=is_causal)


def repeat_kv(x, n_rep):
    """HF's ``repeat_kv``: grouped key/value heads repeated to the query heads."""
    batch, heads, seq, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, heads, n_rep, seq, dim)
    return x.reshape(batch, heads * n_rep, seq, dim)


def decoder_eager_attention_masked(q, k, v, scale, attention_mask):
    """HF 5.x ``eager_attention_forward`` of the decoders: float32 softmax cast to q's dtype."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + attention_mask
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)), v)


def decoder_eager_attention(q, k, v, scale):
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    return torch.matmul(F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)), v)


def gqa_eager_attention_masked(q, k, v, n_rep, scale, attention_mask):
    """Grouped-query eager attention: k and v repeated (``repeat_kv``) before the core; the op
    reads the grouped heads directly."""
    return decoder_eager_attention_masked(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale, attention_mask)


def gqa_eager_attention(q, k, v, n_rep, scale):
    return decoder_eager_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale)


def sdpa_attention_default_scale(q, k, v, attention_mask, dropout_p, is_causal):
    """An sdpa call leaving the scale to torch (1/sqrt(head_dim); Falcon)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal)


def gqa_sdpa_attention(q, k, v, attention_mask, dropout_p, scale, is_causal):
    """HF's sdpa path when torch's kernel reads grouped heads itself (``enable_gqa=True``)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=scale,
                                          is_causal=is_causal, enable_gqa=True)


def gqa_sdpa_attention_repeated(q, k, v, n_rep, attention_mask, dropout_p, scale, is_causal):
    """HF's sdpa path when it repeats k and v first (a mask or a backend without ``enable_gqa``)."""
    return sdpa_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attention_mask, dropout_p, scale, is_causal)


DROPOUT_TARGETS = (F.dropout, torch.dropout)


def _produced_by_dropout(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in DROPOUT_TARGETS
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), torch.nn.Dropout)
    return False


def drop_returned_attention_probabilities(gm: fx.GraphModule):
    """HF attention modules return ``(output, probabilities)``; the probabilities only serve
    ``output_attentions=True`` and pin the eager core in place (a fused kernel never forms them).
    Return None in their place, as HF's own sdpa path does; gives back an undo function."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, (tuple, list)):
        return None
    kept = type(result)(None if isinstance(v, fx.Node) and i > 0 and _produced_by_dropout(v) else v
                        for i, v in enumerate(result))
    if list(kept) == list(result):
        return None
    output.args = (kept,)
    gm.recompile()

    def undo() -> None:
        output.args = (result,)
        gm.recompile()

    return undo


SHAPE_DIMS_KEPT_BY_REPEAT_KV = (0, 2, 3, -1, -2, -4)
"""``repeat_kv`` multiplies the heads (dim 1); batch, sequence and head dim are its input's."""


def read_shapes_before_repeat_kv(gm: fx.GraphModule) -> None:
    """HF's sdpa path reads the sequence length of the repeated k (``key.shape[2]``, to decide
    causality) in a guard; that read would keep the repeated k alive outside a grouped-query
    match. It reads the same number off the grouped k, so the guard is pointed there."""
    from ..core.pattern import find_subgraphs

    changed = False
    for sg in find_subgraphs(gm, "", repeat_kv):
        repeated, grouped = sg.outputs[0], sg.inputs[0]
        for shape in [u for u in repeated.users if u.target is getattr and u.args[1:] == ("shape",)]:
            for item in [u for u in shape.users if u.target is operator.getitem]:
                if item.args[1] not in SHAPE_DIMS_KEPT_BY_REPEAT_KV:
                    continue
                with gm.graph.inserting_before(item):
                    own = gm.graph.call_function(getattr, (grouped, "shape"))
                    item.replace_all_uses_with(gm.graph.call_function(operator.getitem, (own, item.args[1])))
                gm.graph.erase_node(item)
                changed = True
            if not shape.users:
                gm.graph.erase_node(shape)
    if changed:
        gm.recompile()


EAGER_VARIANTS = (
    Variant(gqa_eager_attention_masked, {"scale": "mul"}),
    Variant(gqa_eager_attention, {"scale": "mul"}),
    Variant(decoder_eager_attention_masked, {"scale": "mul"}),
    Variant(decoder_eager_attention, {"scale": "mul"}),
    Variant(bert_eager_attention_masked, {"scale": "mul"}),
    Variant(bert_eager_attention, {"scale": "mul"}),
    Variant(gpt2_eager_attention_masked, {"scale": "mul"}),
    Variant(gpt2_eager_attention, {"scale": "mul"}),
    Variant(tutorial_attention, {"scale": "div"}),
)
SDPA_VARIANTS = (
    Variant(gqa_sdpa_attention_repeated, {"scale": "mul"}),
    Variant(gqa_sdpa_attention, {"scale": "mul"}),
    Variant(sdpa_attention, {"scale": "mul"}),
    Variant(sdpa_attention_default_scale, {"scale": "default"}),
)

register_pattern("eager_attention", *EAGER_VARIANTS, prepare=drop_returned_attention_probabilities,
                 doc="HF eager attention core matmul -> (*scale) -> (+mask) -> softmax -> dropout -> matmul "
                     "(BERT, GPT-2 and decoder forms, grouped-query k/v repeated or not, and the tutorial's "
                     "/ sqrt(d)).")
register_pattern("sdpa_attention", *SDPA_VARIANTS, normalise=read_shapes_before_repeat_kv)
register_pattern("attention", *EAGER_VARIANTS, *SDPA_VARIANTS, normalise=read_shapes_before_repeat_kv,
                 prepare=drop_returned_attention_probabilities,
                 doc="The attention core in either form: eager_attention or sdpa_attention "
                     "(so one spec serves both attn_implementation settings).")

# -- bias + GELU -----------------------------------------------------------------------------------


def bias_gelu_erf(x, bias):
    """gelu(x + bias) after ``decompose`` split a Linear's bias: erf GELU (module or function)."""
    return F.gelu(x + bias)


def bias_gelu_tanh(x, bias):
    return F.gelu(x + bias, approximate="tanh")


def bias_gelu_new(x, bias):
    """HF ``gelu_new`` written out (NewGELUActivation inlined by a flattened trace)."""
    h = x + bias
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


register_pattern(
    "bias_gelu",
    Variant(bias_gelu_erf, {"approximate": "from_node"}),
    Variant(bias_gelu_tanh, {"approximate": "tanh"}),
    Variant(bias_gelu_new, {"approximate": "tanh"}),
    doc="gelu(x + bias) in HF's variants: erf (gelu), tanh (gelu_pytorch_tanh) and gelu_new's formula.",
)

# -- bias + dropout + residual + LayerNorm -----------------------------------------------------------


def bias_dropout_add_layer_norm(x, bias, residual):
    """layer_norm(dropout(x + bias) + residual): the tail of BERT's SelfOutput/Output after
    ``decompose`` of ``dense`` (LayerNorm and dropout as modules or functions)."""
    return F.layer_norm(F.dropout(x + bias) + residual, (1,))


def bias_dropout_add_layer_norm_residual_first(x, bias, residual):
    return F.layer_norm(residual + F.dropout(x + bias), (1,))


register_pattern("bias_dropout_add_layer_norm", bias_dropout_add_layer_norm,
                 bias_dropout_add_layer_norm_residual_first)

from . import decoder_patterns  # noqa: E402,F401  (registration: RMSNorm, gated MLP, RoPE)
