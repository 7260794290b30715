"""MoEGPT: the GPT decoder with a top-k mixture-of-experts MLP in every block.

Each block's MLP is replaced by ``n_experts`` ReLU^2 (or GELU) experts whose weights are stored as
two 3-D parameters, ``up`` ``(E, hidden, D)`` and ``down`` ``(E, D, hidden)`` (nn.Linear layout per
expert, as transformers' Mixtral and torchtitan store them). A bias-free ``router``
(``Linear(D, E)``) scores every token; the top ``top_k`` experts (softmax over the chosen logits)
process it and their outputs are summed with those weights. The Switch-Transformer balancing loss
``aux = E * sum_e f_e P_e`` (``f_e`` the fraction of the token-to-expert assignments that go to
``e``, ``P_e`` the mean router probability of ``e``; 1 when perfectly balanced) is added with
weight ``aux_loss_weight``. The expert module declares ``tensor_layouts`` so the optimizers
(:func:`compositional_muon.mark_layouts`) orthogonalize each expert on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BaseConfig, CausalSelfAttention, LanguageModel, _check_float, _check_int, rms_norm

__all__ = ["MoEGPTConfig", "MoEGPT", "Experts", "MoE"]


@dataclass
class MoEGPTConfig(BaseConfig):
    """``n_experts`` (E), ``top_k`` experts per token, ``aux_loss_weight`` of the balancing loss;
    each expert's hidden size is ``mlp_ratio * n_embd``."""

    n_experts: int = 4
    top_k: int = 2
    aux_loss_weight: float = 0.01
    mlp_ratio: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "n_experts")
        _check_int(self, "top_k")
        _check_float(self, "aux_loss_weight", lo=0.0, lo_open=False)
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEGPTConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}")


class Experts(nn.Module):
    """``E`` experts ``down_e(act(up_e x))`` stored as ``up`` ``(E, hidden, D)``, ``down`` ``(E, D, hidden)``."""

    tensor_layouts = {"up": "experts", "down": "experts"}

    def __init__(self, E: int, D: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.up = nn.Parameter(torch.empty(E, hidden, D))
        self.down = nn.Parameter(torch.empty(E, D, hidden))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.up[e].T
        h = F.relu(h).square() if self.act == "relu2" else F.gelu(h)
        return h @ self.down[e].T


class MoE(nn.Module):
    """Top-k routed experts; ``forward`` returns ``(y, aux)`` with the balancing loss ``aux``."""

    def __init__(self, cfg: MoEGPTConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.n_embd, cfg.hidden_dim, cfg.mlp_act)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(-1).to(x.dtype)
        y = torch.zeros_like(x)
        E = probs.size(-1)
        for e in range(E):
            tok, slot = (top_idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y.index_add_(0, tok, self.experts.forward_expert(e, x[tok]) * weights[tok, slot, None])
        frac = F.one_hot(top_idx, E).float().sum((0, 1)) / top_idx.numel()
        aux = E * (frac * probs.mean(0)).sum()
        return y.reshape(shape), aux


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEGPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.moe = MoE(cfg)

    def forward(self, x, pos=None):
        x = x + self.attn(rms_norm(x), pos)
        y, aux = self.moe(rms_norm(x))
        return x + y, aux


class MoEGPT(LanguageModel):
    """``embed -> n_layer x (attention, MoE) -> RMSNorm -> lm_head``; loss = CE + weight * mean aux."""

    def __init__(self, config: MoEGPTConfig | None = None):
        config = MoEGPTConfig() if config is None else config
        if not isinstance(config, MoEGPTConfig):
            raise TypeError(f"MoEGPT needs a MoEGPTConfig, got {type(config).__name__}")
        super().__init__(config)
        blocks = [MoEBlock(config) for _ in range(config.n_layer)]
        self.blocks = nn.ModuleList(blocks)
        self._init_weights(depth=config.n_layer)
        # experts as the dense MLP: normal(0.02) in, residual-scaled (or zero) out
        for b in blocks:
            nn.init.normal_(b.moe.experts.up, std=0.02)
            if config.zero_init_o:
                nn.init.zeros_(b.moe.experts.down)
            else:
                nn.init.normal_(b.moe.experts.down, std=0.02 / (2 * config.n_layer) ** 0.5)

    def forward(self, idx, targets=None):
        """``(logits, CE + aux_loss_weight * mean balancing loss)``; parts in ``last_losses``."""
        x, pos = self._embed(idx, targets)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, pos)
            auxes.append(aux)
        logits, ce = self._logits_loss(rms_norm(x), targets)
        if ce is None:
            return logits, None
        aux = torch.stack(auxes).mean()
        loss = ce + self.config.aux_loss_weight * aux
        vals = torch.stack((loss.detach(), ce.detach(), aux.detach())).tolist()
        self.last_losses = dict(zip(("loss", "ce", "aux"), vals))
        return logits, loss
