"""Partner Grams and their ridge-regularized inverse square roots.

For a stack of head blocks ``W`` of shape ``(..., d, D)`` (nn.Linear rows of one head) the
partner Gram is ``W W^T`` (``d x d``) and CM needs ``C^{-1} = (W W^T + lam I)^{-1/2}``.

Two paths:

* ``"eigh"``: exact, ``C^{-1} = U diag((max(s, 0) + lam)^{-1/2}) U^T`` from a symmetric
  eigendecomposition (computed in at least float32; float64 inputs stay float64). The
  eigendecomposition can be reused (gauge connections need it, see ``connection.py``).
* ``"newton"``: matmul-only coupled Newton-Schulz iteration (Higham's stable coupled form),
  ``Y0 = A / s, Z0 = I, T = (3 I - Z Y) / 2, Y <- Y T, Z <- T Z`` with ``A = G + lam I`` and
  ``s = ||A||_F``; ``Z -> (A / s)^{-1/2}``. Every eigenvalue ``x`` of ``Z Y`` follows
  ``x <- x (3 - x)^2 / 4``: it grows about 2.25x per step while small, then converges
  quadratically, so ``iters`` must exceed ``log(s / lam_min(A)) / log(2.25)`` plus ~5. The default
  (24) covers condition numbers up to about 1e7. Suited to accelerators (no eigensolver).

``"auto"`` picks ``"eigh"`` on CPU and ``"newton"`` on other devices.

:func:`inverse_cholesky_factor` gives the non-symmetric whitening factor ``L^{-1}`` of
``G + lam I = L L^T``; CM uses it where the update only depends on the root up to a left
orthogonal factor (see ``cm._partner_roots``). Measured on a 2-core CPU (``docs/performance.md``):
for 144 Grams of 64 x 64, batched Cholesky + triangular solve ~10 ms, ``eigh`` ~50 ms, the
24-step Newton iteration ~0.4 s.
"""

from __future__ import annotations

import torch

__all__ = [
    "partner_gram",
    "inverse_sqrt",
    "inverse_sqrt_eigh",
    "inverse_sqrt_newton",
    "gram_eigh",
    "inverse_cholesky_factor",
    "ROOT_METHODS",
]

ROOT_METHODS = ("auto", "eigh", "newton")
NEWTON_ITERS = 24


def partner_gram(w: torch.Tensor) -> torch.Tensor:
    """``W W^T`` for head blocks ``w`` of shape ``(..., d, D)``; returns ``(..., d, d)``."""
    return w @ w.mT


def _work_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def gram_eigh(g: torch.Tensor):
    """Eigendecomposition ``g = U diag(s) U^T`` of symmetric PSD ``g``, eigenvalues clamped at 0."""
    work = g.to(_work_dtype(g))
    work = 0.5 * (work + work.mT)
    s, U = torch.linalg.eigh(work)
    return s.clamp_min(0.0), U


def _inv_sqrt_from_eigh(s: torch.Tensor, U: torch.Tensor, lam: float) -> torch.Tensor:
    return (U * (s + lam).rsqrt().unsqueeze(-2)) @ U.mT


def inverse_sqrt_eigh(g: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact ``(g + lam I)^{-1/2}`` via ``torch.linalg.eigh``; returns ``g.dtype``."""
    s, U = gram_eigh(g)
    return _inv_sqrt_from_eigh(s, U, lam).to(g.dtype)


def inverse_sqrt_newton(g: torch.Tensor, lam: float, iters: int = NEWTON_ITERS) -> torch.Tensor:
    """``(g + lam I)^{-1/2}`` by the coupled Newton-Schulz iteration (matmuls only)."""
    if iters < 1:
        raise ValueError(f"`iters` must be >= 1, got {iters}")
    d = g.size(-1)
    eye = torch.eye(d, dtype=_work_dtype(g), device=g.device)
    a = g.to(eye.dtype) + lam * eye
    s = torch.linalg.matrix_norm(a, keepdim=True).clamp_min(torch.finfo(eye.dtype).tiny)
    y = a / s
    z = eye.expand_as(a)
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y = y @ t
        z = t @ z
    return (z * s.rsqrt()).to(g.dtype)


def inverse_cholesky_factor(g: torch.Tensor, lam: float) -> torch.Tensor:
    """``L^{-1}`` (lower triangular) for the Cholesky factorization ``g + lam I = L L^T`` of each
    symmetric PSD ``g`` (``(..., d, d)``; only its lower triangle is read). Computed in at least
    float32. ``L^{-1}`` whitens like ``(g + lam I)^{-1/2}`` up to a left orthogonal factor:
    ``L^{-T} L^{-1} = (g + lam I)^{-1}``. Matrices that are not numerically positive definite
    (a singular Gram with ``lam = 0``) give NaN, as the eigh root gives inf/NaN there."""
    work = _work_dtype(g)
    eye = torch.eye(g.size(-1), dtype=work, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g.to(work) + lam * eye)
    inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return torch.where((info != 0)[..., None, None], torch.full_like(inv, float("nan")), inv)


def inverse_sqrt(g: torch.Tensor, lam: float, method: str = "auto", iters: int = NEWTON_ITERS) -> torch.Tensor:
    """``(g + lam I)^{-1/2}`` for a batch of symmetric PSD matrices ``g`` of shape ``(..., d, d)``."""
    if g.ndim < 2 or g.size(-1) != g.size(-2):
        raise ValueError(f"inverse_sqrt expects square matrices (..., d, d), got shape {tuple(g.shape)}")
    if lam < 0:
        raise ValueError(f"ridge `lam` must be >= 0, got {lam}")
    if method == "auto":
        method = "eigh" if g.device.type == "cpu" else "newton"
    if method == "eigh":
        return inverse_sqrt_eigh(g, lam)
    if method == "newton":
        return inverse_sqrt_newton(g, lam, iters)
    raise ValueError(f"unknown inverse-root method {method!r}; expected one of {ROOT_METHODS}")
