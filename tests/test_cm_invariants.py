"""The invariants of docs/math.md, in float64 with the exact SVD msign.

Each test names the invariant it proves; each was checked to fail when the rule it guards is
broken (see the mutation notes in the comments).
"""

import itertools

import pytest
import torch

from cm_reference import heads_cols, heads_rows, inv_root, polar, ref_ov, ref_qk
from compositional_muon import cm_ov, cm_qk
from compositional_muon.connection import CONNECTIONS, horizontal_projection

F64 = torch.float64
EXACT = dict(msign_backend="svd", lam=0.0)


def rnd(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def qk_problem(H=4, Hkv=4, d=8, D=32, seed=0):
    return (
        rnd(H * d, D, seed=seed),
        rnd(Hkv * d, D, seed=seed + 1),
        rnd(H * d, D, seed=seed + 2),
        rnd(Hkv * d, D, seed=seed + 3),
    )


def ov_problem(H=4, Hkv=4, d=8, D=32, seed=10):
    return (
        rnd(Hkv * d, D, seed=seed),
        rnd(D, H * d, seed=seed + 1),
        rnd(Hkv * d, D, seed=seed + 2),
        rnd(D, H * d, seed=seed + 3),
    )


def run_qk(wq, wk, gq, gk, d, eta=0.1, **kw):
    wq1, wk1 = wq.clone(), wk.clone()
    cm_qk(wq1, wk1, gq, gk, torch.zeros_like(wq), torch.zeros_like(wk), head_dim=d, eta=eta, **{**EXACT, **kw})
    return wq1 - wq, wk1 - wk


def run_ov(wv, wo, gv, go, d, eta=0.1, **kw):
    wv1, wo1 = wv.clone(), wo.clone()
    cm_ov(wv1, wo1, gv, go, torch.zeros_like(wv), torch.zeros_like(wo), head_dim=d, eta=eta, **{**EXACT, **kw})
    return wv1 - wv, wo1 - wo


def opnorm(x):
    return torch.linalg.matrix_norm(x, 2)


# ------------------------------------------------------------------------------------------------
# Agreement with the per-head reference transcription
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_qk_matches_per_head_reference(H, Hkv):
    wq, wk, gq, gk = qk_problem(H, Hkv)
    dq, dk = run_qk(wq, wk, gq, gk, 8, lam=1e-2)
    rq, rk = ref_qk(wq, wk, gq, gk, 8, 0.1, 1e-2)
    torch.testing.assert_close(dq, rq, rtol=0, atol=1e-12)
    torch.testing.assert_close(dk, rk, rtol=0, atol=1e-12)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("hybrid", [True, False])
def test_ov_matches_per_head_reference(H, Hkv, hybrid):
    wv, wo, gv, go = ov_problem(H, Hkv)
    dv, do = run_ov(wv, wo, gv, go, 8, lam=1e-2, hybrid=hybrid)
    rv, ro = ref_ov(wv, wo, gv, go, 8, 0.1, 1e-2, hybrid)
    torch.testing.assert_close(dv, rv, rtol=0, atol=1e-12)
    torch.testing.assert_close(do, ro, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Invariant 1: composed-norm bound (equality for full-row-rank partners and lam = 0)
# ------------------------------------------------------------------------------------------------


def test_qk_composed_norm_bound_with_equality():
    wq, wk, gq, gk = qk_problem()
    eta, d = 0.1, 8
    dq, dk = run_qk(wq, wk, gq, gk, d, eta)
    Q, K, dQ, dK = (heads_rows(t, d) for t in (wq, wk, dq, dk))
    for h in range(4):
        torch.testing.assert_close(opnorm(dQ[h].T @ K[h]), torch.tensor(eta / 2, dtype=F64))
        torch.testing.assert_close(opnorm(Q[h].T @ dK[h]), torch.tensor(eta / 2, dtype=F64))
        assert opnorm(dQ[h].T @ K[h] + Q[h].T @ dK[h]) <= eta + 1e-12


@pytest.mark.parametrize("hybrid", [True, False])
def test_ov_composed_norm_bound_both_legs(hybrid):
    wv, wo, gv, go = ov_problem()
    eta, d = 0.1, 8
    dv, do = run_ov(wv, wo, gv, go, d, eta, hybrid=hybrid)
    V, O, dV, dO = heads_rows(wv, d), heads_cols(wo, d), heads_rows(dv, d), heads_cols(do, d)
    for h in range(4):
        torch.testing.assert_close(opnorm(O[h] @ dV[h]), torch.tensor(eta / 2, dtype=F64))
        bound_o = opnorm(dO[h] @ V[h])
        assert bound_o <= eta / 2 + 1e-12
        if not hybrid:
            torch.testing.assert_close(bound_o, torch.tensor(eta / 2, dtype=F64))


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_bound_holds_with_ridge_and_rank_deficient_partners(lam):
    # Partner of rank 3 < d: only a ridge makes the root finite; the bound still holds (strictly).
    d, D = 8, 32
    wq, wk, gq, gk = qk_problem()
    low = rnd(4 * d, 3, seed=40) @ rnd(3, D, seed=41)
    dq, dk = run_qk(wq, low, gq, gk, d, 0.1, lam=lam)
    for h, (q, k) in enumerate(zip(heads_rows(dq, d), heads_rows(low, d))):
        assert opnorm(q.T @ k) <= 0.05 + 1e-12
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1)])
def test_gqa_bound_every_query_head_against_shared_key(H, Hkv):
    d, eta = 8, 0.1
    wq, wk, gq, gk = qk_problem(H, Hkv)
    dq, dk = run_qk(wq, wk, gq, gk, d, eta, num_kv_heads=Hkv)
    Q, K, dQ, dK = (heads_rows(t, d) for t in (wq, wk, dq, dk))
    G = H // Hkv
    for h in range(H):
        g = h // G
        torch.testing.assert_close(opnorm(dQ[h].T @ K[g]), torch.tensor(eta / 2, dtype=F64))
        assert opnorm(Q[h].T @ dK[g]) <= eta / 2 + 1e-12
    for g in range(Hkv):  # the stacked bound, with equality: ||[Q_h^T dK_g]_h||_op = eta/2
        stacked = torch.cat([Q[h].T for h in range(g * G, (g + 1) * G)]) @ dK[g]
        torch.testing.assert_close(opnorm(stacked), torch.tensor(eta / 2, dtype=F64))
    wv, wo, gv, go = ov_problem(H, Hkv)
    dv, do = run_ov(wv, wo, gv, go, d, eta, num_kv_heads=Hkv)
    V, O, dV, dO = heads_rows(wv, d), heads_cols(wo, d), heads_rows(dv, d), heads_cols(do, d)
    for h in range(H):
        assert opnorm(O[h] @ dV[h // G]) <= eta / 2 + 1e-12
        assert opnorm(dO[h] @ V[h // G]) <= eta / 2 + 1e-12


# ------------------------------------------------------------------------------------------------
# Invariant 2: steepest descent
# ------------------------------------------------------------------------------------------------


def test_qk_steepest_descent_identity_and_optimality():
    d, eta = 8, 0.1
    wq, wk, gq, gk = qk_problem()
    dq, _ = run_qk(wq, wk, gq, gk, d, eta)
    for h, (k, g, u) in enumerate(zip(heads_rows(wk, d), heads_rows(gq, d), heads_rows(dq, d))):
        Cinv = inv_root(k @ k.T, 0.0)
        nuc = torch.linalg.matrix_norm(Cinv @ g, "nuc")
        torch.testing.assert_close((g * u).sum(), -(eta / 2) * nuc)
        # no feasible direction (||P^T k||_op <= eta/2) decreases the linear model more
        for s in range(20):
            P = rnd(d, 32, seed=100 + s)
            P = P * (eta / 2) / opnorm(P.T @ k)
            assert (g * P).sum() >= (g * u).sum() - 1e-12


def test_ov_steepest_descent_identities():
    d, eta = 8, 0.1
    wv, wo, gv, go = ov_problem()
    dv, do = run_ov(wv, wo, gv, go, d, eta, hybrid=False)
    O, V = heads_cols(wo, d), heads_rows(wv, d)
    for h in range(4):
        Co = inv_root(O[h].T @ O[h], 0.0)
        gvh, dvh = heads_rows(gv, d)[h], heads_rows(dv, d)[h]
        torch.testing.assert_close((gvh * dvh).sum(), -(eta / 2) * torch.linalg.matrix_norm(Co @ gvh, "nuc"))
        Cv = inv_root(V[h] @ V[h].T, 0.0)
        goh, doh = heads_cols(go, d)[h], heads_cols(do, d)[h]
        torch.testing.assert_close((goh * doh).sum(), -(eta / 2) * torch.linalg.matrix_norm(goh @ Cv, "nuc"))
    # hybrid: steepest descent for the whole O under the stacked bound
    _, do = run_ov(wv, wo, gv, go, d, eta, hybrid=True)
    whitened = torch.cat([goh @ inv_root(v @ v.T, 0.0) for goh, v in zip(heads_cols(go, d), V)], dim=1)
    torch.testing.assert_close((go * do).sum(), -(eta / 2) * torch.linalg.matrix_norm(whitened, "nuc"))


# ------------------------------------------------------------------------------------------------
# Invariant 3: gauge invariance (and plain Muon's lack of it)
# ------------------------------------------------------------------------------------------------


def _qk_loss_grads(wq, wk, d, target):
    """Gradients of a nonlinear loss that sees the weights only through M_h = Wq_h^T Wk_h."""
    wq = wq.clone().requires_grad_(True)
    wk = wk.clone().requires_grad_(True)
    loss = 0.0
    for h, (q, k) in enumerate(zip(heads_rows(wq, d), heads_rows(wk, d))):
        M = q.T @ k
        loss = loss + torch.tanh(M * target[h]).sum() + 0.5 * (M**2).sum()
    gq, gk = torch.autograd.grad(loss, (wq, wk))
    return gq, gk


def _composed_qk(wq, wk, dq, dk, d):
    return [dQ.T @ k + q.T @ dK for q, k, dQ, dK in zip(*(heads_rows(t, d) for t in (wq, wk, dq, dk)))]


def _gauge(d, H, seed):
    A = [rnd(d, d, seed=seed + h) + 2 * torch.eye(d, dtype=F64) for h in range(H)]
    return A, [torch.linalg.inv(a).T for a in A]


def _apply_rows(w, mats, d):
    return torch.cat([m @ b for m, b in zip(mats, heads_rows(w, d))])


@pytest.mark.parametrize(
    "connection,method", [(c, "half_split") for c in CONNECTIONS] + [("none", "joint"), ("frobenius", "joint")]
)
def test_qk_gauge_invariance(connection, method):
    d, D, H = 4, 12, 3
    wq, wk = rnd(H * d, D, seed=1), rnd(H * d, D, seed=2)
    target = rnd(H, D, D, seed=3)
    A, AinvT = _gauge(d, H, 50)
    wq2, wk2 = _apply_rows(wq, A, d), _apply_rows(wk, AinvT, d)
    kw = dict(connection=connection, method=method)
    dq, dk = run_qk(wq, wk, *_qk_loss_grads(wq, wk, d, target), d, **kw)
    dq2, dk2 = run_qk(wq2, wk2, *_qk_loss_grads(wq2, wk2, d, target), d, **kw)
    for m1, m2 in zip(_composed_qk(wq, wk, dq, dk, d), _composed_qk(wq2, wk2, dq2, dk2, d)):
        torch.testing.assert_close(m1, m2, rtol=0, atol=1e-10)


def test_plain_muon_is_not_gauge_invariant():
    d, D, H = 4, 12, 3
    wq, wk = rnd(H * d, D, seed=1), rnd(H * d, D, seed=2)
    target = rnd(H, D, D, seed=3)
    A, AinvT = _gauge(d, H, 50)
    wq2, wk2 = _apply_rows(wq, A, d), _apply_rows(wk, AinvT, d)

    def muon(wq, wk):
        gq, gk = _qk_loss_grads(wq, wk, d, target)
        return -0.05 * polar(gq), -0.05 * polar(gk)  # per-matrix Muon on q_proj / k_proj

    m1 = _composed_qk(wq, wk, *muon(wq, wk), d)
    m2 = _composed_qk(wq2, wk2, *muon(wq2, wk2), d)
    assert max((a - b).norm() / a.norm() for a, b in zip(m1, m2)) > 0.1
    # per-head Muon (whitening="none") is not invariant either
    dq, dk = run_qk(wq, wk, *_qk_loss_grads(wq, wk, d, target), d, whitening="none")
    dq2, dk2 = run_qk(wq2, wk2, *_qk_loss_grads(wq2, wk2, d, target), d, whitening="none")
    m1, m2 = _composed_qk(wq, wk, dq, dk, d), _composed_qk(wq2, wk2, dq2, dk2, d)
    assert max((a - b).norm() / a.norm() for a, b in zip(m1, m2)) > 0.1


@pytest.mark.parametrize("method", ["half_split", "joint"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_ov_gauge_invariance(hybrid, method):
    # Wo_h -> Wo_h A_h, Wv_h -> A_h^-1 Wv_h leaves Wo_h Wv_h unchanged. Hybrid O is invariant too:
    # each whitened block Go_h C_V^-1 is multiplied on the right by an orthogonal R_h, and
    # msign(X diag(R_1..R_H)) = msign(X) diag(R_1..R_H).
    d, D, H = 4, 12, 3
    wv, wo = rnd(H * d, D, seed=5), rnd(D, H * d, seed=6)
    target = rnd(H, D, D, seed=7)

    def grads(wv, wo):
        wv = wv.clone().requires_grad_(True)
        wo = wo.clone().requires_grad_(True)
        loss = sum(
            torch.tanh((o @ v) * target[h]).sum() + 0.5 * ((o @ v) ** 2).sum()
            for h, (v, o) in enumerate(zip(heads_rows(wv, d), heads_cols(wo, d)))
        )
        return torch.autograd.grad(loss, (wv, wo))

    def composed(wv, wo, dv, do):
        return [
            o @ dV + dO @ v
            for v, o, dV, dO in zip(heads_rows(wv, d), heads_cols(wo, d), heads_rows(dv, d), heads_cols(do, d))
        ]

    A = [rnd(d, d, seed=60 + h) + 2 * torch.eye(d, dtype=F64) for h in range(H)]
    wv2 = torch.cat([torch.linalg.inv(a) @ v for a, v in zip(A, heads_rows(wv, d))])
    wo2 = torch.cat([o @ a for a, o in zip(A, heads_cols(wo, d))], dim=1)
    dv, do = run_ov(wv, wo, *grads(wv, wo), d, hybrid=hybrid, method=method)
    dv2, do2 = run_ov(wv2, wo2, *grads(wv2, wo2), d, hybrid=hybrid, method=method)
    for m1, m2 in zip(composed(wv, wo, dv, do), composed(wv2, wo2, dv2, do2)):
        torch.testing.assert_close(m1, m2, rtol=0, atol=1e-10)


def test_joint_gqa_gauge_invariance_per_key_value_group():
    # GQA: one gauge S_g per key head acts on all G query heads of its group (Wq_h -> S_g Wq_h,
    # Wk_g -> S_g^-T Wk_g). Stacking [X_q1; ...; X_qG; X_k] rows multiplies the stack on the left by
    # blockdiag(Q_a, ..., Q_a, Q_b) with orthogonal Q's, which msign commutes with.
    d, D, H, Hkv = 4, 16, 4, 2
    G = H // Hkv
    wq, wk = rnd(H * d, D, seed=11), rnd(Hkv * d, D, seed=12)
    target = rnd(H, D, D, seed=13)

    def grads(wq, wk):
        wq, wk = wq.clone().requires_grad_(True), wk.clone().requires_grad_(True)
        Q, K = heads_rows(wq, d), heads_rows(wk, d)
        loss = sum(torch.tanh((Q[h].T @ K[h // G]) * target[h]).sum() for h in range(H))
        return torch.autograd.grad(loss, (wq, wk))

    def composed(wq, wk, dq, dk):
        Q, K, dQ, dK = (heads_rows(t, d) for t in (wq, wk, dq, dk))
        return [dQ[h].T @ K[h // G] + Q[h].T @ dK[h // G] for h in range(H)]

    S, SinvT = _gauge(d, Hkv, 70)
    wq2 = _apply_rows(wq, [S[h // G] for h in range(H)], d)
    wk2 = _apply_rows(wk, SinvT, d)
    dq, dk = run_qk(wq, wk, *grads(wq, wk), d, method="joint")
    dq2, dk2 = run_qk(wq2, wk2, *grads(wq2, wk2), d, method="joint")
    for m1, m2 in zip(composed(wq, wk, dq, dk), composed(wq2, wk2, dq2, dk2)):
        torch.testing.assert_close(m1, m2, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Invariant 4: reduction to per-head Muon; invariant 5: isotropic == full for isotropic Grams
# ------------------------------------------------------------------------------------------------


def _orthonormal_rows(H, d, D, seed, scales=None):
    rows = []
    for h in range(H):
        q, _ = torch.linalg.qr(rnd(D, d, seed=seed + h))
        rows.append(q.T * (1.0 if scales is None else scales[h]))
    return torch.cat(rows)


def test_reduction_to_per_head_muon_with_orthonormal_partners():
    d, D, H, eta = 8, 32, 4, 0.1
    wq, wk = _orthonormal_rows(H, d, D, 200), _orthonormal_rows(H, d, D, 300)
    gq, gk = rnd(H * d, D, seed=1), rnd(H * d, D, seed=2)
    dq, dk = run_qk(wq, wk, gq, gk, d, eta)
    torch.testing.assert_close(dq, torch.cat([-(eta / 2) * polar(g) for g in heads_rows(gq, d)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(dk, torch.cat([-(eta / 2) * polar(g) for g in heads_rows(gk, d)]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 1e-2])
def test_isotropic_equals_full_whitening_for_isotropic_grams(lam):
    d, D, H = 8, 32, 4
    sc = [0.3, 1.0, 2.5, 7.0]
    wq, wk = _orthonormal_rows(H, d, D, 400, sc), _orthonormal_rows(H, d, D, 500, sc[::-1])
    gq, gk = rnd(H * d, D, seed=3), rnd(H * d, D, seed=4)
    full = run_qk(wq, wk, gq, gk, d, lam=lam)
    iso = run_qk(wq, wk, gq, gk, d, lam=lam, isotropic=True)
    for a, b in zip(full, iso):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    wo = torch.cat([o.T for o in heads_rows(_orthonormal_rows(H, d, D, 600, sc), d)], dim=1)
    wv = _orthonormal_rows(H, d, D, 700, sc)
    gv, go = rnd(H * d, D, seed=5), rnd(D, H * d, seed=6)
    for hybrid in (True, False):
        full = run_ov(wv, wo, gv, go, d, lam=lam, hybrid=hybrid)
        iso = run_ov(wv, wo, gv, go, d, lam=lam, hybrid=hybrid, isotropic=True)
        for a, b in zip(full, iso):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_isotropic_is_partner_rescaled_muon():
    d, eta, lam = 8, 0.1, 1e-2
    wq, wk, gq, gk = qk_problem()
    dq, _ = run_qk(wq, wk, gq, gk, d, eta, lam=lam, isotropic=True)
    for k, g, u in zip(heads_rows(wk, d), heads_rows(gq, d), heads_rows(dq, d)):
        c = ((k**2).sum() / d + lam).sqrt()
        torch.testing.assert_close(u, -(eta / (2 * c)) * polar(g), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Connections: horizontal in their metric, composed first-order update unchanged
# ------------------------------------------------------------------------------------------------


def _metric(name, lam, A, B):
    """Inner products of the connection's metric on (P, Q) pairs, A: (H,d,D), B: (Hkv,d,D)."""
    G = A.shape[0] // B.shape[0]
    eye = torch.eye(A.shape[1], dtype=F64)
    if name.startswith("frobenius"):
        return lambda P1, Q1, P2, Q2: (P1 * P2).sum() + (Q1 * Q2).sum()
    Cb2 = [b @ b.T + lam * eye for b in B]
    Ca2 = [sum(A[h] @ A[h].T for h in range(g * G, (g + 1) * G)) + lam * eye for g in range(B.shape[0])]
    return lambda P1, Q1, P2, Q2: (
        sum((P1[h] * (Cb2[h // G] @ P2[h])).sum() for h in range(A.shape[0]))
        + sum((Q1[g] * (Ca2[g] @ Q2[g])).sum() for g in range(B.shape[0]))
    )


@pytest.mark.parametrize("connection", [c for c in CONNECTIONS if c != "none"])
@pytest.mark.parametrize("H,Hkv", [(3, 3), (4, 2)])
def test_connection_removes_vertical_component(connection, H, Hkv):
    d, D, lam = 4, 10, 0.05
    A, B = rnd(1, H, d, D, seed=1), rnd(1, Hkv, d, D, seed=2)
    P, Q = rnd(1, H, d, D, seed=3), rnd(1, Hkv, d, D, seed=4)
    P2, Q2 = horizontal_projection(A, B, P, Q, connection, lam)
    inner = _metric(connection, lam, A[0], B[0])
    G = H // Hkv
    gens = (
        [torch.eye(d, dtype=F64)]
        if connection.endswith("scalar")
        else [
            torch.zeros(d, d, dtype=F64).index_put_((torch.tensor(i), torch.tensor(j)), torch.tensor(1.0, dtype=F64))
            for i, j in itertools.product(range(d), range(d))
        ]
    )
    for g in range(Hkv):
        for X in gens:  # vertical direction of group g generated by X
            VP = torch.zeros_like(P[0])
            VQ = torch.zeros_like(Q[0])
            for h in range(g * G, (g + 1) * G):
                VP[h] = X @ A[0, h]
            VQ[g] = -X.T @ B[0, g]
            assert abs(inner(P2[0], Q2[0], VP, VQ)) < 1e-9
            assert abs(inner(P[0], Q[0], VP, VQ)) > 1e-6 or connection.endswith("scalar")
    # composed first-order change unchanged
    for h in range(H):
        before = P[0, h].T @ B[0, h // G] + A[0, h].T @ Q[0, h // G]
        after = P2[0, h].T @ B[0, h // G] + A[0, h].T @ Q2[0, h // G]
        torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    # idempotent
    P3, Q3 = horizontal_projection(A, B, P2, Q2, connection, lam)
    torch.testing.assert_close(P3, P2, rtol=0, atol=1e-10)
    torch.testing.assert_close(Q3, Q2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("connection", [c for c in CONNECTIONS if c != "none"])
def test_connection_in_cm_keeps_composed_update(connection):
    d = 8
    wq, wk, gq, gk = qk_problem()
    base = _composed_qk(wq, wk, *run_qk(wq, wk, gq, gk, d), d)
    conn = _composed_qk(wq, wk, *run_qk(wq, wk, gq, gk, d, connection=connection), d)
    for a, b in zip(base, conn):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    wv, wo, gv, go = ov_problem()
    dv0, do0 = run_ov(wv, wo, gv, go, d)
    dv1, do1 = run_ov(wv, wo, gv, go, d, connection=connection)
    for h, (v, o) in enumerate(zip(heads_rows(wv, d), heads_cols(wo, d))):
        c0 = o @ heads_rows(dv0, d)[h] + heads_cols(do0, d)[h] @ v
        c1 = o @ heads_rows(dv1, d)[h] + heads_cols(do1, d)[h] @ v
        torch.testing.assert_close(c0, c1, rtol=0, atol=1e-10)
    assert not torch.allclose(dv0, dv1)  # the connection did change the factors


def test_scalar_connection_formula():
    # frobenius_scalar: x = (<Wq,dQ> - <Wk,dK>) / (||Wq||^2 + ||Wk||^2) per head pair
    A, B, P, Q = (rnd(1, 1, 4, 10, seed=s) for s in range(4))
    P2, Q2 = horizontal_projection(A, B, P, Q, "frobenius_scalar", 0.0)
    x = ((A * P).sum() - (B * Q).sum()) / ((A**2).sum() + (B**2).sum())
    torch.testing.assert_close(P2, P - x * A)
    torch.testing.assert_close(Q2, Q + x * B)


def test_vertical_update_projects_to_zero():
    A, B = rnd(1, 2, 4, 10, seed=1), rnd(1, 2, 4, 10, seed=2)
    X = rnd(2, 4, 4, seed=3)
    P, Q = X.unsqueeze(0) @ A, -(X.mT.unsqueeze(0) @ B)
    for c in ("frobenius", "scale_aware"):
        P2, Q2 = horizontal_projection(A, B, P, Q, c, 0.1)
        assert P2.abs().max() < 1e-10 and Q2.abs().max() < 1e-10


# ------------------------------------------------------------------------------------------------
# Variants: joint, whitening sides, per_mat_renorm
# ------------------------------------------------------------------------------------------------


def test_joint_is_steepest_descent_for_the_head_stacked_norm():
    # joint stacks the whitened factors along the head axis, S = [C_K^-1 Gq_h; C_Q^-1 Gk_h] (2d x D),
    # Z = msign(S), and steps eta/2 on each factor (mutation: column stacking [.|.] or step eta fail)
    d, eta = 8, 0.1
    wq, wk, gq, gk = qk_problem()
    dq, dk = run_qk(wq, wk, gq, gk, d, eta, method="joint")
    Q, K = heads_rows(wq, d), heads_rows(wk, d)
    for h in range(4):
        Ck, Cq = inv_root(K[h] @ K[h].T, 0.0), inv_root(Q[h] @ Q[h].T, 0.0)
        S = torch.cat([Ck @ heads_rows(gq, d)[h], Cq @ heads_rows(gk, d)[h]], dim=0)  # 2d x D
        Z = polar(S)
        Za, Zb = Z[:d], Z[d:]
        torch.testing.assert_close(heads_rows(dq, d)[h], -eta / 2 * Ck @ Za, rtol=0, atol=1e-12)
        torch.testing.assert_close(heads_rows(dk, d)[h], -eta / 2 * Cq @ Zb, rtol=0, atol=1e-12)
        # one budget: Z Z^T = I_2d, so each block is a partial isometry and their row spaces are orthogonal
        torch.testing.assert_close(Z @ Z.T, torch.eye(2 * d, dtype=F64), rtol=0, atol=1e-12)
        dM = heads_rows(dq, d)[h].T @ K[h] + Q[h].T @ heads_rows(dk, d)[h]
        assert opnorm(dM) <= eta / 2 * (opnorm(Za) + opnorm(Zb)) + 1e-12 <= eta * (1 + 1e-10)
        inner = (heads_rows(gq, d)[h] * heads_rows(dq, d)[h]).sum() + (
            heads_rows(gk, d)[h] * heads_rows(dk, d)[h]
        ).sum()
        torch.testing.assert_close(inner, -eta / 2 * torch.linalg.matrix_norm(S, "nuc"))


@pytest.mark.parametrize("Hkv", [4, 2])
def test_joint_ov_hybrid_is_one_msign_over_whole_matrices(Hkv):
    # ((H + Hkv) d x D): the whole whitened W_o^T over the whole whitened W_v; GQA works too
    d, eta, H = 8, 0.1, 4
    G = H // Hkv
    wv, wo, gv, go = ov_problem(H, Hkv)
    dv, do = run_ov(wv, wo, gv, go, d, eta, method="joint", hybrid=True)
    V, O = heads_rows(wv, d), heads_cols(wo, d)
    Cv = [inv_root(V[h // G] @ V[h // G].T, 0.0) for h in range(H)]
    Co = [inv_root(sum(O[h].T @ O[h] for h in range(g * G, (g + 1) * G)), 0.0) for g in range(Hkv)]
    left = torch.cat([c @ g for c, g in zip(Co, heads_rows(gv, d))])  # whitened V grads (Hkv d x D)
    right = torch.cat([(g @ c).T for c, g in zip(Cv, heads_cols(go, d))])  # whitened O^T grads (H d x D)
    Z = polar(torch.cat([right, left], dim=0))
    for h in range(H):
        torch.testing.assert_close(
            heads_cols(do, d)[h], -eta / 2 * (Cv[h] @ Z[h * d : (h + 1) * d]).T, rtol=0, atol=1e-12
        )
    for g in range(Hkv):
        rows = slice(H * d + g * d, H * d + (g + 1) * d)
        torch.testing.assert_close(heads_rows(dv, d)[g], -eta / 2 * Co[g] @ Z[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("whitening", ["pre", "post", "none"])
def test_whitening_sides(whitening):
    d, eta, lam = 8, 0.1, 1e-2
    wq, wk, gq, gk = qk_problem()
    dq, _ = run_qk(wq, wk, gq, gk, d, eta, lam=lam, whitening=whitening)
    for k, g, u in zip(heads_rows(wk, d), heads_rows(gq, d), heads_rows(dq, d)):
        C = inv_root(k @ k.T, lam)
        expect = {"pre": polar(C @ g), "post": C @ polar(g), "none": polar(g)}[whitening]
        torch.testing.assert_close(u, -(eta / 2) * expect, rtol=0, atol=1e-12)


def test_per_mat_renorm_restores_leg_norm():
    d, eta = 8, 0.1
    wq, wk, gq, gk = qk_problem()
    dq, dk = run_qk(wq, wk, gq, gk, d, eta, lam=1e-2, per_mat_renorm=True)
    plain_q, plain_k = run_qk(wq, wk, gq, gk, d, eta, lam=1e-2)
    # msign of each (d x D) head block has Frobenius norm sqrt(d); the leg has H of them.
    expect = (eta / 2) * (4 * d) ** 0.5
    torch.testing.assert_close(dq.norm(), torch.tensor(expect, dtype=F64))
    torch.testing.assert_close(dk.norm(), torch.tensor(expect, dtype=F64))
    # the per-head allocation (direction and relative size) is that of the whitened update
    torch.testing.assert_close(dq / dq.norm(), plain_q / plain_q.norm())


# ------------------------------------------------------------------------------------------------
# Invariant 6: shape sweeps and degenerate inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,D", [(8, 32), (8, 8), (8, 4)])  # wide, square, tall head blocks
@pytest.mark.parametrize("backend,tol", [("svd", 1e-12), ("polar_express", 0.02)])
def test_shape_sweep_bound(d, D, backend, tol):
    H, eta, lam = 3, 0.1, 1e-3
    wq, wk = rnd(H * d, D, seed=1), rnd(H * d, D, seed=2)
    gq, gk = rnd(H * d, D, seed=3), rnd(H * d, D, seed=4)
    dq, dk = run_qk(
        wq, wk, gq, gk, d, eta, lam=lam, msign_backend=backend, msign_dtype=torch.float32 if backend != "svd" else None
    )
    for q, k, dQ, dK in zip(*(heads_rows(t, d) for t in (wq, wk, dq, dk))):
        assert opnorm(dQ.T @ k) <= eta / 2 * (1 + tol)
        assert opnorm(q.T @ dK) <= eta / 2 * (1 + tol)


def test_zero_gradients_give_zero_update():
    d = 8
    wq, wk, _, _ = qk_problem()
    dq, dk = run_qk(wq, wk, torch.zeros_like(wq), torch.zeros_like(wk), d)
    assert (dq == 0).all() and (dk == 0).all()
    for backend in ("polar_express", "newton_schulz"):
        dq, dk = run_qk(wq, wk, torch.zeros_like(wq), torch.zeros_like(wk), d, msign_backend=backend)
        assert (dq == 0).all() and (dk == 0).all()


def test_zero_partner_weights_are_finite_with_ridge():
    # zero-initialized W_o: C_O = sqrt(lam) I, so dWv = -(eta/2) lam^(-1/2) msign(Gv) exactly
    d, eta, lam = 8, 0.1, 1e-2
    wv, _, gv, go = ov_problem()
    wo = torch.zeros(32, 4 * d, dtype=F64)
    dv, do = run_ov(wv, wo, gv, go, d, eta, lam=lam)
    expect = torch.cat([-(eta / 2) * lam**-0.5 * polar(g) for g in heads_rows(gv, d)])
    torch.testing.assert_close(dv, expect, rtol=0, atol=1e-12)
    assert torch.isfinite(do).all()
    # ... and the composed bound (here ||Wo_h dWv_h|| = 0) is trivially kept
    wq, wk, gq, gk = qk_problem()
    dq, dk = run_qk(wq, torch.zeros_like(wk), gq, gk, d, eta, lam=lam)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("connection", ["frobenius", "scale_aware"])
def test_momentum_reproject_leaves_horizontal_buffers(connection):
    d, lam = 4, 1e-2
    wq, wk, _, _ = qk_problem(3, 3, d, 12)
    mq, mk = rnd(12, 12, seed=20), rnd(12, 12, seed=21)  # stale momentum, not horizontal
    gq, gk = rnd(12, 12, seed=22), rnd(12, 12, seed=23)
    a, b = wq.clone(), wk.clone()
    cm_qk(
        a,
        b,
        gq,
        gk,
        mq,
        mk,
        head_dim=d,
        eta=0.1,
        lam=lam,
        msign_backend="svd",
        connection=connection,
        momentum_reproject=True,
    )
    # buffers are the projection of beta*m + g at the pre-step weights
    expect = horizontal_projection(
        wq.view(1, 3, d, 12),
        wk.view(1, 3, d, 12),
        (0.95 * rnd(12, 12, seed=20) + gq).view(1, 3, d, 12),
        (0.95 * rnd(12, 12, seed=21) + gk).view(1, 3, d, 12),
        connection,
        lam,
    )
    torch.testing.assert_close(mq, expect[0].reshape(12, 12))
    torch.testing.assert_close(mk, expect[1].reshape(12, 12))
    inner = _metric(connection, lam, wq.view(3, d, 12), wk.view(3, d, 12))
    X = rnd(d, d, seed=24)
    VP = torch.stack([X @ q for q in heads_rows(wq, d)])
    VQ = torch.stack([-X.T @ k for k in heads_rows(wk, d)])
    assert abs(inner(mq.view(3, d, 12), mk.view(3, d, 12), VP, VQ)) < 1e-9
