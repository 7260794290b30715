"""Mano: tangent projection and rotating Oblique-manifold normalization instead of an msign.

Gu, Xie, "Mano: Restriking Manifold Optimization for LLM Training", arXiv:2601.23000 (Algorithm 1).
For a weight ``W`` of shape ``m x n`` (``nn.Linear`` layout; conv weights flattened to
``out x (in*kh*kw)``) at the parameter's ``t``-th update (``t = 0, 1, ...``)::

    M_t   = mu M_{t-1} + G_t                         heavy-ball momentum (Nesterov optional)
    k     = t mod 2                                  k = 0: columns (torch dim 0), k = 1: rows (dim 1)
    W^    = W / ||W||_{2,k}                           each column (k=0) or row (k=1) to unit norm
    V     = M - W^ * <M, W^>_k                        tangent projection, per column / row
    V^    = V / ||V||_{2,k}                           back onto the Oblique manifold
    W_t   = W - lr (0.2 sqrt(n_k) V^ + wd W)          n_k = length of the normalized vectors (m or n)

Norms are clamped below at ``eps`` (1e-8) as in the authors' code. The first update normalizes
columns, as the released code does (its step counter starts at 0). ``version=2`` selects the
authors' later "Mano v2" (README, 2026-03-14): the projection uses the raw ``W`` instead of ``W^``,
``eps`` is added to the norm instead of clamping it, and Nesterov momentum is recommended
(``nesterov=None`` resolves to False for version 1, True for version 2).
"""

from __future__ import annotations

import math

import torch

from ..buckets import DEFAULT_BUCKET_BYTES
from ..muon import as_matrix
from ..ops import decoupled_add
from ..routing import RoutedOptimizer
from .adamuon import heavy_ball_momentum

__all__ = ["Mano", "mano_direction"]


def mano_direction(M: torch.Tensor, W: torch.Tensor, k: int, eps: float = 1e-8, *, version: int = 1) -> torch.Tensor:
    """The scaled Mano direction ``0.2 sqrt(n_k) V^`` (arXiv:2601.23000, Algorithm 1, lines 4-7).

    ``M`` (momentum or Nesterov direction) and ``W`` are ``(..., m, n)``; ``k = t mod 2`` picks the
    axis (0: normalize each column, over the ``m`` rows; 1: each row). The caller applies
    ``W <- W - lr (U + wd W)``. Pure; works in float32 at least.
    """
    if k not in (0, 1):
        raise ValueError(f"k must be 0 (columns) or 1 (rows), got {k!r}")
    if version not in (1, 2):
        raise ValueError(f"unknown Mano version {version!r}; expected 1 or 2")
    wd = torch.promote_types(torch.promote_types(M.dtype, W.dtype), torch.float32)
    M, W = M.to(wd), W.to(wd)
    dim = M.ndim - 2 + k
    if version == 1:
        W = W / torch.linalg.vector_norm(W, dim=dim, keepdim=True).clamp_min(eps)
    V = M - W * (M * W).sum(dim=dim, keepdim=True)
    vn = torch.linalg.vector_norm(V, dim=dim, keepdim=True)
    V = V / (vn.clamp_min(eps) if version == 1 else vn + eps)
    return V * (0.2 * math.sqrt(M.shape[dim]))


class Mano(RoutedOptimizer):
    """Mano (arXiv:2601.23000, Algorithm 1) with AdamW for ``use_muon=False`` groups.

    Args: ``lr`` (1e-3), ``momentum`` (mu, 0.95), ``weight_decay`` (0.1, decoupled), ``eps`` (1e-8),
    ``nesterov`` (None: False for version 1, True for version 2), ``version`` (1: the paper's
    Algorithm 1; 2: the authors' Mano v2), ``nonfinite`` ("raise"/"skip"). Defaults are the
    authors' code defaults. No msign: the cost is a few element-wise passes over ``W`` and ``M``.

    Per-parameter state: ``momentum_buffer`` (like ``p``) and ``step`` (int, the number of Mano
    updates of this parameter; its parity picks the normalization axis). The released code counts
    steps per param group instead; the two agree whenever every parameter gets a gradient each step.
    """

    matrix_defaults = dict(lr=1e-3, momentum=0.95, nesterov=False, weight_decay=0.1, eps=1e-8, version=1)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        nesterov: bool | None = None,
        version: int = 1,
        *,
        nonfinite: str = "raise",
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        if nesterov is None:
            nesterov = version == 2
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eps=eps, version=version),
            nonfinite=nonfinite,
            distributed=distributed,
            bucket_bytes=bucket_bytes,
        )

    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        for p in params:
            buf = self._state_buffer(p, "momentum_buffer")
            st = self.state[p]
            st.setdefault("step", 0)
            d = heavy_ball_momentum(buf, p.grad, group["momentum"], group["nesterov"])
            u = mano_direction(as_matrix(d), as_matrix(p), st["step"] % 2, group["eps"], version=group["version"])
            st["step"] += 1
            decoupled_add(p, u.reshape(p.shape), lr * wd, alpha=-lr)
