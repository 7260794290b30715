"""Inverse Gram roots against a float64 eigendecomposition reference."""

import pytest
import torch

from compositional_muon.inverse_root import inverse_sqrt, inverse_sqrt_eigh, inverse_sqrt_newton, partner_gram


def spd_with_spectrum(n_batch, d, evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n_batch, d, d, dtype=torch.float64, generator=g))
    return (Q * evals) @ Q.mT


def reference(G, lam):
    s, U = torch.linalg.eigh(G.double())
    return (U * (s.clamp_min(0) + lam).rsqrt().unsqueeze(-2)) @ U.mT


def test_partner_gram_is_w_wt():
    w = torch.randn(3, 4, 10, dtype=torch.float64)
    torch.testing.assert_close(partner_gram(w), torch.einsum("hid,hjd->hij", w, w))


@pytest.mark.parametrize("lam", [0.0, 1e-3, 1e-1])
def test_eigh_path_is_exact(lam):
    w = torch.randn(5, 8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = partner_gram(w)
    R = inverse_sqrt_eigh(G, lam)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(R @ (G + lam * eye) @ R, eye.expand(5, 8, 8), rtol=0, atol=1e-10)
    torch.testing.assert_close(R, R.mT)
    torch.testing.assert_close(R, reference(G, lam), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kappa,lam,tol32", [(10.0, 0.0, 1e-5), (1e3, 0.0, 1e-4), (1e4, 1e-3, 1e-4)])
def test_newton_path_matches_eigh(kappa, lam, tol32):
    d = 16
    evals = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), d, dtype=torch.float64)
    G = spd_with_spectrum(4, d, evals, seed=2)
    ref = reference(G, lam)
    r64 = inverse_sqrt_newton(G, lam)
    assert ((r64 - ref).norm() / ref.norm()) < 1e-10
    r32 = inverse_sqrt_newton(G.float(), lam)
    assert r32.dtype == torch.float32
    assert ((r32.double() - ref).norm() / ref.norm()) < tol32


def test_rank_deficient_and_zero_gram_with_ridge():
    d, lam = 6, 1e-2
    evals = torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    G = spd_with_spectrum(2, d, evals, seed=3)
    for method in ("eigh", "newton"):
        torch.testing.assert_close(inverse_sqrt(G, lam, method), reference(G, lam), rtol=0, atol=1e-8)
        Z = torch.zeros(3, d, d, dtype=torch.float64)
        torch.testing.assert_close(
            inverse_sqrt(Z, lam, method), torch.eye(d, dtype=torch.float64).expand(3, d, d) / lam**0.5
        )


def test_auto_uses_exact_path_on_cpu():
    G = spd_with_spectrum(1, 5, torch.tensor([1.0, 0.5, 0.2, 0.1, 1e-3], dtype=torch.float64))
    assert torch.equal(inverse_sqrt(G, 0.0, "auto"), inverse_sqrt_eigh(G, 0.0))


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        inverse_sqrt(torch.ones(3, 4), 0.1)
    with pytest.raises(ValueError, match="lam"):
        inverse_sqrt(torch.eye(3), -1.0)
    with pytest.raises(ValueError, match="unknown inverse-root method"):
        inverse_sqrt(torch.eye(3), 0.1, "cholesky")
    with pytest.raises(ValueError, match="iters"):
        inverse_sqrt_newton(torch.eye(3), 0.1, iters=0)
