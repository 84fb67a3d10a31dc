"""GPT-2 causal language modelling."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .language_model import LanguageModelModule


class CausalLMModule(LanguageModelModule):
    """``GPT2LMHeadModel`` trained to predict the next token.

    The loss runs the transformer, then ``model.lm_loss`` on the hidden states and the tied head
    weight, so a schedule can fuse the head with the cross-entropy (see ``lm_loss.py``).
    """

    model_class = GPT2LMHeadModel
    config_class = GPT2Config

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.transformer(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        labels = batch["labels"][:, 1:]
        loss = self.model.lm_loss(hidden[:, :-1], self.model.lm_head.weight, labels)
        return loss, self.predicted_tokens(labels)
