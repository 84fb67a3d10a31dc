"""The language-model head's matmul and the cross-entropy, as one swappable module.

``LMHeadLoss`` owns no parameters: the head weight (tied to the input embeddings) stays where the
Hugging Face model keeps it and is passed in on each call. The module is attached to the HF model
as ``model.lm_loss``, so:

- ``state_dict`` keys, ``save_pretrained`` and ``from_pretrained`` are exactly those of the plain
  model (a parameter-free child adds no key, and no weight is held twice);
- a schedule, whose paths are relative to the HF model, can select ``lm_loss`` and replace it by
  a fused, chunked linear+cross-entropy with the same ``forward`` signature that never
  materialises the full logits, and checkpoints still move between plain and scheduled models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LMHeadLoss(nn.Module):
    """``mean(cross_entropy(hidden @ weight.T + bias, labels))`` over labels that are not -100;
    with ``softcap`` (Gemma2's ``final_logit_softcapping``) the logits are ``cap * tanh(logits / cap)``
    first, as the HF model computes them.

    Contract for replacements: ``forward(hidden_states (..., H), weight (V, H), labels (...), bias (V,) |
    None) -> scalar``; logits are computed in float32; the mean is over non-ignored labels.
    """

    def __init__(self, softcap: float | None = None):
        super().__init__()
        self.softcap = softcap

    def forward(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), weight, bias).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def extra_repr(self) -> str:
        return "" if self.softcap is None else f"softcap={self.softcap}"
