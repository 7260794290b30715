"""The functional cm_qk / cm_ov API: the reference usage, momentum semantics, views, bad input."""

import pytest
import torch
from torch import nn

from compositional_muon import NonFiniteError, cm_ov, cm_qk


class Attention(nn.Module):
    def __init__(self, dim=32, n_heads=4, n_kv_heads=None):
        super().__init__()
        self.head_dim = dim // n_heads
        kv = (n_kv_heads or n_heads) * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv, bias=False)
        self.v_proj = nn.Linear(dim, kv, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.n_rep = n_heads // (n_kv_heads or n_heads)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.n_rep, 1)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.n_rep, 1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def test_reference_readme_snippet_runs_verbatim():
    torch.manual_seed(0)
    attn = Attention()
    x = torch.randn(2, 6, 32)
    lr = 0.05
    m_q, m_k, m_v, m_o = (
        torch.zeros_like(p) for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)
    )
    target = torch.randn(2, 6, 32)
    losses = []
    for _ in range(20):
        attn.zero_grad()
        loss = ((attn(x) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            # --- the reference README's usage, verbatim ---
            cm_qk(
                attn.q_proj.weight,
                attn.k_proj.weight,
                attn.q_proj.weight.grad,
                attn.k_proj.weight.grad,
                m_q,
                m_k,
                head_dim=attn.head_dim,
                eta=lr,
            )

            cm_ov(
                attn.v_proj.weight,
                attn.o_proj.weight,
                attn.v_proj.weight.grad,
                attn.o_proj.weight.grad,
                m_v,
                m_o,
                head_dim=attn.head_dim,
                eta=lr,
            )
    assert losses[-1] < 0.8 * losses[0]
    assert all(m.abs().sum() > 0 for m in (m_q, m_k, m_v, m_o))


def test_works_under_autograd_enabled_and_gqa_model():
    torch.manual_seed(1)
    attn = Attention(32, 4, 2)
    loss = attn(torch.randn(2, 5, 32)).square().mean()
    loss.backward()
    bufs = [torch.zeros_like(p) for p in attn.parameters()]
    w0 = attn.q_proj.weight.detach().clone()
    cm_qk(
        attn.q_proj.weight,
        attn.k_proj.weight,
        attn.q_proj.weight.grad,
        attn.k_proj.weight.grad,
        bufs[0],
        bufs[1],
        head_dim=attn.head_dim,
        eta=0.1,
        num_kv_heads=2,
    )
    assert not torch.equal(w0, attn.q_proj.weight)
    assert attn.q_proj.weight.grad_fn is None and attn.q_proj.weight.requires_grad


def test_momentum_semantics_and_nesterov():
    torch.manual_seed(2)
    d, D = 4, 16
    wq, wk = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    g1q, g1k, g2q, g2k = (torch.randn(8, D, dtype=torch.float64) for _ in range(4))
    mq, mk = torch.zeros_like(wq), torch.zeros_like(wk)
    kw = dict(head_dim=d, eta=0.1, msign_backend="svd", beta=0.9)
    a, b = wq.clone(), wk.clone()
    cm_qk(a, b, g1q, g1k, mq, mk, **kw)
    torch.testing.assert_close(mq, g1q)
    a0, b0 = a.clone(), b.clone()
    cm_qk(a, b, g2q, g2k, mq, mk, **kw)
    torch.testing.assert_close(mq, 0.9 * g1q + g2q)
    # the second step descends along the momentum: same as a fresh call whose gradient is that momentum
    c, e = a0.clone(), b0.clone()
    cm_qk(c, e, 0.9 * g1q + g2q, 0.9 * g1k + g2k, torch.zeros_like(wq), torch.zeros_like(wk), **kw)
    torch.testing.assert_close(a, c)
    # nesterov descends along g + beta * m_new
    mq2, mk2 = torch.zeros_like(wq), torch.zeros_like(wk)
    n1, n2 = wq.clone(), wk.clone()
    cm_qk(n1, n2, g1q, g1k, mq2, mk2, nesterov=True, **kw)
    r1, r2 = wq.clone(), wk.clone()
    cm_qk(r1, r2, 1.9 * g1q, 1.9 * g1k, torch.zeros_like(wq), torch.zeros_like(wk), **kw)
    torch.testing.assert_close(n1, r1)
    torch.testing.assert_close(mq2, g1q)


def test_weight_decay_is_decoupled():
    d, D = 4, 16
    wq, wk = torch.randn(8, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    z = torch.zeros_like(wq)
    a, b = wq.clone(), wk.clone()
    cm_qk(a, b, z, z, z.clone(), z.clone(), head_dim=d, eta=0.1, weight_decay=0.5)
    torch.testing.assert_close(a, wq * (1 - 0.05))
    torch.testing.assert_close(b, wk * (1 - 0.05))


def test_fused_qkv_views_write_through():
    # nanoGPT-style c_attn: q, k, v are row slices of one weight; CM updates them through views.
    torch.manual_seed(3)
    D, d = 32, 8
    W = torch.randn(3 * D, D)
    G = torch.randn(3 * D, D)
    M = torch.zeros(3 * D, D)
    W0 = W.clone()
    wq, wk = W[:D], W[D : 2 * D]
    cm_qk(wq, wk, G[:D], G[D : 2 * D], M[:D], M[D : 2 * D], head_dim=d, eta=0.1)
    ref_q, ref_k = W0[:D].clone(), W0[D : 2 * D].clone()
    cm_qk(ref_q, ref_k, G[:D], G[D : 2 * D], torch.zeros(D, D), torch.zeros(D, D), head_dim=d, eta=0.1)
    torch.testing.assert_close(W[:D], ref_q)
    torch.testing.assert_close(W[D : 2 * D], ref_k)
    assert torch.equal(W[2 * D :], W0[2 * D :])
    torch.testing.assert_close(M[:D], G[:D])
    # GPT-2 Conv1D layout (in x out): the transposed slices are strided views
    Wt = W0.T.contiguous().clone()  # (D, 3D)
    q_view, k_view = Wt[:, :D].T, Wt[:, D : 2 * D].T
    cm_qk(q_view, k_view, G[:D], G[D : 2 * D], torch.zeros(D, D), torch.zeros(D, D), head_dim=d, eta=0.1)
    torch.testing.assert_close(Wt[:, :D].T, ref_q)


def test_bf16_weights_with_default_backend():
    torch.manual_seed(4)
    wq, wk = torch.randn(32, 32, dtype=torch.bfloat16), torch.randn(32, 32, dtype=torch.bfloat16)
    gq, gk = torch.randn_like(wq), torch.randn_like(wk)
    mq, mk = torch.zeros(32, 32), torch.zeros(32, 32)  # float32 momentum for bf16 weights is allowed
    w0 = wq.clone()
    assert cm_qk(wq, wk, gq, gk, mq, mk, head_dim=8, eta=0.1) is True
    assert wq.dtype == torch.bfloat16 and torch.isfinite(wq.float()).all() and not torch.equal(w0, wq)


# ------------------------------------------------------------------------------------------------
# Non-finite gradients: never written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_writes_nothing(bad):
    wq, wk, gq, gk = (torch.randn(16, 16) for _ in range(4))
    gk[3, 4] = bad
    mq, mk = torch.randn(16, 16), torch.randn(16, 16)
    snap = [t.clone() for t in (wq, wk, mq, mk)]
    with pytest.raises(NonFiniteError, match="gk"):
        cm_qk(wq, wk, gq, gk, mq, mk, head_dim=4, eta=0.1)
    for a, b in zip((wq, wk, mq, mk), snap):
        assert torch.equal(a, b)


def test_nonfinite_gradient_skip_policy():
    wv, wo, gv, go = (torch.randn(16, 16) for _ in range(4))
    go[0, 0] = float("nan")
    mv, mo = torch.zeros(16, 16), torch.zeros(16, 16)
    snap = [t.clone() for t in (wv, wo, mv, mo)]
    assert cm_ov(wv, wo, gv, go, mv, mo, head_dim=4, eta=0.1, on_nonfinite="skip") is False
    for a, b in zip((wv, wo, mv, mo), snap):
        assert torch.equal(a, b)


def test_singular_partner_without_ridge_raises_clearly():
    wq, gq, gk = torch.randn(16, 16), torch.randn(16, 16), torch.randn(16, 16)
    wk = torch.zeros(16, 16)
    snap = wq.clone()
    with pytest.raises(NonFiniteError, match="lam"):
        cm_qk(wq, wk, gq, gk, torch.zeros(16, 16), torch.zeros(16, 16), head_dim=4, eta=0.1, lam=0.0)
    assert torch.equal(wq, snap)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ------------------------------------------------------------------------------------------------


def _qk(**over):
    args = dict(
        wq=torch.randn(16, 32),
        wk=torch.randn(16, 32),
        gq=torch.randn(16, 32),
        gk=torch.randn(16, 32),
        mq=torch.zeros(16, 32),
        mk=torch.zeros(16, 32),
    )
    kw = dict(head_dim=4, eta=0.1)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return cm_qk(*args.values(), **kw)


def _ov(**over):
    args = dict(
        wv=torch.randn(16, 32),
        wo=torch.randn(32, 16),
        gv=torch.randn(16, 32),
        go=torch.randn(32, 16),
        mv=torch.zeros(16, 32),
        mo=torch.zeros(32, 16),
    )
    kw = dict(head_dim=4, eta=0.1)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return cm_ov(*args.values(), **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(wq=torch.randn(16, 32, 1)), ValueError, r"`wq` must be a 2-D"),
        (dict(wk=torch.randn(16)), ValueError, r"`wk` must be a 2-D"),
        (
            dict(wq=torch.randn(18, 32), gq=torch.randn(18, 32), mq=torch.zeros(18, 32)),
            ValueError,
            r"`wq` has 18 out-features, not divisible by head_dim=4",
        ),
        (
            dict(wk=torch.randn(16, 24), gk=torch.randn(16, 24), mk=torch.zeros(16, 24)),
            ValueError,
            r"`wk` has shape \(16, 24\); expected",
        ),
        (
            dict(wk=torch.randn(12, 32), gk=torch.randn(12, 32), mk=torch.zeros(12, 32)),
            ValueError,
            r"multiple of the number of key/value heads",
        ),
        (dict(gq=torch.randn(32, 16)), ValueError, r"`gq` has shape \(32, 16\), expected \(16, 32\)"),
        (dict(mk=torch.zeros(16, 31)), ValueError, r"`mk` has shape"),
        (dict(gq=None), TypeError, r"`gq` is None \(the parameter has no gradient\)"),
        (dict(gq=torch.randn(16, 32, dtype=torch.float64)), TypeError, r"`gq` has dtype torch.float64"),
        (dict(gk=torch.randn(16, 32).to_sparse()), TypeError, r"`gk` is a sparse tensor"),
        (dict(gq=torch.randn(16, 32, dtype=torch.complex64)), TypeError, r"`gq` is complex"),
        (dict(mq=torch.zeros(16, 32, dtype=torch.int64)), TypeError, r"`mq` must be floating point"),
        (dict(mq=torch.zeros(16, 32, device="meta")), ValueError, r"`mq` is on meta"),
        (dict(head_dim=0), ValueError, r"`head_dim` must be a positive int"),
        (dict(head_dim=4.0), ValueError, r"`head_dim` must be a positive int"),
        (dict(num_kv_heads=2), ValueError, r"num_kv_heads=2 but the key/value weight has 4 heads"),
        (
            dict(method="both_halves"),
            ValueError,
            r"unknown method 'both_halves'; expected one of \('half_split', 'joint'\)",
        ),
        (dict(whitening="left"), ValueError, r"unknown whitening 'left'"),
        (dict(connection="euclid"), ValueError, r"unknown connection 'euclid'"),
        (dict(msign_backend="qr"), ValueError, r"unknown msign_backend 'qr'"),
        (dict(root_method="chol"), ValueError, r"unknown root_method 'chol'"),
        (dict(isotropic="yes"), TypeError, r"`isotropic` must be a bool"),
        (dict(lam=-1.0), ValueError, r"`lam` must be a finite number >= 0"),
        (dict(eta=-0.1), ValueError, r"`eta` must be a number >= 0"),
        (dict(beta=1.0), ValueError, r"`beta` must be in \[0, 1\)"),
        (dict(weight_decay=-1.0), ValueError, r"`weight_decay` must be >= 0"),
        (dict(on_nonfinite="ignore"), ValueError, r"unknown on_nonfinite 'ignore'"),
        (dict(momentum_reproject=True), ValueError, r"momentum_reproject=True .* choose a connection"),
    ],
)
def test_qk_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _qk(**over)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (
            dict(wo=torch.randn(24, 16), go=torch.randn(24, 16), mo=torch.zeros(24, 16)),
            ValueError,
            r"`wo` has shape \(24, 16\); expected \(32, num_heads\*4\)",
        ),
        (
            dict(wo=torch.randn(32, 18), go=torch.randn(32, 18), mo=torch.zeros(32, 18)),
            ValueError,
            r"`wo` has 18 in-features, not divisible by head_dim=4",
        ),
        (
            dict(wv=torch.randn(15, 32), gv=torch.randn(15, 32), mv=torch.zeros(15, 32)),
            ValueError,
            r"`wv` has 15 out-features",
        ),
        (dict(go=torch.randn(16, 32)), ValueError, r"`go` has shape \(16, 32\), expected \(32, 16\)"),
        (dict(hybrid=1), TypeError, r"`hybrid` must be a bool"),
        (
            dict(
                wo=torch.randn(32, 16, device="meta"),
                go=torch.randn(32, 16, device="meta"),
                mo=torch.zeros(32, 16, device="meta"),
            ),
            ValueError,
            r"`wv` is on cpu but `wo` is on meta",
        ),
    ],
)
def test_ov_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _ov(**over)


