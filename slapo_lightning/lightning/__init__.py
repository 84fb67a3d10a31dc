"""Lightning integration: LightningModules for masked/causal LM and their helpers."""
from .causal_lm import CausalLMModule
from .export import export_pretrained
from .lm_loss import LMHeadLoss
from .masked_lm import MaskedLMModule

__all__ = ["CausalLMModule", "LMHeadLoss", "MaskedLMModule", "export_pretrained"]
