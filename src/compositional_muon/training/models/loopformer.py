"""LoopFormer (Jeddi, Ciccone, Taati, arXiv:2602.11451): one shared stack of ``n_layer`` blocks
applied along a time schedule, each loop conditioned on its time ``t`` and step size ``dt``
through adaLN modulation, trained with shortcut consistency between a long and a short trajectory.

A schedule is a list of step sizes summing to 1. Loop ``i`` runs the whole stack with
``c = TimeEmb(t) + DtEmb(dt)`` and then sets ``t <- t + dt`` (``t`` starts at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, BaseConfig, CausalSelfAttention, LanguageModel, _check_float, _check_int, rms_norm

__all__ = ["LoopFormerConfig", "LoopFormer", "sinusoidal_features"]


@dataclass
class LoopFormerConfig(BaseConfig):
    """``n_layer`` blocks in the shared stack, looped ``n_loops`` times (``n_loops`` equal steps of
    ``1/n_loops`` is the long trajectory). ``eval_loops``: equal steps used in eval mode and for
    generation (None: ``n_loops``). ``short_trajectory``: ``"random"`` (step sizes are random
    multiples of ``1/n_loops``, as in the authors' code) or ``"equal"`` (equal steps).
    ``short_weight`` and ``consistency_weight`` weigh the short trajectory's CE and the MSE between
    the final hidden states. ``time_freq_dim``: size of the sinusoidal features of ``t`` and ``dt``."""

    n_layer: int = 1
    n_loops: int = 8
    eval_loops: int | None = None
    short_trajectory: str = "random"
    short_weight: float = 0.1
    consistency_weight: float = 0.1
    time_freq_dim: int = 256

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "n_loops")
        _check_int(self, "time_freq_dim", minimum=2)
        if self.time_freq_dim % 2:
            raise ValueError(f"LoopFormerConfig.time_freq_dim must be even, got {self.time_freq_dim}")
        if self.eval_loops is not None:
            _check_int(self, "eval_loops")
        if self.short_trajectory not in ("random", "equal"):
            raise ValueError(
                f"LoopFormerConfig.short_trajectory must be 'random' or 'equal', got {self.short_trajectory!r}"
            )
        _check_float(self, "short_weight", lo_open=False)
        _check_float(self, "consistency_weight", lo_open=False)


def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i/(dim/2))``, ``i < dim/2`` (the DiT
    timestep features; ``t`` is used as is, in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[..., None] * freqs
    return torch.cat((ang.cos(), ang.sin()), dim=-1)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar, then ``Linear -> SiLU -> Linear`` to ``n_embd``."""

    def __init__(self, freq_dim: int, n_embd: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, n_embd)
        self.fc2 = nn.Linear(n_embd, n_embd)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(sinusoidal_features(t, self.freq_dim).to(self.fc1.weight.dtype))))


