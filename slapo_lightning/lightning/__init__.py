"""Lightning integration: LightningModules for masked/causal LM and their helpers."""
from .causal_lm import CausalLMModule
from .cpu_allocator import CPUAllocatorCallback
from .export import export_pretrained
from .lm_loss import LMHeadLoss
from .masked_lm import MaskedLMModule
from .progress import StepProgressBar
from .seeding import StepSeed
from .summary import ModelSummary
from .throughput import ThroughputMonitor

__all__ = ["CPUAllocatorCallback", "CausalLMModule", "LMHeadLoss", "MaskedLMModule", "ModelSummary", "StepProgressBar",
           "StepSeed", "ThroughputMonitor", "export_pretrained"]
