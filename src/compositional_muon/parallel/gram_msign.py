"""msign of a column-sharded wide matrix from its all-reduced Gram (no gather of the matrix)."""

from __future__ import annotations

import torch

from ..msign import MSIGN_EPS, msign_schedule
from ..msign_gram import gram_poly_factor

__all__ = ["gram_msign"]


def gram_msign(
    X: torch.Tensor, S: torch.Tensor, n: int, backend: str = "polar_express", steps: int | None = None
) -> torch.Tensor:
    """``msign`` of a wide matrix ``[X_1 | ... | X_W]`` (``m x n``, ``m <= n``) whose column blocks
    live on different ranks, from its Gram ``S = sum_r X_r X_r^T`` (``m x m``, all-reduced):
    returns this rank's columns ``Q X`` of the result.

    The iterative backends act on ``y = X / (||X||_F s)`` as ``y <- (a I + b A + c A^2) y`` with
    ``A = y y^T``; every step is a polynomial in the Gram, so ``msign(X) = Q(S) X`` where ``Q`` is
    obtained by running the iteration on ``S`` alone (``A <- P A P``, ``Q <- P Q``), in float64,
    with the schedule of :func:`~compositional_muon.msign.msign_schedule` (the one ``msign`` runs).
    ``"svd"`` uses ``Q = U diag(1/sigma) U^T`` from ``eigh(S)`` with the SVD backend's rank cut.
    Only ``m x m`` numbers cross the network per matrix."""
    m = X.size(-2)
    if m > n:
        raise ValueError(f"gram_msign needs a wide matrix (m <= n), got m={m}, n={n}")
    Sd = S.to(torch.float64)
    Sd = 0.5 * (Sd + Sd.mT)
    if backend == "svd":
        Q = _svd_factor(Sd, X.dtype, m, n)
    else:
        Q = _poly_factor(Sd, backend, steps)
    return (Q.to(X.dtype) @ X) if X.dtype == torch.float64 else (Q.to(torch.float32) @ X.to(torch.float32)).to(X.dtype)


def _svd_factor(Sd: torch.Tensor, dtype: torch.dtype, m: int, n: int) -> torch.Tensor:
    lam, U = torch.linalg.eigh(Sd)
    sig = lam.clamp_min(0).sqrt()
    eps = torch.finfo(dtype if dtype in (torch.float32, torch.float64) else torch.float32).eps
    tol = sig.amax(-1, keepdim=True) * max(m, n) * eps
    keep = (sig > tol) & (sig > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, sig, torch.ones_like(sig)), torch.zeros_like(sig))
    return (U * inv.unsqueeze(-2)) @ U.mT


def _poly_factor(Sd: torch.Tensor, backend: str, steps: int | None) -> torch.Tensor:
    sched = msign_schedule(backend, steps)
    norm = Sd.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()[..., None, None]
    s0 = 1.0 / (norm * sched.norm_scale + MSIGN_EPS)
    return gram_poly_factor(Sd * s0 * s0, sched.coeffs) * s0
