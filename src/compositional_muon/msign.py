"""The matrix sign (polar factor) ``msign(X) = U V^T`` for the thin SVD ``X = U S V^T``.

Three interchangeable backends, all batched over leading dimensions and valid for any aspect
ratio:

* ``"newton_schulz"``: the fixed quintic ``p(x) = a x + b x^3 + c x^5`` with
  ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, 5 steps (Keller Jordan's Muon). It does not converge
  to 1 but into a band: on well-conditioned inputs the output singular values lie in roughly
  [0.68, 1.13] (see ``docs/math.md`` for the measured band).
* ``"polar_express"``: Polar Express (Amsel et al., arXiv:2505.16932), a schedule of per-step
  minimax-optimal odd quintics for the interval [1e-3, 1], each step but the last divided by the
  safety factor 1.01 (``p(x / 1.01)``), input normalized by ``1.01 * ||X||_F``. 8 steps by default.
* ``"svd"``: exact, through ``torch.linalg.svd`` (float32/float64; half precisions go through
  float32). Singular
  values below ``max(S) * max(m, n) * eps(dtype)`` count as zero, so ``msign`` of a rank-``r``
  matrix is the rank-``r`` partial isometry and ``msign(0) = 0``.

The iterative backends run in ``dtype`` (default bfloat16, as Muon does; pass ``torch.float32``
or ``torch.float64`` for more precision) and return the input's dtype.
"""
from __future__ import annotations

import torch

__all__ = [
    "msign",
    "newton_schulz",
    "polar_express",
    "svd_polar",
    "BACKENDS",
    "NS_COEFFS",
    "POLAR_EXPRESS_COEFFS",
]

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express, degree 5, interval [1e-3, 1]: unscaled coefficients in the paper's order; the
# last triple is the limit of the schedule and is repeated for any further steps.
_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01
POLAR_EXPRESS_COEFFS = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _PE_RAW[:-1]
) + (_PE_RAW[-1],)

BACKENDS = ("polar_express", "newton_schulz", "svd")
_DEFAULT_STEPS = {"polar_express": 8, "newton_schulz": 5}
_EPS = 1e-7


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"msign expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"msign expects a tensor with at least 2 dims (..., m, n), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"msign expects a real floating-point tensor, got {x.dtype}")


def newton_schulz(x: torch.Tensor, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate ``msign(x)`` with ``steps`` iterations of the fixed quintic (3.4445, -4.7750, 2.0315)."""
    _check(x)
    return _polynomial_msign(x, [NS_COEFFS] * steps, dtype, 1.0)


def polar_express(x: torch.Tensor, steps: int = 8, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate ``msign(x)`` with ``steps`` Polar Express quintics (schedule extended by its last step)."""
    _check(x)
    coeffs = list(POLAR_EXPRESS_COEFFS[:steps])
    coeffs += [POLAR_EXPRESS_COEFFS[-1]] * (steps - len(coeffs))
    return _polynomial_msign(x, coeffs, dtype, _PE_SAFETY)


def _polynomial_msign(x: torch.Tensor, coeffs, dtype: torch.dtype, norm_scale: float) -> torch.Tensor:
    if len(coeffs) < 1:
        raise ValueError("msign needs at least one iteration step")
    out_dtype = x.dtype
    transposed = x.size(-2) > x.size(-1)
    y = (x.mT if transposed else x).to(dtype)
    # Frobenius norm in float32 at least, so a bf16 input cannot overflow the square sum.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norm = torch.linalg.matrix_norm(y.to(acc), keepdim=True)
    y = (y.to(acc) / (norm * norm_scale + _EPS)).to(dtype)
    for a, b, c in coeffs:
        A = y @ y.mT
        B = b * A + c * (A @ A)
        y = a * y + B @ y
    return (y.mT if transposed else y).to(out_dtype)


def svd_polar(x: torch.Tensor) -> torch.Tensor:
    """Exact ``msign(x) = U V^T`` over the nonzero singular values (``msign(0) = 0``)."""
    _check(x)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no half-precision SVD
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(x.shape[-2:]) * torch.finfo(work.dtype).eps
    keep = (S > tol) & (S > 0)
    return ((U * keep.unsqueeze(-2).to(work.dtype)) @ Vh).to(x.dtype)


def msign(
    x: torch.Tensor,
    backend: str = "polar_express",
    steps: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Polar factor ``U V^T`` of every matrix in ``x`` (shape ``(..., m, n)``).

    ``backend`` is one of ``"polar_express"`` (default), ``"newton_schulz"`` or ``"svd"``;
    ``steps`` overrides the iterative backends' step count (8 and 5); ``dtype`` is the iteration's
    working precision (default bfloat16; ignored by ``"svd"``, which works in ``x.dtype``).
    """
    _check(x)
    if backend == "svd":
        if steps is not None:
            raise ValueError("backend='svd' is exact and takes no `steps`")
        return svd_polar(x)
    if backend not in _DEFAULT_STEPS:
        raise ValueError(f"unknown msign backend {backend!r}; expected one of {BACKENDS}")
    n = _DEFAULT_STEPS[backend] if steps is None else int(steps)
    if n < 1:
        raise ValueError(f"msign `steps` must be >= 1, got {steps}")
    work = torch.bfloat16 if dtype is None else dtype
    if backend == "newton_schulz":
        return newton_schulz(x, n, dtype=work)
    return polar_express(x, n, dtype=work)
