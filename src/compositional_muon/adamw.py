"""AdamW for the parameters an orthogonalized optimizer leaves out (embeddings, heads, gains, biases)."""

from __future__ import annotations

import math

import torch

__all__ = ["adamw_step", "ADAMW_DEFAULTS"]

# MuonWithAuxAdam's defaults for the auxiliary AdamW groups.
ADAMW_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


@torch.no_grad()
def adamw_step(params, grads, states, *, lr: float, betas, eps: float, weight_decay: float) -> None:
    """One decoupled-weight-decay Adam step, in place, with bias correction.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, ``p <- (1 - lr wd) p - lr m_hat / (sqrt(v_hat) + eps)``.
    ``states`` are the parameters' state dicts (``exp_avg``, ``exp_avg_sq``, ``step`` created on first use).
    """
    b1, b2 = betas
    for p, g, st in zip(params, grads, states):
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        t = int(st["step"].item())
        m, v = st["exp_avg"], st["exp_avg_sq"]
        g = g.to(m.dtype)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        # bias corrections folded into scalars: one temporary (denom) per parameter
        denom = v.sqrt().div_(math.sqrt(1 - b2**t)).add_(eps)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1**t))
