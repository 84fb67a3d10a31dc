"""Tiny random models of every architecture the ``auto`` schedule supports (dropout 0, nothing
downloaded), built from their config classes: the fixtures of the auto-schedule tests."""
from __future__ import annotations

import torch
import transformers as tf
from torch import nn

VOCAB, SEQ = 101, 10
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**DECODER),
    "mistral": lambda: tf.MistralConfig(**DECODER),
    "qwen2": lambda: tf.Qwen2Config(**DECODER),
    "qwen3": lambda: tf.Qwen3Config(**DECODER, head_dim=16),
    "phi3": lambda: tf.Phi3Config(**DECODER, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
    "gemma": lambda: tf.GemmaConfig(**DECODER, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**DECODER, head_dim=8, sliding_window=4, final_logit_softcapping=30.0,
                                      attn_logit_softcapping=50.0),
    "olmo2": lambda: tf.Olmo2Config(**DECODER),
    "mixtral": lambda: tf.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": lambda: tf.BertConfig(**ENCODER),
    "roberta": lambda: tf.RobertaConfig(**ENCODER, pad_token_id=1),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                                attention_dropout=0.0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5,
                                         hidden_dropout=0.0, attention_dropout=0.0),
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_kv_heads=2, new_decoder_architecture=True, hidden_dropout=0.0,
                                      attention_dropout=0.0),
}
MASKED = {"bert", "roberta"}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo2")


def build(name: str, attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    config = CONFIGS[name]()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model_cls = tf.AutoModelForMaskedLM if name in MASKED else tf.AutoModelForCausalLM
    return model_cls.from_config(config, attn_implementation=attn_implementation)


def batch(padded: bool, seed: int = 1) -> dict:
    """Two rows of token ids (never a pad id), with an attention mask; ``padded``: row 1 ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=generator)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padded:
        mask[1, SEQ - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def layers(model: nn.Module) -> list[str]:
    """Paths of the model's repeated layers (its ``_no_split_modules`` classes)."""
    classes = set(model._no_split_modules)
    return [path for path, m in model.named_modules() if type(m).__name__ in classes]
