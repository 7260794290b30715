"""Lightning: ``configure_optimizers`` that returns CompositionalMuon (or Muon + AdamW), and a
ready LightningModule for causal language models.

    class MyModule(lightning.LightningModule):
        def configure_optimizers(self):
            return optimizer_config(self.model, lr=0.02, warmup_steps=100, total_steps=5000)

One optimizer, so Lightning's automatic optimization works (``optimizer.step(closure)``); its
checkpoints hold the optimizer's ``state_dict`` (momenta, AdamW moments, the CM head layout) and
the lr scheduler's, and ``Trainer.fit(ckpt_path=...)`` restores both. Importing this module imports
``lightning``; the rest of the library never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from torch import nn

from ..attention import AttentionSpec, find_attention
from ._common import OptimizerChoice, build_for_model

__all__ = ["LRSchedule", "optimizer_config", "CausalLMModule"]


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the peak at
    ``total_steps`` (None: constant after warmup). Multiplies every group's lr (CM, Muon, AdamW)."""

    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or (self.total_steps is not None and self.total_steps < 1):
            raise ValueError(f"bad schedule: warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None or self.total_steps <= self.warmup_steps:
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _attention(model: nn.Module) -> list[AttentionSpec]:
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "get_text_config"):  # a transformers model: head counts from its config
        from .hf import hf_attention

        return hf_attention(model)
    return find_attention(model)


def optimizer_config(
    model: nn.Module,
    optimizer: str = "cm",
    *,
    schedule: LRSchedule | None = None,
    attention: Sequence[AttentionSpec] | None = None,
    adamw_params: Sequence[torch.Tensor] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """The return value of ``configure_optimizers``: ``{"optimizer": ..., "lr_scheduler": ...}``
    (the scheduler, stepped every optimizer step, only with a ``schedule``). ``kwargs`` are the
    :class:`~compositional_muon.integrations.OptimizerChoice` fields and CM group options."""
    fields = set(OptimizerChoice.__dataclass_fields__) - {"name", "options"}
    choice = OptimizerChoice(
        name=optimizer,
        **{k: v for k, v in kwargs.items() if k in fields},
        options={k: v for k, v in kwargs.items() if k not in fields},
    )
    specs = list(attention) if attention is not None else (_attention(model) if optimizer == "cm" else [])
    opt = build_for_model(model, choice, attention=specs, adamw_params=adamw_params)
    out: dict[str, Any] = {"optimizer": opt}
    if schedule is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
        out["lr_scheduler"] = {"scheduler": sched, "interval": "step", "frequency": 1}
    return out


def _loss(output: Any) -> torch.Tensor:
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # (logits, loss): this library's models
    loss = getattr(output, "loss", None)  # transformers' ModelOutput
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError(f"cannot find a loss in the model's output of type {type(output).__name__}")


class CausalLMModule(lightning.LightningModule):
    """A causal LM under Lightning with CompositionalMuon. Batches are ``(inputs, targets)`` token
    tensors; ``forward`` is ``model(inputs, targets)`` by default (this library's models) or, with
    ``call=lambda m, x, y: m(input_ids=x, labels=y)``, anything else. Logs ``train_loss`` and
    ``val_loss``; ``optimizer`` / ``schedule`` / ``optimizer_kwargs`` go to :func:`optimizer_config`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: str = "cm",
        schedule: LRSchedule | None = None,
        call: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any] | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name, self.schedule, self.optimizer_kwargs = optimizer, schedule, optimizer_kwargs
        self.call = call or (lambda m, x, y: m(x, y))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = _loss(self.call(self.model, batch[0], batch[1]))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = _loss(self.call(self.model, batch[0], batch[1]))
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.model, self.optimizer_name, schedule=self.schedule, **self.optimizer_kwargs)
