"""GPT: a standard pre-norm decoder of ``n_layer`` blocks (RMSNorm, RoPE, GQA, ReLU^2 or GELU MLP)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import BaseConfig, Block, LanguageModel, rms_norm

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig(BaseConfig):
    """All fields are those of :class:`~compositional_muon.training.models.layers.BaseConfig`."""


class GPT(LanguageModel):
    """``embed -> n_layer x Block -> RMSNorm -> lm_head``."""

    def __init__(self, config: GPTConfig | None = None):
        config = GPTConfig() if config is None else config
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        super().__init__(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self._init_weights(depth=config.n_layer)

    def forward(self, idx, targets=None):
        """``idx``, ``targets``: ``(B, T)`` token ids. Returns ``(logits (B, T, V), mean CE or None)``."""
        x, pos = self._embed(idx, targets)
        for block in self.blocks:
            x = block(x, pos)
        logits, loss = self._logits_loss(rms_norm(x), targets)
        if loss is not None:
            v = loss.item()
            self.last_losses = {"loss": v, "ce": v}
        return logits, loss
