"""Per-head diagnostics of a CM step: how big each factor's step was, and the composed update.

All functions take the kernel layout (``A``, ``dA``: ``(L, H, d, D)``; ``B``, ``dB``:
``(L, Hkv, d, D)``) and return ``(L, H)`` / ``(L, Hkv)`` float32 tensors on the CPU.
"""

from __future__ import annotations

import torch

__all__ = ["head_opnorm", "composed_opnorm", "pair_stats"]


def head_opnorm(x: torch.Tensor) -> torch.Tensor:
    """Spectral norm of every head block."""
    return torch.linalg.matrix_norm(x.float(), 2)


def composed_opnorm(A, B, dA, dB) -> torch.Tensor:
    """``||dA_h^T B_g + A_h^T dB_g||_op`` per query head: the first-order change of ``M_h``.

    ``M_h``'s change is ``X^T Y`` with ``X = [dA_h; A_h]``, ``Y = [B_g; dB_g]`` (``2d x D``); with
    ``X^T = Q_1 R_1`` and ``Y^T = Q_2 R_2`` its norm is that of the ``2d x 2d`` ``R_1 R_2^T``.
    """
    G = A.size(1) // B.size(1)
    Bg, dBg = (t.float().repeat_interleave(G, dim=1) for t in (B, dB))
    X = torch.cat([dA.float(), A.float()], dim=-2)
    Y = torch.cat([Bg, dBg], dim=-2)
    R1 = torch.linalg.qr(X.mT, mode="r").R
    R2 = torch.linalg.qr(Y.mT, mode="r").R
    return torch.linalg.matrix_norm(R1 @ R2.mT, 2)


def pair_stats(A, B, dA, dB, kind: str = "qk") -> dict:
    """``{"q_step"|"o_step": (L, H), "k_step"|"v_step": (L, Hkv), "composed": (L, H)}`` on the CPU."""
    a, b = ("q", "k") if kind == "qk" else ("o", "v")
    return {
        f"{a}_step": head_opnorm(dA).cpu(),
        f"{b}_step": head_opnorm(dB).cpu(),
        "composed": composed_opnorm(A, B, dA, dB).cpu(),
    }
