"""Hugging Face transformers: CompositionalMuon (or Muon) for a ``PreTrainedModel`` and the
``Trainer`` hooks.

    from compositional_muon.integrations.hf import trainer_optimizer_kwargs
    trainer = Trainer(model=model, args=args, train_dataset=ds, **trainer_optimizer_kwargs(lr=0.02))

or build it yourself and pass ``optimizers=(build_optimizer(model), None)`` (the Trainer then makes
its usual lr schedule around it). Head counts come from ``model.config`` (``head_dim``,
``num_attention_heads``, ``num_key_value_heads``; GPT-2's ``n_head``): Llama, Qwen2, Mistral, Gemma
(``head_dim`` != hidden/heads), GPT-2 (fused transposed ``Conv1D``) and GQA/MQA. Tied input/output
embeddings are one tensor: it is stepped once, by AdamW. The Trainer saves this optimizer's
``state_dict`` in ``optimizer.pt`` and ``resume_from_checkpoint`` restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import AttentionSpec, find_attention
from ._common import OptimizerChoice, build_for_model

__all__ = [
    "HFHeads",
    "hf_heads",
    "hf_attention",
    "build_optimizer",
    "CompositionalMuonFactory",
    "trainer_optimizer_kwargs",
]


@dataclass(frozen=True)
class HFHeads:
    """Attention geometry read from a transformers config."""

    head_dim: int
    num_heads: int
    num_kv_heads: int
    num_layers: int


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"expected a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hf_heads(model: nn.Module) -> HFHeads:
    """Head size and counts of ``model`` from its config (``text_config`` for multimodal models)."""
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not heads or not layers:
        raise ValueError(f"{type(cfg).__name__} has no num_attention_heads / num_hidden_layers")
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden else None)
    if not head_dim:
        raise ValueError(f"{type(cfg).__name__}: cannot tell the head size (no head_dim or hidden_size)")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return HFHeads(int(head_dim), int(heads), int(kv), int(layers))


def hf_attention(model: nn.Module) -> list[AttentionSpec]:
    """One :class:`AttentionSpec` per decoder layer, with the config's head counts. Raises
    ValueError when fewer attention layers are found than the config has layers."""
    h = hf_heads(model)
    specs = find_attention(model, head_dim=h.head_dim, num_heads=h.num_heads, num_kv_heads=h.num_kv_heads)
    if len(specs) < h.num_layers:
        raise ValueError(
            f"found {len(specs)} attention layers in {type(model).__name__} but its config has "
            f"{h.num_layers}; pass the layers yourself (CompositionalMuon.from_model(attention=...))"
        )
    return specs


def _embeddings(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            out.append(w)
    return out


def build_optimizer(model: nn.Module, optimizer: str = "cm", **kwargs: Any) -> torch.optim.Optimizer:
    """CompositionalMuon (``optimizer="cm"``) or Muon + AdamW (``"muon"``) for a transformers model.

    ``kwargs``: the :class:`~compositional_muon.integrations.OptimizerChoice` fields (``lr``,
    ``muon_lr``, ``adamw_lr``, ``weight_decay``, ``adamw_weight_decay``, ``momentum``,
    ``adamw_betas``) and, for "cm", CM group options (``lam``, ``method``, ``msign_dtype``...).
    The input and output embeddings always go to AdamW (stepped once when tied)."""
    fields = set(OptimizerChoice.__dataclass_fields__) - {"name", "options"}
    choice = OptimizerChoice(
        name=optimizer,
        **{k: v for k, v in kwargs.items() if k in fields},
        options={k: v for k, v in kwargs.items() if k not in fields},
    )
    specs = hf_attention(model) if optimizer == "cm" else []
    return build_for_model(model, choice, attention=specs, adamw_params=_embeddings(model))


class CompositionalMuonFactory:
    """The factory form of ``Trainer(optimizer_cls_and_kwargs=(CompositionalMuonFactory, kwargs))``:
    transformers instantiates it without arguments and calls it with the model and ``kwargs``
    (see :func:`build_optimizer`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise TypeError(
                "this transformers version calls optimizer classes with parameter lists, not factories; "
                "pass Trainer(optimizers=(build_optimizer(model, ...), None)) instead"
            )

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return build_optimizer(model, **kwargs)


def trainer_optimizer_kwargs(optimizer: str = "cm", **kwargs: Any) -> dict[str, Any]:
    """``Trainer(**trainer_optimizer_kwargs(lr=0.02))``: the ``optimizer_cls_and_kwargs`` argument."""
    return {"optimizer_cls_and_kwargs": (CompositionalMuonFactory, dict(optimizer=optimizer, **kwargs))}
