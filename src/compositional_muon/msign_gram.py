"""Gram-space evaluation of the polynomial msign iterations (thin matrices, sharded matrices).

For ``X`` (``m x n``, ``m <= n``) every step of an iterative msign backend maps
``y <- P_k y`` with ``P_k = a_k I + b_k A_k + c_k A_k^2`` and ``A_k = y_k y_k^T``. Every ``P_k``
is a polynomial in the Gram ``S = y_0 y_0^T``, so ``y_K = Q y_0`` with the ``m x m`` matrix
``Q = P_{K-1} ... P_0``, and the iteration runs on ``m x m`` matrices alone::

    A_0 = S,  Q_0 = I,   P_k = a_k I + b_k A_k + c_k A_k^2,
    Q_{k+1} = P_k Q_k,   A_{k+1} = P_k A_k P_k   (= Q_{k+1} S Q_{k+1}^T).

In exact arithmetic ``Q y_0`` equals the direct iteration's output. Cost for ``m x n``: one Gram
(``2 m^2 n``), ``K`` steps of at most four ``m x m`` products, one ``Q y_0`` (``2 m^2 n``),
against ``K (4 m^2 n + 2 m^3)`` for the direct iteration: ~3.8x fewer FLOPs at ``64 x 768``
with eight steps, 1.9x at ``64 x 256``.

The iteration is only as accurate as ``S``: a singular value ``sigma`` of the normalized ``y_0``
becomes the eigenvalue ``sigma^2`` of ``S``, so the Gram is formed and the iteration run in
float32 (float64 for float64 inputs): float32 resolves ``sigma / sigma_max`` down to ~3e-4,
below Polar Express's design interval [1e-3, 1], where a bfloat16 Gram would resolve ~6e-2.
``Q`` grows like ``1 / sigma`` on small singular directions, so ``Q y_0`` is formed in that
precision too. A float32 Gram still perturbs the eigenvalues of ``S`` by ~1e-7 (relative), which
for ``sigma ~ 1e-3`` is a relative error of the order of the schedule's own band, so the last step
restarts from the iterate: ``y_{K-1} = Q_{K-1} y_0`` is formed (float32), and the last step runs
directly on it (``y_K = P(y_{K-1} y_{K-1}^T) y_{K-1}``, whose Gram is well conditioned). Measured
on 64 x 768 matrices with ``kappa = 1000``: max ``|sigma_i - 1|`` 8.5e-3 without the restart,
against 3.5e-3 for the direct bfloat16 iteration (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gram_poly_factor", "gram_polynomial_msign", "chunk_size", "step_poly", "CPU_CHUNK_BYTES"]

Tensor = torch.Tensor
CPU_CHUNK_BYTES = 2 << 20  # iterate bytes per chunk on CPU: the m x n work of a chunk stays in cache


def chunk_size(batch: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many ``m x n`` matrices of ``dtype`` one chunk of a batched iteration holds: the whole
    batch off CPU, about :data:`CPU_CHUNK_BYTES` of them on CPU (at least one)."""
    if device.type != "cpu":
        return max(1, batch)
    per = m * n * torch.finfo(dtype).bits // 8
    return max(1, min(batch, CPU_CHUNK_BYTES // max(1, per)))


def step_poly(y: Tensor, a: float, b: float, c: float) -> Tensor:
    """``a I + b A + c A^2`` with ``A = y y^T`` for a batch ``y`` (``(batch, m, n)``)."""
    A = torch.bmm(y, y.mT)
    P = torch.baddbmm(A, A, A, beta=b, alpha=c)
    P.diagonal(dim1=-2, dim2=-1).add_(a)
    return P


def gram_poly_factor(A: Tensor, coeffs: Sequence[tuple[float, float, float]]) -> Tensor:
    """``Q = P_{K-1} ... P_0`` for the normalized Gram ``A`` (``(..., m, m)``, symmetric, spectrum
    in [0, 1]) and the step polynomials ``P_k = a I + b A_k + c A_k^2`` of ``coeffs`` (see the
    module docstring), in ``A``'s dtype. ``A_k`` is re-symmetrized after every step; the last step
    skips the unused ``A_K``."""
    if len(coeffs) < 1:
        raise ValueError("msign needs at least one iteration step")
    Q = A.new_zeros(())
    for k, (a, b, c) in enumerate(coeffs):
        P = b * A + c * (A @ A)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if k == 0 else P @ Q
        if k + 1 < len(coeffs):
            A = P @ A @ P
            A = 0.5 * (A + A.mT)
    return Q


def gram_polynomial_msign(
    x: Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    norm_scale: float,
    eps: float,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> Tensor:
    """The polynomial msign of a wide ``x`` (``(batch, m, n)`` or ``(m, n)``, ``m <= n``) in Gram
    space, all in float32 (float64 if ``x`` or ``dtype`` is; ``dtype`` only picks that): per matrix
    ``y_0 = x / (norm_scale ||x||_F + eps)``, ``Q`` of all steps but the last by
    :func:`gram_poly_factor` on ``S = y_0 y_0^T``, ``y_{K-1} = Q y_0``, then the last step
    directly on ``y_{K-1}`` (the restart of the module docstring); result in ``out_dtype``. The
    direct iteration's normalization and schedule. On CPU the batch runs in cache-sized chunks
    (:func:`chunk_size`); the Grams are formed chunk by chunk, the ``m x m`` iteration batched."""
    m, n = x.shape[-2:]
    if m > n:
        raise ValueError(f"gram_polynomial_msign needs wide matrices (m <= n), got {m} x {n}")
    acc = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32
    xb = x.reshape(-1, m, n)
    norm = torch.linalg.vector_norm(xb, dim=(-2, -1), keepdim=True, dtype=acc)
    inv = torch.reciprocal(norm * norm_scale + eps)
    B = xb.size(0)
    step = chunk_size(B, m, n, acc, x.device)
    *head, (a, b, c) = coeffs
    Q = None
    if head:  # pass 1, chunked: the Grams; then every Q in one batched m x m iteration
        S = torch.empty((B, m, m), dtype=acc, device=x.device)
        y0 = torch.empty((step, m, n), dtype=acc, device=x.device)
        for i in range(0, B, step):
            y = torch.mul(xb[i : i + step], inv[i : i + step], out=y0[: min(step, B - i)])
            torch.bmm(y, y.mT, out=S[i : i + step])
        Q = gram_poly_factor(S, head) * inv  # applied to x itself: no normalized copy in pass 2
    w0 = torch.empty((step, m, n), dtype=acc, device=x.device)
    out = torch.empty((B, m, n), dtype=out_dtype, device=x.device)
    w1 = out if out_dtype == acc else torch.empty_like(w0)
    for i in range(0, B, step):  # pass 2, chunked: y_{K-1} = Q x, then the last step directly
        k = min(step, B - i)
        xk = xb[i : i + k].to(acc)
        w = torch.mul(xk, inv[i : i + k], out=w0[:k]) if Q is None else torch.bmm(Q[i : i + k], xk, out=w0[:k])
        z = torch.bmm(step_poly(w, a, b, c), w, out=w1[i : i + k] if w1 is out else w1[:k])
        if w1 is not out:
            out[i : i + k].copy_(z)
    return out.reshape(x.shape)
