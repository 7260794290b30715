"""Independent float64 per-head transcriptions of the CM rules (loops over heads on purpose)."""

import torch


def polar(x):
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    return U @ Vh


def inv_root(g, lam):
    s, U = torch.linalg.eigh(g)
    return U @ torch.diag((s + lam) ** -0.5) @ U.T


def heads_rows(w, d):
    """nn.Linear rows of each head: list of (d, D)."""
    return [w[i * d : (i + 1) * d] for i in range(w.shape[0] // d)]


def heads_cols(w, d):
    """Columns of each head of an o_proj weight: list of (D, d)."""
    return [w[:, i * d : (i + 1) * d] for i in range(w.shape[1] // d)]


def ref_qk(wq, wk, gq, gk, d, eta, lam):
    """Half-split QK update (dWq, dWk) with GQA: key head g partners query heads g*G..g*G+G-1."""
    Q, K, GQ, GK = heads_rows(wq, d), heads_rows(wk, d), heads_rows(gq, d), heads_rows(gk, d)
    G = len(Q) // len(K)
    dq = []
    for h, (q, gqh) in enumerate(zip(Q, GQ)):
        Ck = inv_root(K[h // G] @ K[h // G].T, lam)
        dq.append(-(eta / 2) * Ck @ polar(Ck @ gqh))
    dk = []
    for g, (k, gkh) in enumerate(zip(K, GK)):
        Cq = inv_root(sum(Q[h] @ Q[h].T for h in range(g * G, (g + 1) * G)), lam)
        dk.append(-(eta / 2) * Cq @ polar(Cq @ gkh))
    return torch.cat(dq), torch.cat(dk)


def ref_ov(wv, wo, gv, go, d, eta, lam, hybrid):
    V, O, GV, GO = heads_rows(wv, d), heads_cols(wo, d), heads_rows(gv, d), heads_cols(go, d)
    G = len(O) // len(V)
    dv = []
    for g, (v, gvh) in enumerate(zip(V, GV)):
        Co = inv_root(sum(O[h].T @ O[h] for h in range(g * G, (g + 1) * G)), lam)
        dv.append(-(eta / 2) * Co @ polar(Co @ gvh))
    Cv = [inv_root(V[h // G] @ V[h // G].T, lam) for h in range(len(O))]
    if hybrid:
        Z = polar(torch.cat([goh @ c for goh, c in zip(GO, Cv)], dim=1))
        do = [-(eta / 2) * Z[:, h * d : (h + 1) * d] @ Cv[h] for h in range(len(O))]
    else:
        do = [-(eta / 2) * polar(goh @ c) @ c for goh, c in zip(GO, Cv)]
    return torch.cat(dv), torch.cat(do, dim=1)
