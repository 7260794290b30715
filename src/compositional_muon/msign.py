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

The iterative backends run in ``dtype`` and return the input's dtype. With ``dtype=None``
:func:`msign` uses :func:`default_msign_dtype` of the input's device: bfloat16 on accelerators (as
Muon does), and on CPU bfloat16 only where the CPU has a native bf16 dot product (AMX / AVX512-BF16 flags),
float32 otherwise: a CPU without native bf16 runs a bf16 matmul 15-50x slower than a float32 one, and float32 is also the more accurate choice (see
``docs/performance.md``). Pass ``torch.bfloat16``, ``torch.float32`` or ``torch.float64`` to fix it.

Evaluation of the iterative backends (``gram=`` of :func:`msign`): directly, two GEMMs per step on
the ``m x n`` iterate (on CPU in cache-sized chunks of the batch with reused buffers), or in Gram
space (:mod:`compositional_muon.msign_gram`): ``msign(X) = Q(S) y_0`` with ``S = y_0 y_0^T`` on
the short side, the same polynomials on ``m x m`` matrices in float32. The Gram form is float32
accurate for a half-precision request; :func:`use_gram` picks it for bfloat16/float16 requests on
matrices with aspect ratio >= :data:`GRAM_MIN_ASPECT`, where it costs about the same as the
direct bfloat16 iteration on a native-bf16 CPU (docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .msign_gram import chunk_size, gram_polynomial_msign, step_poly

__all__ = [
    "msign",
    "default_msign_dtype",
    "cpu_has_native_bf16",
    "newton_schulz",
    "polar_express",
    "svd_polar",
    "BACKENDS",
    "NS_COEFFS",
    "POLAR_EXPRESS_COEFFS",
    "DEFAULT_STEPS",
    "MSIGN_EPS",
    "PolySchedule",
    "msign_schedule",
    "use_gram",
    "GRAM_MIN_ASPECT",
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
POLAR_EXPRESS_COEFFS = tuple((a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _PE_RAW[:-1]) + (
    _PE_RAW[-1],
)

BACKENDS = ("polar_express", "newton_schulz", "svd")
DEFAULT_STEPS = {"polar_express": 8, "newton_schulz": 5}
MSIGN_EPS = 1e-7  # added to the scaled norm before dividing: msign(0) = 0


@dataclass(frozen=True)
class PolySchedule:
    """The step schedule of an iterative msign backend: the input is divided by
    ``norm_scale * ||X||_F + MSIGN_EPS``, then each ``(a, b, c)`` in ``coeffs`` maps
    ``y <- (a I + b A + c A^2) y`` with ``A = y y^T`` (the odd quintic ``a x + b x^3 + c x^5`` on
    the singular values). Every path that runs these iterations (``msign``, the Gram-form
    ``parallel.gram_msign``) takes its schedule from :func:`msign_schedule`."""

    coeffs: tuple[tuple[float, float, float], ...]
    norm_scale: float


def msign_schedule(backend: str, steps: int | None = None) -> PolySchedule:
    """The :class:`PolySchedule` of ``backend`` ("newton_schulz" or "polar_express") with ``steps``
    steps (None: :data:`DEFAULT_STEPS`). Polar Express beyond its tabulated steps repeats its last
    (limit) step. Raises ValueError for an unknown backend, "svd" (not iterative) or ``steps < 1``."""
    if backend not in DEFAULT_STEPS:
        raise ValueError(
            f"no polynomial schedule for msign backend {backend!r}; expected one of {tuple(DEFAULT_STEPS)}"
        )
    n = DEFAULT_STEPS[backend] if steps is None else int(steps)
    if n < 1:
        raise ValueError(f"msign `steps` must be >= 1, got {steps}")
    if backend == "newton_schulz":
        return PolySchedule((NS_COEFFS,) * n, 1.0)
    pe = POLAR_EXPRESS_COEFFS
    return PolySchedule(tuple(pe[:n]) + (pe[-1],) * (n - len(pe[:n])), _PE_SAFETY)


# ``dtype=None`` -> a working precision per device type (see default_msign_dtype).
DTYPE_ENV = "COMPOSITIONAL_MUON_MSIGN_DTYPE"
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 GEMM on x86 CPUs
_default_dtypes: dict = {}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU advertises a native bf16 dot product (x86 ``avx512_bf16`` / ``amx_bf16``
    in ``/proc/cpuinfo``, or aarch64 ``bf16``). ``cpuinfo`` overrides the file's text (tests)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return any(f in flags for f in _BF16_CPU_FLAGS) or "bf16" in flags


def default_msign_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The iteration precision :func:`msign` uses when ``dtype=None`` on ``device``.

    Accelerators (CUDA, ...): bfloat16. CPU: bfloat16 when the CPU has a native bf16 dot product
    (:func:`cpu_has_native_bf16`), else float32: without one a bf16 matmul is emulated and runs
    15-50x slower than float32 (measured on an AVX2 EPYC, ``docs/performance.md``). The rule is
    deterministic (no timing), so two processes on one machine always agree. The environment
    variable ``COMPOSITIONAL_MUON_MSIGN_DTYPE`` (``bfloat16`` / ``float32`` / ...) overrides it.
    """
    env = os.environ.get(DTYPE_ENV)
    if env:
        if env.lower() not in _DTYPE_NAMES:
            raise ValueError(f"{DTYPE_ENV}={env!r}; expected one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[env.lower()]
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in _default_dtypes:
        if kind == "cpu":
            _default_dtypes[kind] = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        else:
            _default_dtypes[kind] = torch.bfloat16
    return _default_dtypes[kind]


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"msign expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"msign expects a tensor with at least 2 dims (..., m, n), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"msign expects a real floating-point tensor, got {x.dtype}")


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    *,
    dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype | None = None,
    gram: bool | None = None,
) -> torch.Tensor:
    """Approximate ``msign(x)`` with ``steps`` iterations of the fixed quintic (3.4445, -4.7750, 2.0315);
    ``gram`` as in :func:`msign`."""
    _check(x)
    if steps < 1:
        raise ValueError("msign needs at least one iteration step")
    sched = msign_schedule("newton_schulz", steps)
    return _polynomial_msign(x, sched.coeffs, dtype, sched.norm_scale, out_dtype, gram)


def polar_express(
    x: torch.Tensor,
    steps: int = 8,
    *,
    dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype | None = None,
    gram: bool | None = None,
) -> torch.Tensor:
    """Approximate ``msign(x)`` with ``steps`` Polar Express quintics (schedule extended by its last step);
    ``gram`` as in :func:`msign`."""
    _check(x)
    if steps < 1:
        raise ValueError("msign needs at least one iteration step")
    sched = msign_schedule("polar_express", steps)
    return _polynomial_msign(x, sched.coeffs, dtype, sched.norm_scale, out_dtype, gram)


# Long side / short side from which ``gram=None`` picks the Gram-space form for half-precision
# working dtypes (measured: docs/performance.md, "Gram-space msign for thin blocks").
GRAM_MIN_ASPECT = 32.0


def use_gram(shape: Sequence[int], dtype: torch.dtype, gram: bool | None = None) -> bool:
    """Whether :func:`msign` evaluates an iterative backend in Gram space for matrices of
    ``shape`` (``(..., m, n)``) with working precision ``dtype``: ``gram`` when given, else
    True for a bfloat16/float16 ``dtype`` and ``max(m, n) / min(m, n) >= GRAM_MIN_ASPECT``
    (float32/float64 requests keep the direct iteration)."""
    if gram is not None:
        return bool(gram)
    short, long = sorted(shape[-2:])
    return dtype in (torch.bfloat16, torch.float16) and short > 0 and long >= GRAM_MIN_ASPECT * short


def _polynomial_msign(
    x: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    dtype: torch.dtype,
    norm_scale: float,
    out_dtype: torch.dtype | None = None,
    gram: bool | None = None,
) -> torch.Tensor:
    if len(coeffs) < 1:
        raise ValueError("msign needs at least one iteration step")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    transposed = x.size(-2) > x.size(-1)
    xt = x.mT if transposed else x
    differentiable = torch.is_grad_enabled() and xt.requires_grad
    if not differentiable and use_gram(xt.shape, dtype, gram):
        z = gram_polynomial_msign(
            xt.flatten(0, -3) if xt.ndim > 2 else xt, coeffs, norm_scale, MSIGN_EPS, dtype, out_dtype
        )
    else:
        # Frobenius norm in float32 at least (a bf16 input cannot overflow the square sum), read
        # from the input itself: no upcast copy; the normalized matrix is rounded once into the
        # working dtype. Each step is y <- (a I + b A + c A^2) y with A = y y^T: the polynomial is
        # formed on the small m x m side (one GEMM-with-bias and a diagonal add).
        acc = torch.float64 if torch.float64 in (dtype, x.dtype) else torch.float32
        norm = torch.linalg.vector_norm(xt, dim=(-2, -1), keepdim=True, dtype=acc)
        inv = torch.reciprocal(norm * norm_scale + MSIGN_EPS)
        if differentiable:  # out= is not differentiable
            y = (xt * inv).to(dtype).contiguous()
            y = y.flatten(0, -3) if y.ndim > 2 else y.unsqueeze(0)
            for a, b, c in coeffs:
                y = torch.bmm(step_poly(y, a, b, c), y)
            z = y.to(out_dtype)
        else:
            z = _direct_chunked(xt, inv, coeffs, dtype, out_dtype)
    z = z.reshape(xt.shape)
    return z.mT if transposed else z


def _direct_chunked(
    xt: torch.Tensor,
    inv: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The direct iteration without autograd, on ``(batch, m, n)`` chunks of ``xt * inv``.

    On CPU the batch runs in chunks of about 2 MiB per iterate (:func:`~.msign_gram.chunk_size`), so all steps of
    a chunk stay in cache (1.4x at 576 blocks of 64 x 768 bf16 on a 2-core EPYC), and the iterates
    ping-pong between two reused buffers (``out=``): a fresh large tensor per step is a fresh mmap,
    page-faulted and zeroed on first touch (3-4x on the ``P y`` product there). Elsewhere one
    chunk holds the whole batch."""
    m, n = xt.shape[-2:]
    xb = xt.reshape(-1, m, n)
    inv = inv.reshape(-1, 1, 1)
    B = xb.size(0)
    step = chunk_size(B, m, n, dtype, xt.device)
    y0 = torch.empty((step, m, n), dtype=dtype, device=xt.device)
    y1 = torch.empty_like(y0)
    out = None if step == B else torch.empty((B, m, n), dtype=out_dtype, device=xt.device)
    for i in range(0, B, step):
        k = min(step, B - i)
        y, spare = y0[:k], y1[:k]
        torch.mul(xb[i : i + k], inv[i : i + k], out=y)  # computed in `acc`, rounded once into `dtype`
        for a, b, c in coeffs:
            y, spare = torch.bmm(step_poly(y, a, b, c), y, out=spare), y
        if out is None:
            return y.to(out_dtype)
        out[i : i + k].copy_(y)
    assert out is not None
    return out


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
    out_dtype: torch.dtype | None = None,
    gram: bool | None = None,
) -> torch.Tensor:
    """Polar factor ``U V^T`` of every matrix in ``x`` (shape ``(..., m, n)``).

    ``backend`` is one of ``"polar_express"`` (default), ``"newton_schulz"`` or ``"svd"``;
    ``steps`` overrides the iterative backends' step count (8 and 5); ``dtype`` is the iteration's
    working precision (None: :func:`default_msign_dtype` of ``x.device``, bfloat16 on accelerators;
    ignored by ``"svd"``, which works in ``x.dtype``); ``out_dtype`` the result's (None: ``x.dtype``;
    passing the working dtype skips the final cast when the caller can consume it as is).

    ``gram`` picks how an iterative backend is evaluated (see :mod:`compositional_muon.msign_gram`):
    ``False`` the direct iteration on the ``m x n`` matrix in ``dtype``; ``True`` the Gram-space
    form ``msign(X) = Q(S) y_0`` with ``S = y_0 y_0^T`` (short side), the same polynomials run on
    ``m x m`` matrices in float32 (float64 for float64 inputs), more accurate than a half-precision
    direct iteration; ``None`` (default): :func:`use_gram`. Autograd always runs the direct form.
    """
    _check(x)
    if backend == "svd":
        if steps is not None:
            raise ValueError("backend='svd' is exact and takes no `steps`")
        z = svd_polar(x)
        return z if out_dtype is None else z.to(out_dtype)
    if backend not in DEFAULT_STEPS:
        raise ValueError(f"unknown msign backend {backend!r}; expected one of {BACKENDS}")
    n = DEFAULT_STEPS[backend] if steps is None else int(steps)
    if n < 1:
        raise ValueError(f"msign `steps` must be >= 1, got {steps}")
    work = default_msign_dtype(x.device) if dtype is None else dtype
    if backend == "newton_schulz":
        return newton_schulz(x, n, dtype=work, out_dtype=out_dtype, gram=gram)
    return polar_express(x, n, dtype=work, out_dtype=out_dtype, gram=gram)