def test_joint_hybrid_works_with_gqa():
    # the head-axis stacking ((H + Hkv) d x D) needs no H == Hkv (it was refused with column stacking)
    assert _ov(wv=torch.randn(8, 32), gv=torch.randn(8, 32), mv=torch.zeros(8, 32), method="joint")
    assert _ov(wv=torch.randn(8, 32), gv=torch.randn(8, 32), mv=torch.zeros(8, 32), method="joint", hybrid=False)


def test_every_variant_combination_runs_finite():
    import itertools

    torch.manual_seed(5)
    for method, iso, white, conn, renorm, hybrid in itertools.product(
        ("half_split", "joint"),
        (False, True),
        ("both", "pre", "post", "none"),
        ("none", "frobenius", "scale_aware", "frobenius_scalar", "scale_aware_scalar"),
        (False, True),
        (False, True),
    ):
        wv, wo = torch.randn(16, 32), torch.randn(32, 16)
        ok = cm_ov(
            wv,
            wo,
            torch.randn(16, 32),
            torch.randn(32, 16),
            torch.zeros(16, 32),
            torch.zeros(32, 16),
            head_dim=4,
            eta=0.1,
            method=method,
            isotropic=iso,
            whitening=white,
            connection=conn,
            per_mat_renorm=renorm,
            hybrid=hybrid,
            momentum_reproject=conn != "none",
        )
        assert ok and torch.isfinite(wv).all() and torch.isfinite(wo).all()


def test_finite_flags_fast_path_and_overflow_fallback():
    """The finiteness check sums each tensor; a finite tensor whose sum overflows is still finite."""
    from compositional_muon.cm import finite_flags

    huge = torch.full((8,), 3e38)  # sum overflows float32 to inf, every element is finite
    nan = torch.tensor([1.0, float("nan")])
    infs = torch.tensor([float("inf"), -float("inf")])  # sum is NaN
    bf16 = torch.ones(3, dtype=torch.bfloat16)
    assert finite_flags([huge, nan, infs, bf16]).tolist() == [True, False, False, True]
    assert finite_flags([huge, bf16]).tolist() == [True, True]
    assert finite_flags([]).numel() == 0
