"""BERT masked language modelling."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from .language_model import LanguageModelModule
from .lm_loss import IGNORE_INDEX


class MaskedLMModule(LanguageModelModule):
    """``BertForMaskedLM`` trained to recover masked tokens.

    Only the masked positions (about 15%) go through the prediction head: the head transform and
    the vocabulary projection are per-token, so skipping the rest saves most of the head's cost.
    The projection and loss run in ``model.lm_loss`` (swappable by a schedule, see ``lm_loss.py``).
    """

    model_class = BertForMaskedLM
    config_class = BertConfig

    @staticmethod
    def model_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
        ).last_hidden_state
        labels = batch["labels"]
        predicted = labels != IGNORE_INDEX
        head = model.cls.predictions
        hidden = head.transform(hidden[predicted])
        loss = model.lm_loss(hidden, head.decoder.weight, labels[predicted], head.decoder.bias)
        return loss, predicted.sum()
