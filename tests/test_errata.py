"""The claims docs/math.md and the variants' docs changed with the issue-12 errata."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cm_reference import heads_cols, heads_rows, inv_root, polar
from compositional_muon import AdaMuon, Muon, NorMuon
from test_cm_invariants import _apply_rows, _composed_qk, _gauge, _qk_loss_grads, ov_problem, rnd, run_ov, run_qk

F64 = torch.float64


def test_whitened_partner_norm_is_set_by_s_max():
    d, D, lam = 4, 12, 0.3
    B = rnd(d, D, seed=1) * torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=F64)[:, None]
    s = torch.linalg.eigvalsh(B @ B.T)
    norm = torch.linalg.matrix_norm(inv_root(B @ B.T, lam) @ B, 2)
    torch.testing.assert_close(norm, (1 - lam / (s.max() + lam)) ** 0.5, rtol=1e-12, atol=0)
    assert abs(norm - (1 - lam / (s.min() + lam)) ** 0.5) > 0.1  # not s_min


def test_with_a_ridge_a_longer_step_within_the_bound_does_better():
    d, eta, lam = 8, 0.1, 2.0
    wq, wk, gq, gk = (rnd(32, 32, seed=s) for s in range(4))
    wk = 0.3 * wk  # partner Gram eigenvalues comparable to lam
    dq, _ = run_qk(wq, wk, gq, gk, d, eta, lam=lam)
    for K, dQ, G in zip(heads_rows(wk, d), heads_rows(dq, d), heads_rows(gq, d)):
        k = (eta / 2) / torch.linalg.matrix_norm(dQ.T @ K, 2)
        assert k > 1.01  # room left under the composed bound
        longer = k * dQ
        assert torch.linalg.matrix_norm(longer.T @ K, 2) <= eta / 2 + 1e-12
        assert (G * longer).sum() < (G * dQ).sum()  # decreases the linear model more


def test_per_mat_renorm_breaks_gauge_invariance():
    d, D, H = 4, 12, 3
    wq, wk = rnd(H * d, D, seed=1), rnd(H * d, D, seed=2)
    target = rnd(H, D, D, seed=3)
    A, AinvT = _gauge(d, H, 50)
    wq2, wk2 = _apply_rows(wq, A, d), _apply_rows(wk, AinvT, d)
    rel = {}
    for renorm in (False, True):
        dq, dk = run_qk(wq, wk, *_qk_loss_grads(wq, wk, d, target), d, per_mat_renorm=renorm)
        dq2, dk2 = run_qk(wq2, wk2, *_qk_loss_grads(wq2, wk2, d, target), d, per_mat_renorm=renorm)
        m1, m2 = _composed_qk(wq, wk, dq, dk, d), _composed_qk(wq2, wk2, dq2, dk2, d)
        rel[renorm] = max(((a - b).norm() / a.norm()).item() for a, b in zip(m1, m2))
    assert rel[False] < 1e-10 and rel[True] > 1e-3


def test_isotropic_hybrid_o_is_one_weighted_msign():
    d, eta, H = 8, 0.1, 4
    wv, wo, gv, go = ov_problem()
    _, do = run_ov(wv, wo, gv, go, d, eta, isotropic=True, hybrid=True)
    c = [(v.square().sum() / d) ** 0.5 for v in heads_rows(wv, d)]
    Z = polar(torch.cat([g / ch for g, ch in zip(heads_cols(go, d), c)], dim=1))
    for h in range(H):
        want = -eta / (2 * c[h]) * Z[:, h * d : (h + 1) * d]
        torch.testing.assert_close(heads_cols(do, d)[h], want, rtol=0, atol=1e-12)
        per_head = -eta / (2 * c[h]) * polar(heads_cols(go, d)[h])
        assert (heads_cols(do, d)[h] - per_head).norm() > 1e-3 * per_head.norm()  # not per-head Muon


def _update_rms(opt_cls, **kw):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 256))
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt_cls([w], msign_dtype=torch.float32, **kw).step()
    return (w.detach() - w0).square().mean().sqrt().item()


def test_normuon_defaults_are_the_released_codes_coherent_set():
    d = NorMuon.matrix_defaults
    assert (d["lr"], d["nesterov"], d["scale"], d["momentum"], d["beta2"]) == (0.02, True, "reference", 0.95, 0.95)
    ratio = _update_rms(NorMuon) / _update_rms(Muon)
    assert 0.5 < ratio < 1.5, ratio  # Muon-sized updates at the same lr
    # the paper's scale: update RMS 0.2 lr (AdamW-sized), 0.2 sqrt(256) = 3.2x Muon's here
    assert _update_rms(NorMuon, scale="paper", nesterov=False) == pytest.approx(0.2 * 0.02, rel=1e-4)


def test_normuon_recipe_keeps_the_paper_set_explicitly():
    from compositional_muon.training.models import build_model
    from compositional_muon.training.recipes import build_optimizer

    opt = build_optimizer("normuon", build_model("gpt", n_layer=1, n_embd=16, n_head=2))
    g = opt.param_groups[0]
    assert (g["scale"], g["nesterov"], g["lr"]) == ("paper", False, 3e-3)


def test_adamuon_defaults_are_the_current_release():
    d = AdaMuon.matrix_defaults
    assert d["sign_stabilize"] is True and d["beta2"] is None and d["nesterov"] is True
