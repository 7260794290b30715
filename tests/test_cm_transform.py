"""CM composed with a Muon-variant transform (issue 4.5).

``transform="normuon"``: NorMuon's row normalization of the msign output in CM's whitened head
space, rescaled back to the unit's spectral norm (docs/variants.md). Checked against a float64
per-head transcription, for the composed-norm bound, for being the identity where every row of
the msign output already has the same norm, and for checkpoint resume. ``transform="newton"``
and the combinations that are not defined are refused.
"""

import copy

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, msign
from compositional_muon.cm import normalize_head_rows

F64 = torch.float64
D_, H, d = 12, 3, 4
ETA, BETA, BETA2, LAM, EPS = 0.05, 0.9, 0.8, 1e-2, 1e-8


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(D_, D_, bias=False, dtype=F64) for _ in range(4)
        )
        self.head_dim = d


def make(seed=0):
    torch.manual_seed(seed)
    return Attn()


def opt_for(m, **kw):
    spec = AttentionSpec.separate("attn", m.q_proj, m.k_proj, m.v_proj, m.o_proj, head_dim=d)
    kw = dict(
        dict(
            lr=ETA,
            momentum=BETA,
            lam=LAM,
            msign_backend="svd",
            transform="normuon",
            transform_beta2=BETA2,
            transform_eps=EPS,
        ),
        **kw,
    )
    return CompositionalMuon([dict(kind="cm", attention=[spec], **kw)])


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(D_, D_, dtype=F64, generator=g) for _ in range(4)]


def set_grads(m, gs):
    for p, g in zip((m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight), gs):
        p.grad = g.clone()


# ------------------------------------------------------------------------------------------------
# float64 transcription, written per head with loops and SVD
# ------------------------------------------------------------------------------------------------

BACKEND = {"name": "svd"}


def polar(x):
    """The msign of the reference: the exact polar factor, or the library's Newton-Schulz (itself
    tested against SVD in test_msign) where the row normalization must have something to do."""
    if BACKEND["name"] == "svd":
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U @ Vh
    return msign(x, "newton_schulz", dtype=F64)


def inv_root(g):
    s, U = torch.linalg.eigh(g + LAM * torch.eye(g.size(0), dtype=F64))
    return (U * s.rsqrt()) @ U.T


def rownorm(Z, v):
    """One NorMuon row normalization of a msign unit Z (rows x cols), restored to Z's spectral norm."""
    v = BETA2 * v + (1 - BETA2) * (Z * Z).mean(dim=1, keepdim=True)
    Zn = Z / (v.sqrt() + EPS)
    return Zn * (torch.linalg.matrix_norm(Z, 2) / torch.linalg.matrix_norm(Zn, 2)), v


class Reference:
    """Blocks of every factor as d x D (rows = head channels): Q, K, V rows of their weight; O the
    transposed column block of W_O."""

    def __init__(self, m, hybrid):
        self.W = {k: getattr(m, f"{k}_proj").weight.detach().clone() for k in "qkvo"}
        self.M = {k: torch.zeros(D_, D_, dtype=F64) for k in "qkvo"}
        self.v = {k: torch.zeros(H, d, 1, dtype=F64) for k in "qkvo"}
        self.hybrid = hybrid

    def block(self, k, W, h):
        return W[:, h * d : (h + 1) * d].T if k == "o" else W[h * d : (h + 1) * d]

    def put(self, k, W, h, X):
        if k == "o":
            W[:, h * d : (h + 1) * d] = X.T
        else:
            W[h * d : (h + 1) * d] = X

    def step(self, gs):
        for k, g in zip("qkvo", gs):
            self.M[k] = BETA * self.M[k] + g
        new = {k: self.W[k].clone() for k in "qkvo"}
        for a, b in (("q", "k"), ("o", "v")):  # (A, B) as CM pairs them: A = O gets the hybrid msign
            roots = {}
            for h in range(H):
                Ah, Bh = self.block(a, self.W[a], h), self.block(b, self.W[b], h)
                roots[h] = (inv_root(Bh @ Bh.T), inv_root(Ah @ Ah.T))  # (C_B^-1 for A, C_A^-1 for B)
            for k, ri, whole in ((a, 0, self.hybrid and a == "o"), (b, 1, False)):
                X = [roots[h][ri] @ self.block(k, self.M[k], h) for h in range(H)]
                if whole:  # hybrid O: one msign and one row normalization over the stacked heads
                    Z, v = rownorm(polar(torch.cat(X)), self.v[k].reshape(H * d, 1))
                    Zs, self.v[k] = list(Z.split(d)), v.reshape(H, d, 1)
                else:
                    Zs = []
                    for h in range(H):
                        Z, self.v[k][h] = rownorm(polar(X[h]), self.v[k][h])
                        Zs.append(Z)
                for h in range(H):
                    dX = -(ETA / 2) * roots[h][ri] @ Zs[h]
                    self.put(k, new[k], h, self.block(k, self.W[k], h) + dX)
        self.W = new


