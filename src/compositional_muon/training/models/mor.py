"""Mixture-of-Recursions (Bae et al., arXiv:2507.10524), expert-choice routing.

A shared stack of ``n_layer`` blocks is applied ``n_recursions`` times. Before recursion ``r`` a
router (one bias-free ``Linear(n_embd, 1)`` per recursion) scores the tokens that survived
recursion ``r-1``; ``g = sigmoid(router(x)) * router_alpha``. Each sequence keeps its top
``floor(capacity_r * T)`` tokens (default ``capacity_r = (N_r - r) / N_r``), the stack runs on
them in their original order with causal attention among them (RoPE at their original
positions), and the result is written back as in the paper, ``x_sel <- x_sel + g * Stack(x_sel)``.
The auxiliary loss is the BCE between the router logits and the top-k membership of the candidates.

``sharing="middle_cycle"`` adds a unique first and a unique last block that see every token;
``"cycle"`` has only the shared stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BaseConfig, Block, LanguageModel, _check_float, _check_int, rms_norm

__all__ = ["MoRConfig", "MoR"]


@dataclass
class MoRConfig(BaseConfig):
    """``n_layer``: blocks in the shared stack; ``n_recursions``: its applications (N_r).
    ``capacities``: fraction of the sequence kept at each recursion (non-increasing, in (0, 1];
    None: ``(N_r - r) / N_r``). ``router_alpha``: scale of the sigmoid gate. ``aux_loss_weight``:
    weight of the router BCE. ``eval_routing``: ``"topk"`` (same as training) or ``"threshold"``
    (eval mode only: keep a surviving token iff ``sigmoid(logit) >= 0.5``, which is causal)."""

    n_layer: int = 1
    n_recursions: int = 3
    sharing: str = "middle_cycle"
    capacities: tuple | None = None
    router_alpha: float = 0.1
    aux_loss_weight: float = 0.001
    eval_routing: str = "topk"

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "n_recursions")
        if self.sharing not in ("cycle", "middle_cycle"):
            raise ValueError(f"MoRConfig.sharing must be 'cycle' or 'middle_cycle', got {self.sharing!r}")
        if self.eval_routing not in ("topk", "threshold"):
            raise ValueError(f"MoRConfig.eval_routing must be 'topk' or 'threshold', got {self.eval_routing!r}")
        _check_float(self, "router_alpha")
        _check_float(self, "aux_loss_weight", lo_open=False)
        N = self.n_recursions
        if self.capacities is None:
            self.capacities = tuple((N - r) / N for r in range(N))
        caps = tuple(self.capacities)
        if len(caps) != N or any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1 for c in caps
        ):
            raise ValueError(f"MoRConfig.capacities must be {N} numbers in (0, 1], got {self.capacities!r}")
        if any(a < b for a, b in zip(caps, caps[1:])):
            raise ValueError(f"MoRConfig.capacities must be non-increasing (hierarchical routing), got {caps}")
        self.capacities = tuple(float(c) for c in caps)


class MoR(LanguageModel):
    """``embed -> [first] -> N_r routed recursions of the shared stack -> [last] -> RMSNorm -> lm_head``.

    ``forward`` returns ``CE + aux_loss_weight * sum_r BCE_r`` in training mode (``CE`` alone in
    eval mode); ``model.last_losses`` has ``ce``, ``router_bce`` and the fraction of tokens each
    recursion processed (``frac_r``).
    """

    def __init__(self, config: MoRConfig | None = None):
        config = MoRConfig() if config is None else config
        if not isinstance(config, MoRConfig):
            raise TypeError(f"MoR needs a MoRConfig, got {type(config).__name__}")
        super().__init__(config)
        mid = config.sharing == "middle_cycle"
        self.first = Block(config) if mid else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))  # the shared stack
        self.last = Block(config) if mid else None
        self.routers = nn.ModuleList(nn.Linear(config.n_embd, 1, bias=False) for _ in range(config.n_recursions))
        self._init_weights(depth=config.n_layer * config.n_recursions + 2 * mid)

    def _stack(self, x, pos, attn_mask=None):
        for blk in self.blocks:
            x = blk(x, pos, attn_mask)
        return x

    def _k(self, r: int, T: int) -> int:
        return max(1, math.floor(self.config.capacities[r] * T + 1e-9))

    def _recurse_topk(self, x, pos):
        """Expert-choice recursions (training, and eval with ``eval_routing="topk"``)."""
        B, T, D = x.shape
        active = None  # (B, n) sorted positions of the candidates; None = every position
        bce, fracs = x.new_zeros(()), []
        for r, router in enumerate(self.routers):
            cand = x if active is None else x.gather(1, active[..., None].expand(-1, -1, D))
            logits = router(cand).squeeze(-1)  # (B, n)
            k = self._k(r, T)
            top = logits.topk(k, dim=1).indices.sort(dim=1).values  # sigmoid is monotone: same top-k as g
            if self.training:
                member = torch.zeros_like(logits).scatter_(1, top, 1.0)
                bce = bce + F.binary_cross_entropy_with_logits(logits.float(), member.float())
            sel = top if active is None else active.gather(1, top)  # positions in the full sequence
            g = torch.sigmoid(logits.gather(1, top)) * self.config.router_alpha
            idx = sel[..., None].expand(-1, -1, D)
            xs = x.gather(1, idx)
            out = self._stack(xs, sel)  # causal attention among the selected tokens
            x = x.scatter_add(1, idx, (g[..., None] * out).to(x.dtype))
            active = sel
            fracs.append(k / T)
        return x, bce, fracs

    def _recurse_threshold(self, x, pos):
        """Causal routing for eval: a surviving token continues iff its router says so."""
        B, T, D = x.shape
        active = torch.ones(B, T, dtype=torch.bool, device=x.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        fracs = []
        for r, router in enumerate(self.routers):
            logits = router(x).squeeze(-1)
            if self.config.capacities[r] < 1:
                active = active & (logits >= 0)  # sigmoid(logit) >= 0.5
            # attend to the selected earlier tokens; the diagonal keeps unselected rows finite
            mask = ((causal & active[:, None, :]) | eye)[:, None]
            out = self._stack(x, pos, mask)
            g = torch.sigmoid(logits) * self.config.router_alpha
            x = torch.where(active[..., None], x + (g[..., None] * out).to(x.dtype), x)
            fracs.append(active.float().mean().item())
        return x, x.new_zeros(()), fracs

    def forward(self, idx, targets=None):
        """``idx``, ``targets``: ``(B, T)``. Returns ``(logits, loss)`` as described on the class."""
        x, pos = self._embed(idx, targets)
        if self.first is not None:
            x = self.first(x, pos)
        if not self.training and self.config.eval_routing == "threshold":
            x, bce, fracs = self._recurse_threshold(x, pos)
        else:
            x, bce, fracs = self._recurse_topk(x, pos)
        if self.last is not None:
            x = self.last(x, pos)
        logits, ce = self._logits_loss(rms_norm(x), targets)
        if ce is None:
            return logits, None
        loss = ce + self.config.aux_loss_weight * bce if self.training else ce
        vals = torch.stack([loss.detach(), ce.detach(), bce.detach()]).tolist()
        self.last_losses = dict(zip(("loss", "ce", "router_bce"), vals))
        self.last_losses.update({f"frac_{r}": f for r, f in enumerate(fracs)})
        return logits, loss
