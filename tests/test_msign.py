"""msign backends: exact SVD reference, iterative bands, batching, edge cases, bad input."""

import pytest
import torch

from compositional_muon.msign import POLAR_EXPRESS_COEFFS, msign, newton_schulz, polar_express, svd_polar

SHAPES = [(32, 128), (128, 32), (64, 64), (3, 16, 48), (2, 3, 40, 8)]


def conditioned(shape, kappa, seed=0, dtype=torch.float64):
    """Random matrices with singular values log-spaced in [1/kappa, 1]."""
    g = torch.Generator().manual_seed(seed)
    *b, m, n = shape
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*b, m, r, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(*b, n, r, generator=g, dtype=dtype))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), r, dtype=dtype)
    return (U * s) @ V.mT


def reference_polar(x):
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_backend_is_exact_polar_factor(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = msign(x, "svd")
    torch.testing.assert_close(y, reference_polar(x), rtol=0, atol=1e-12)
    # partial isometry: y y^T y = y, and the polar identity x = y (y^T x) with y^T x symmetric PSD
    torch.testing.assert_close(y @ y.mT @ y, y, rtol=0, atol=1e-12)
    p = y.mT @ x
    torch.testing.assert_close(p, p.mT, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(p).min() > -1e-10


def test_svd_backend_rank_deficient_gives_partial_isometry():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 3, dtype=torch.float64, generator=g), torch.randn(3, 24, dtype=torch.float64, generator=g)
    x = a @ b  # rank 3
    s = torch.linalg.svdvals(msign(x, "svd"))
    torch.testing.assert_close(s[:3], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert s[3:].abs().max() < 1e-12
    U, S, Vh = torch.linalg.svd(x)
    torch.testing.assert_close(msign(x, "svd"), U[:, :3] @ Vh[:3], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["svd", "newton_schulz", "polar_express"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_maps_to_zero_without_nan(backend, dtype):
    for shape in [(5, 7), (7, 5), (2, 4, 4)]:
        y = msign(torch.zeros(shape, dtype=dtype), backend)
        assert y.dtype == dtype and y.shape == shape
        assert torch.isfinite(y).all() and (y == 0).all()


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 64), (4, 24, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_band(shape, dtype):
    # The fixed quintic lands singular values in a band around 1 (documented in docs/math.md).
    x = conditioned(shape, kappa=10).to(dtype)
    s = torch.linalg.svdvals(newton_schulz(x, 5, dtype=dtype).double())
    assert 0.66 <= s.min() and s.max() <= 1.16, (s.min().item(), s.max().item())


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 64), (4, 24, 96)])
def test_polar_express_band_is_much_tighter(shape):
    for kappa in (10, 1000):
        x = conditioned(shape, kappa)
        s16 = torch.linalg.svdvals(polar_express(x.bfloat16(), 8).double())
        assert (s16 - 1).abs().max() < 0.015, (s16.min().item(), s16.max().item())
        s32 = torch.linalg.svdvals(polar_express(x.float(), 8, dtype=torch.float32).double())
        assert (s32 - 1).abs().max() < 2e-3, (s32.min().item(), s32.max().item())


@pytest.mark.parametrize("backend", ["newton_schulz", "polar_express"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_iterative_backends_keep_singular_vectors(backend, dtype):
    # An odd polynomial iteration maps U S V^T to U p(S) V^T: in the SVD bases of x the output
    # must be diagonal (up to the working precision).
    x = conditioned((48, 80), kappa=20, seed=3)
    y = msign(x.to(dtype), backend, dtype=dtype).double()
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    core = U.mT @ y @ Vh.mT
    off = core - torch.diag_embed(core.diagonal())
    tol = 0.03 if dtype == torch.bfloat16 else 1e-4
    assert off.norm() / core.norm() < tol
    # and it points the same way as the exact polar factor
    cos = (y * reference_polar(x)).sum() / (y.norm() * reference_polar(x).norm())
    assert cos > (0.97 if backend == "newton_schulz" else 0.999)


def test_polar_express_float64_converges_to_svd():
    x = conditioned((20, 50), kappa=100, seed=4)
    y = msign(x, "polar_express", steps=12, dtype=torch.float64)
    torch.testing.assert_close(y, reference_polar(x), rtol=0, atol=1e-8)


def test_polar_express_schedule_has_safety_factor():
    a, b, c = POLAR_EXPRESS_COEFFS[0]
    assert a == pytest.approx(8.28721201814563 / 1.01) and b == pytest.approx(-23.595886519098837 / 1.01**3)
    assert c == pytest.approx(17.300387312530933 / 1.01**5)
    assert POLAR_EXPRESS_COEFFS[-1] == (1.875, -1.25, 0.375)
    assert len(POLAR_EXPRESS_COEFFS) == 8


@pytest.mark.parametrize("backend", ["svd", "newton_schulz", "polar_express"])
def test_batched_equals_per_matrix(backend):
    x = torch.randn(6, 12, 30, generator=torch.Generator().manual_seed(5))
    y = msign(x, backend)
    for i in range(6):
        torch.testing.assert_close(y[i], msign(x[i], backend), rtol=0, atol=1e-6)


def test_output_dtype_and_input_unchanged():
    x = torch.randn(10, 20)
    x0 = x.clone()
    for backend in ("newton_schulz", "polar_express", "svd"):
        assert msign(x, backend).dtype == torch.float32
    assert torch.equal(x, x0)


def test_scale_invariance():
    x = conditioned((16, 40), kappa=5, seed=6)
    torch.testing.assert_close(msign(x, "svd"), msign(1e-6 * x, "svd"))
    torch.testing.assert_close(
        msign(x, "polar_express", dtype=torch.float64),
        msign(1e4 * x, "polar_express", dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 dims"):
        msign(torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        msign(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        msign([[1.0, 2.0]])
    with pytest.raises(ValueError, match="unknown msign backend"):
        msign(torch.ones(3, 3), "qr")
    with pytest.raises(ValueError, match="steps"):
        msign(torch.ones(3, 3), "newton_schulz", steps=0)
    with pytest.raises(ValueError, match="exact"):
        msign(torch.ones(3, 3), "svd", steps=3)
    with pytest.raises(TypeError):
        svd_polar(torch.ones(3, 3, dtype=torch.complex64))


def test_msign_is_differentiable_and_matches_the_no_grad_path():
    x = torch.randn(3, 8, 20, dtype=torch.float64, requires_grad=True)
    y = msign(x, "polar_express", dtype=torch.float64)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert torch.equal(msign(x, "polar_express", dtype=torch.float64), y.detach())
