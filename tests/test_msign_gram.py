"""Gram-space msign (``msign(..., gram=True)``) and the chunked direct iteration: same polynomial as
the direct path, accuracy against float64 references, edge cases, the automatic choice."""

import pytest
import torch

import compositional_muon.msign_gram as msign_gram
from compositional_muon.msign import GRAM_MIN_ASPECT, msign, use_gram


def conditioned(shape, kappa, seed=0):
    """float64 matrices with singular values log-spaced in [1/kappa, 1]."""
    g = torch.Generator().manual_seed(seed)
    *b, m, n = shape
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*b, m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*b, n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), r, dtype=torch.float64)
    return (U * s) @ V.mT


def low_rank(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    *b, m, n = shape
    return torch.randn(*b, m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        *b, rank, n, generator=g, dtype=torch.float64
    )


def errors(z, ref):
    """(max relative Frobenius error, max |sigma_i(z) - sigma_i(ref)|) over the batch."""
    z = z.double()
    rel = ((z - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max().item()
    band = (torch.linalg.svdvals(z) - torch.linalg.svdvals(ref)).abs().max().item()
    return rel, band


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("shape", [(3, 8, 96), (96, 8), (2, 2, 16, 64), (24, 24)])
def test_gram_form_is_the_same_polynomial_in_float64(backend, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direct = msign(x, backend, dtype=torch.float64, gram=False)
    gram = msign(x, backend, dtype=torch.float64, gram=True)
    assert gram.shape == x.shape and gram.dtype == torch.float64
    torch.testing.assert_close(gram, direct, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("kind", ["random", "kappa10", "kappa1e3", "rank3", "rank16"], ids=lambda k: k)
def test_gram_bf16_at_least_as_accurate_as_direct_bf16(backend, kind):
    shape = (6, 32, 384)
    x = {
        "random": lambda: torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
        "kappa10": lambda: conditioned(shape, 10),
        "kappa1e3": lambda: conditioned(shape, 1e3),
        "rank3": lambda: low_rank(shape, 3),
        "rank16": lambda: low_rank(shape, 16),
    }[kind]()
    ref = msign(x, backend, dtype=torch.float64, gram=False)  # the same polynomial, float64
    x32 = x.float()
    direct = errors(msign(x32, backend, dtype=torch.bfloat16, gram=False), ref)
    gram = errors(msign(x32, backend, dtype=torch.bfloat16, gram=True), ref)
    assert gram[0] <= direct[0] and gram[1] <= direct[1] * 1.05, (gram, direct)
    assert gram[0] < 3e-2 and gram[1] < 3e-2, gram


def test_gram_band_on_well_conditioned_inputs_against_the_svd_polar_factor():
    x = conditioned((8, 64, 768), 10).float()
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    z = msign(x, dtype=torch.bfloat16, gram=True).double()
    s = torch.linalg.svdvals(z)
    assert (s - 1).abs().max() < 3e-3
    assert ((z - U @ Vh).norm(dim=(-2, -1)) / (U @ Vh).norm(dim=(-2, -1))).max() < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gram_edge_cases(dtype):
    for shape in [(5, 40), (40, 5), (2, 3, 4, 64), (0, 4, 64)]:
        y = msign(torch.zeros(shape, dtype=dtype), gram=True)
        assert y.dtype == dtype and y.shape == shape and (y == 0).all()
    x = low_rank((4, 16, 256), 1).to(dtype)
    x[:, 8:] = 0  # zero rows on top of rank one
    z = msign(x, gram=True, dtype=torch.bfloat16).double()
    assert torch.isfinite(z).all()
    if dtype != torch.bfloat16:  # a bf16 rank-one matrix is full rank at sigma ~ 4e-3 sigma_max
        s = torch.linalg.svdvals(z)
        assert (s[:, 0] - 1).abs().max() < 1e-2 and s[:, 1:].max() < 1e-2


def test_gram_out_dtype_and_transposed_batches():
    x = torch.randn(3, 256, 16, generator=torch.Generator().manual_seed(3))
    z = msign(x, dtype=torch.bfloat16, out_dtype=torch.bfloat16, gram=True)
    assert z.dtype == torch.bfloat16 and z.shape == x.shape
    zt = msign(x.mT.contiguous(), dtype=torch.bfloat16, out_dtype=torch.bfloat16, gram=True)
    torch.testing.assert_close(z, zt.mT, rtol=8e-3, atol=1e-4)  # one bf16 ulp


def test_use_gram_rule():
    wide = (4, 16, int(16 * GRAM_MIN_ASPECT))
    assert use_gram(wide, torch.bfloat16) and use_gram((4, wide[2], 16), torch.float16)
    assert not use_gram(wide, torch.float32) and not use_gram(wide, torch.float64)
    assert not use_gram((16, 16 * int(GRAM_MIN_ASPECT) - 1), torch.bfloat16)
    assert use_gram((8, 8), torch.float32, gram=True) and not use_gram(wide, torch.bfloat16, gram=False)


def test_autograd_takes_the_direct_path():
    x = torch.randn(8, int(8 * GRAM_MIN_ASPECT), dtype=torch.float64, requires_grad=True)
    z = msign(x, dtype=torch.float64)
    z.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gram", [False, True])
def test_cpu_chunks_do_not_change_the_result(monkeypatch, gram):
    x = torch.randn(7, 16, 128, generator=torch.Generator().manual_seed(4))
    whole = msign(x, dtype=torch.float32, gram=gram)
    monkeypatch.setattr(msign_gram, "CPU_CHUNK_BYTES", 3 * 16 * 128 * 4)  # chunks of 3 (and a last of 1)
    assert msign_gram.chunk_size(7, 16, 128, torch.float32, x.device) == 3
    torch.testing.assert_close(msign(x, dtype=torch.float32, gram=gram), whole, rtol=0, atol=1e-6)