@pytest.mark.parametrize("backend", ["svd", "newton_schulz"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_normuon_transform_matches_float64_transcription(hybrid, backend, monkeypatch):
    monkeypatch.setitem(BACKEND, "name", backend)
    m = make()
    ref = Reference(m, hybrid)
    opt = opt_for(m, hybrid=hybrid, msign_backend=backend, msign_dtype=None if backend == "svd" else F64)
    for step in range(3):
        gs = grads(step)
        set_grads(m, gs)
        opt.step()
        ref.step(gs)
        for k in "qkvo":
            torch.testing.assert_close(getattr(m, f"{k}_proj").weight.detach(), ref.W[k], rtol=1e-9, atol=1e-11)


def test_normuon_transform_is_not_plain_cm_with_an_inexact_msign():
    """Newton-Schulz leaves rows of unequal norm; the transform evens them out (so it is not a no-op)."""
    outs = []
    for transform in ("none", "normuon"):
        m = make()
        opt = opt_for(m, transform=transform, msign_backend="newton_schulz", msign_dtype=torch.float32)
        set_grads(m, grads(0))
        opt.step()
        outs.append(m.q_proj.weight.detach().clone())
    assert (outs[0] - outs[1]).norm() > 1e-4 * outs[0].norm()


def test_normuon_transform_is_the_identity_for_exact_msign_of_wide_blocks():
    """With the SVD polar factor every row of a full-rank d x D block (d < D) has unit norm, so the
    normalization is a uniform scale that the spectral rescale undoes: same steps as plain CM."""
    ws = []
    for transform in ("none", "normuon"):
        m = make()
        opt = opt_for(m, transform=transform, hybrid=False)
        for step in range(3):
            set_grads(m, grads(step))
            opt.step()
        ws.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*ws):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_normalize_head_rows_keeps_the_spectral_norm_and_the_composed_bound():
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2, 3, 1, d, D_, dtype=F64, generator=g)
    v = torch.rand(2, 3, 1, d, 1, dtype=F64, generator=g)
    out, new_v = normalize_head_rows(Z, v, BETA2, EPS)
    torch.testing.assert_close(torch.linalg.matrix_norm(out, 2), torch.linalg.matrix_norm(Z, 2))
    torch.testing.assert_close(new_v, BETA2 * v + (1 - BETA2) * Z.square().mean(-1, keepdim=True))
    whole, _ = normalize_head_rows(Z, v, BETA2, EPS, unit_dims=2)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(whole.flatten(1, 3), 2), torch.linalg.matrix_norm(Z.flatten(1, 3), 2)
    )
    zero, _ = normalize_head_rows(torch.zeros_like(Z), v, BETA2, EPS)
    assert torch.equal(zero, torch.zeros_like(Z))

    # CM's bound survives: each leg's update in its partner metric, ||C_K dQ_h||_2 <= eta/2 (and the
    # same for K), so the composed first-order change of Q_h^T K_h is at most eta. Polar Express
    # leaves row norms uneven (the transform acts) and its output norm within 1%.
    m = make()
    Wq, Wk = m.q_proj.weight.detach().clone(), m.k_proj.weight.detach().clone()
    opt = opt_for(m, msign_backend="polar_express", msign_dtype=F64)
    set_grads(m, grads(0))
    opt.step()
    dQ, dK = m.q_proj.weight.detach() - Wq, m.k_proj.weight.detach() - Wk
    for h in range(H):
        s = slice(h * d, (h + 1) * d)
        Ck, Cq = inv_root(Wk[s] @ Wk[s].T).inverse(), inv_root(Wq[s] @ Wq[s].T).inverse()
        legs = [torch.linalg.matrix_norm(C @ dX[s], 2) for C, dX in ((Ck, dQ), (Cq, dK))]
        assert max(legs) <= ETA / 2 * 1.01 and min(legs) > ETA / 2 * 0.9, legs
        composed = dQ[s].T @ Wk[s] + Wq[s].T @ dK[s]
        assert torch.linalg.matrix_norm(composed, 2) <= ETA * 1.01


def test_normuon_transform_state_dict_resume_is_exact():
    m = make()
    opt = opt_for(m, msign_backend="newton_schulz", msign_dtype=F64)
    for step in range(2):
        set_grads(m, grads(step))
        opt.step()
    assert "head_moment" in opt.state[m.q_proj.weight]
    m2 = copy.deepcopy(m)
    opt2 = opt_for(m2, msign_backend="newton_schulz", msign_dtype=F64)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for mm, oo in ((m, opt), (m2, opt2)):
        set_grads(mm, grads(5))
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_refusals():
    m = make()
    with pytest.raises(ValueError, match="o_proj"):
        opt_for(m, transform="newton")
    with pytest.raises(ValueError, match="half_split"):
        opt_for(m, transform="normuon", method="joint")
    with pytest.raises(ValueError, match="unknown CM transform"):
        opt_for(m, transform="adamuon")
    with pytest.raises(ValueError, match="transform_beta2"):
        opt_for(m, transform_beta2=1.0)


def test_normuon_transform_refused_for_dtensor_params(tmp_path):
    """FSDP2 (DTensor) parameters: transform='normuon' raises a clear error and writes nothing."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = make()
        fully_shard(m)
        before = [p.full_tensor().clone() for p in m.parameters()]
        opt = opt_for(m)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match="DTensor"):
            opt.step()
        for b, p in zip(before, m.parameters()):
            assert torch.equal(b, p.full_tensor())
    finally:
        dist.destroy_process_group()
