"""What the masked- and causal-LM LightningModules share: model construction, optimisation, logging."""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn
from lightning.fabric.utilities.throughput import measure_flops as count_flops
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import PretrainedConfig, PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from ..errors import RecipeError
from .grad_clip import clip_mixed_grad_norm_, grads_on_several_meshes
from .hf_models import build_hf_model, hf_classes
from .lm_loss import IGNORE_INDEX, LMHeadLoss


LOSS_FORWARD = "slapo_model_loss"
"""The attribute of a sharded model under which FSDP2 knows the loss as a forward method."""

FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Where ``fused_adamw=None`` picks torch's fused AdamW kernel: one pass over each parameter
instead of a chain of foreach ops (3x faster on CPU for the 40 M parameters of the benchmarks'
4-layer GPT-2, BENCHMARKS.md)."""


class LanguageModelModule(pl.LightningModule):
    """A Hugging Face LM as ``self.model`` (the ScheduleCallback's default target), trained with
    AdamW (torch's fused kernel where the parameters' device has one, unless ``fused_adamw`` says
    otherwise), linear warmup and cosine decay to ``min_lr_ratio * lr``; logs loss and perplexity.

    Subclasses set ``model_class``/``config_class`` (the default architecture), ``auto_class`` (the
    HF Auto class that finds the model class of another ``model_type``, or of a pretrained
    directory's config) and implement ``model_loss(model, batch) -> (loss, n)``, ``n`` being the
    number of predicted tokens as a 0-d tensor (validation loss is averaged per token).

    The loss reads the head's weight next to the base model's output, outside ``model.forward``.
    Under FSDP2 (a schedule's ``fully_shard`` of the whole model) it is therefore registered as one
    of the model's forward methods, so the root's parameters are gathered for it as for ``forward``.
    """

    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    auto_class: Any = None

    def __init__(
        self,
        size: str = "tiny",
        sizes: Mapping[str, Mapping[str, Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        token_ids: Mapping[str, int] | None = None,
        pretrained_path: str | None = None,
        attn_implementation: str = "sdpa",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        fused_adamw: bool | None = None,
        model_type: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        model_class, config_class = hf_classes(self.auto_class, model_type, pretrained_path,
                                               (self.model_class, self.config_class))
        self.model = build_hf_model(
            model_class, config_class, size, sizes or {}, config, vocab_size, token_ids,
            pretrained_path, attn_implementation,
        )
        self.model.lm_loss = LMHeadLoss(softcap=getattr(self.model.config, "final_logit_softcapping", None))
        self.val_loss = MeanMetric()
        self.flops_per_batch: int | None = None  # the current batch's, for ThroughputMonitor
        self.flops_per_row: dict[str, float] | None = None  # measured: {"train": fwd+bwd, "val": fwd} per sequence
        self.training_flops_per_batch: int | None = None

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def check_sequence_length(self, seq_len: int) -> None:
        if seq_len > self.max_positions:
            raise RecipeError(
                f"data.seq_len={seq_len} exceeds the model's {self.max_positions} positions; "
                "lower data.seq_len or pick a larger model.size"
            )

    @staticmethod
    def model_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``model_loss`` of ``self.model``, as an FSDP2 forward method when the model is sharded."""
        model = self.model
        if not isinstance(model, FSDPModule):
            return self.model_loss(model, batch)
        if LOSS_FORWARD not in vars(model):
            setattr(model, LOSS_FORWARD, functools.partial(self.model_loss, model))
            register_fsdp_forward_method(model, LOSS_FORWARD)
        return getattr(model, LOSS_FORWARD)(batch)

    @staticmethod
    def predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor, not an int: reading it out would wait for the GPU (and break a compiled
        graph) in every training step."""
        return (labels != IGNORE_INDEX).sum()

    def measure_flops(self, example: dict[str, torch.Tensor], batch_size: int) -> int:
        """Count the FLOPs of a training step (forward + backward) and of a validation step on
        ``example`` (a batch like the real ones, usually one row) with torch's FLOP counter, and
        keep them per sequence: ``flops_per_batch`` (read by ThroughputMonitor for MFU) then follows
        each batch's rows. Call it on the plain model, before a schedule replaces modules with
        kernels the counter cannot see into. Returns the FLOPs of a training batch of ``batch_size`` rows."""
        rows = int(example["input_ids"].shape[0])
        with torch.random.fork_rng():
            train = count_flops(self, lambda: self.loss(example)[0], lambda loss: loss)
            with torch.no_grad():
                forward = count_flops(self, lambda: self.loss(example)[0])
        self.zero_grad(set_to_none=True)
        self.flops_per_row = {"train": train / rows, "val": forward / rows}
        self.training_flops_per_batch = int(round(self.flops_per_row["train"] * batch_size))
        return self.training_flops_per_batch

    def _count_flops(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        if self.flops_per_row is not None:
            self.flops_per_batch = int(round(self.flops_per_row[stage] * batch["input_ids"].shape[0]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch)
        self._count_flops(batch, "train")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, tokens = self.loss(batch)
        self._count_flops(batch, "val")
        self.val_loss.update(loss, tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # the metric is already reduced over ranks: sync_dist only averages equal values (and says so)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": chosen, "weight_decay": decay}
            for decay, matrices in ((hp.weight_decay, True), (0.0, False))
            for chosen in _by_mesh([p for p in params if (p.ndim >= 2) == matrices])
        ]
        fused = self._fused_adamw(params)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        optimizer.register_load_state_dict_post_hook(functools.partial(_set_fused, fused=fused))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise RecipeError("trainer.max_steps (or trainer.max_epochs) must be set for the learning-rate schedule")
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=min(hp.warmup_steps, int(total)), num_training_steps=int(total),
            min_lr_rate=hp.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, and by norm also where tensor parallelism leaves gradients on
        several meshes, or some plain (which torch's ``clip_grad_norm_`` refuses)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and grads_on_several_meshes(params):
            clip_mixed_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fused_adamw(self, params: list[torch.nn.Parameter]) -> bool:
        """``fused_adamw`` if set, else fused where the device has the kernel, unless Lightning is to
        clip gradients under mixed precision: it refuses to clip an optimizer that unscales itself."""
        clips_mixed = bool(getattr(self.trainer, "gradient_clip_val", None)) and isinstance(
            getattr(self.trainer, "precision_plugin", None), MixedPrecision
        )
        choice = self.hparams.get("fused_adamw")
        if choice and clips_mixed:
            raise RecipeError(
                f"model.fused_adamw=true cannot be combined with trainer.gradient_clip_val="
                f"{self.trainer.gradient_clip_val} under {self.trainer.precision} precision (Lightning does not clip "
                "fused optimizers there); set model.fused_adamw=null or trainer.gradient_clip_val=null"
            )
        if choice is not None:
            return bool(choice)
        return not clips_mixed and all(p.device.type in FUSED_ADAMW_DEVICES for p in params)


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """``params`` split by device mesh (plain tensors together): fused and foreach kernels refuse
    DTensors of different meshes, or DTensors mixed with plain tensors, in one group, which tensor
    parallelism (sharded layers, replicated rest) and 2-D meshes produce."""
    found: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        found.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return list(found.values())


def _set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After a checkpoint's optimizer state is loaded: its param groups carry the ``fused`` flag of
    the run that saved them; the kernel is this run's choice."""
    for group in optimizer.param_groups:
        group["fused"] = fused
        group["foreach"] = None if fused else group.get("foreach")
