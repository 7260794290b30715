"""AdamW for the parameters an orthogonalized optimizer leaves out (embeddings, heads, gains, biases)."""

from __future__ import annotations

import math

import torch

__all__ = ["adamw_step", "adamw_state_dtype", "ADAMW_DEFAULTS"]

# MuonWithAuxAdam's defaults for the auxiliary AdamW groups.
ADAMW_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


def adamw_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the AdamW moments (and of the update math) for a parameter of ``param_dtype``.

    float16 parameters get float32 moments: in float16 the default ``eps`` (1e-10) and small
    ``v = (1 - b2) g^2`` underflow to 0 and ``m / (sqrt(v) + eps)`` becomes inf/NaN on the first step.
    bfloat16 has float32's exponent range and keeps its moments in bfloat16, as ``torch.optim.AdamW``.
    """
    return torch.float32 if param_dtype == torch.float16 else param_dtype


@torch.no_grad()
def adamw_step(params, grads, states, *, lr: float, betas, eps: float, weight_decay: float) -> None:
    """One decoupled-weight-decay Adam step, in place, with bias correction.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, ``p <- (1 - lr wd) p - lr m_hat / (sqrt(v_hat) + eps)``.
    ``states`` are the parameters' state dicts (``exp_avg``, ``exp_avg_sq``, ``step`` created on first use),
    kept in :func:`adamw_state_dtype`; the update is computed in that dtype and rounded once into ``p``.
    """
    b1, b2 = betas
    for p, g, st in zip(params, grads, states):
        work = adamw_state_dtype(p.dtype)
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=work, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=work, memory_format=torch.preserve_format)
        if work != p.dtype:  # float16 moments (an older checkpoint) move up to float32
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = st[key].to(work)
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
        if m.dtype == p.dtype:
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        else:  # low-precision parameter: the step in the moments' precision, rounded once
            p.add_(denom.reciprocal_().mul_(m).mul_(-lr / (1 - b1**t)).to(p.dtype))
