"""Causal language modelling for any Hugging Face causal LM."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from .language_model import LanguageModelModule


class CausalLMModule(LanguageModelModule):
    """A Hugging Face causal LM trained to predict the next token: GPT-2 by default, any other
    architecture by ``model_type`` (``llama``, ``qwen2``, ...; presets in ``configs/model/``) or by
    the config.json of ``pretrained_path``.

    The loss runs the base model, then ``model.lm_loss`` on the hidden states and the output
    embedding's weight (and bias), so a schedule can fuse the head with the cross-entropy (see
    ``lm_loss.py``).
    """

    model_class = GPT2LMHeadModel
    config_class = GPT2Config
    auto_class = AutoModelForCausalLM

    @staticmethod
    def model_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        labels = batch["labels"][:, 1:]
        head = model.get_output_embeddings()
        loss = model.lm_loss(hidden[:, :-1], head.weight, labels, head.bias)
        return loss, CausalLMModule.predicted_tokens(labels)