class LoopBlock(nn.Module):
    """Pre-norm block whose (parameter-free) RMSNorms are modulated by ``c``:
    ``x + gate * branch(norm(x) * (1 + scale) + shift)`` for the attention and the MLP branch, with
    ``(shift, scale, gate) x 2 = ada(SiLU(c))`` and ``ada`` zero-initialised."""

    def __init__(self, cfg: LoopFormerConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.ada = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)

    def forward(self, x, c, pos=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1 * self.attn(rms_norm(x) * (1 + sc1) + sh1, pos)
        return x + g2 * self.mlp(rms_norm(x) * (1 + sc2) + sh2)


class LoopFormer(LanguageModel):
    """``embed -> loops of the shared stack -> RMSNorm -> lm_head``.

    ``forward(idx, targets)`` in training mode returns the long trajectory's logits and
    ``CE_long + short_weight * CE_short + consistency_weight * MSE(h_long.detach(), h_short)``;
    the parts are in ``model.last_losses``. In eval mode (or without targets) it runs ``schedule``
    (a list of step sizes summing to 1), else ``eval_loops`` equal steps. The short trajectory is
    drawn from ``model.generator`` (a ``torch.Generator``) when set, else from torch's global RNG.
    """

    def __init__(self, config: LoopFormerConfig | None = None):
        config = LoopFormerConfig() if config is None else config
        if not isinstance(config, LoopFormerConfig):
            raise TypeError(f"LoopFormer needs a LoopFormerConfig, got {type(config).__name__}")
        super().__init__(config)
        self.blocks = nn.ModuleList(LoopBlock(config) for _ in range(config.n_layer))
        self.time_embed = ScalarEmbedder(config.time_freq_dim, config.n_embd)
        self.dt_embed = ScalarEmbedder(config.time_freq_dim, config.n_embd)
        self.generator: torch.Generator | None = None
        self._init_weights(depth=config.n_layer * config.n_loops)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
            if config.zero_init_o:
                # zero o_proj/down_proj already make each block start as the identity; a zero gate on
                # top would leave both without a gradient, so the gates start at 1 instead
                nn.init.ones_(blk.ada.bias[2 * config.n_embd : 3 * config.n_embd])
                nn.init.ones_(blk.ada.bias[5 * config.n_embd :])

    # -- schedules --------------------------------------------------------------------------------
    @staticmethod
    def equal_schedule(n: int) -> list:
        return [1.0 / n] * n

    def sample_short_schedule(self) -> list:
        """A trajectory of ``M`` steps, ``M`` uniform in ``1 .. n_loops-1`` (``[1.0]`` when
        ``n_loops == 1``): equal steps, or a uniformly random split of ``n_loops`` units of
        ``1/n_loops`` into ``M`` positive parts."""
        L = self.config.n_loops
        if L == 1:
            return [1.0]
        M = int(torch.randint(1, L, (1,), generator=self.generator))
        if self.config.short_trajectory == "equal":
            return self.equal_schedule(M)
        cuts = sorted((torch.randperm(L - 1, generator=self.generator)[: M - 1] + 1).tolist())
        edges = [0] + cuts + [L]
        return [(b - a) / L for a, b in zip(edges[:-1], edges[1:])]

    @staticmethod
    def _check_schedule(schedule) -> list:
        try:
            steps = [float(s) for s in schedule]
        except (TypeError, ValueError):
            raise TypeError(f"schedule must be a sequence of step sizes, got {schedule!r}") from None
        if not steps or any(not (s > 0 and math.isfinite(s)) for s in steps) or abs(sum(steps) - 1.0) > 1e-6:
            raise ValueError(f"schedule must be positive step sizes summing to 1, got {steps}")
        return steps

    # -- forward ----------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, pos: torch.Tensor, schedule) -> torch.Tensor:
        """Apply the shared stack along ``schedule``; return the final normalized hidden states."""
        t = 0.0
        for dt in schedule:
            ts = torch.tensor([t, dt], device=x.device)
            c = self.time_embed(ts[0]) + self.dt_embed(ts[1])  # (n_embd,), shared by all tokens
            for blk in self.blocks:
                x = blk(x, c, pos)
            t += dt
        return rms_norm(x)

    def forward(self, idx, targets=None, *, schedule=None):
        """``idx``, ``targets``: ``(B, T)``. Returns ``(logits, loss)`` as described on the class."""
        x, pos = self._embed(idx, targets)
        if self.training and targets is not None:
            if schedule is not None:
                raise ValueError("schedule= is for eval mode; training uses the long and a random short trajectory")
            h_long = self.run(x, pos, self.equal_schedule(self.config.n_loops))
            short = self.sample_short_schedule()
            h_short = self.run(x, pos, short)
            logits, ce_long = self._logits_loss(h_long, targets)
            _, ce_short = self._logits_loss(h_short, targets)
            mse = F.mse_loss(h_short.float(), h_long.detach().float())
            loss = ce_long + self.config.short_weight * ce_short + self.config.consistency_weight * mse
            vals = torch.stack([loss.detach(), ce_long.detach(), ce_short.detach(), mse.detach()]).tolist()
            self.last_losses = dict(zip(("loss", "ce", "ce_short", "consistency"), vals))
            self.last_losses["short_steps"] = float(len(short))
            return logits, loss
        if schedule is None:
            schedule = self.equal_schedule(self.config.eval_loops or self.config.n_loops)
        logits, loss = self._logits_loss(self.run(x, pos, self._check_schedule(schedule)), targets)
        if loss is not None:
            self.last_losses = {"loss": loss.item(), "ce": loss.item()}
        return logits, loss
