"""NorMuon, AdaMuon, Mano and Newton-Muon against float64 transcriptions of their papers' algorithms.

The transcriptions below are written from the papers' equations (see docs/variants.md) with plain
torch ops and an SVD polar factor; they do not call the library's functional pieces.
"""

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn

from compositional_muon import NonFiniteError
from compositional_muon.variants import AdaMuon, Mano, NewtonMuon, NorMuon, newton_refresh

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rnd(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def polar(x):
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    return U @ Vh


def run_steps(opt, p, grads):
    """Feed ``grads`` one per step; return the parameter after each step."""
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


SHAPES = [(12, 8), (8, 12)]


# ------------------------------------------------------------------------------------------------
# Transcriptions of the papers' algorithms (float64)
# ------------------------------------------------------------------------------------------------


def ref_normuon(W, grads, lr, beta, beta2, eps, wd, nesterov=False, scale="paper"):
    m, n = W.shape
    M, v, out = torch.zeros_like(W), torch.zeros(m, 1, dtype=F64), []
    for G in grads:
        M = beta * M + (1 - beta) * G
        U = (1 - beta) * G + beta * M if nesterov else M
        O = polar(U)
        v = beta2 * v + (1 - beta2) * (O * O).sum(1, keepdim=True) / n
        O_hat = O / (v.sqrt() + eps)
        if scale == "paper":
            step = 0.2 * lr * math.sqrt(m * n) / O_hat.norm() * O_hat
        else:  # the released code: keep ||O||_F, then Muon's sqrt(max(1, m/n))
            step = lr * O_hat * O.norm() / (O_hat.norm() + eps) * max(1.0, m / n) ** 0.5
        W = W - lr * wd * W - step
        out.append(W)
    return out


def ref_adamuon(W, grads, lr, beta, eps, wd, nesterov=True, sign=True, beta2=None):
    m, n = W.shape
    b2 = beta if beta2 is None else beta2
    M, V, out = torch.zeros_like(W), torch.zeros_like(W), []
    for G in grads:
        M = beta * M + G
        U = G + beta * M if nesterov else M
        O = polar(torch.sign(U) if sign else U)
        V = b2 * V + (1 - b2) * O * O
        O_hat = O / (V.sqrt() + eps)
        gamma = 0.2 * math.sqrt(m * n) / O_hat.norm()
        W = W - lr * (gamma * O_hat + wd * W)
        out.append(W)
    return out


def ref_mano(W, grads, lr, mu, eps, wd, version=1, nesterov=False):
    M, out = torch.zeros_like(W), []
    for t, G in enumerate(grads):
        M = mu * M + G
        D = G + mu * M if nesterov else M
        k = t % 2  # 0: every column to unit norm (norm over the rows), 1: every row
        if k == 0:

            def norm(X):
                return X.pow(2).sum(0, keepdim=True).sqrt()

            def inner(X, Y):
                return (X * Y).sum(0, keepdim=True)

            n_k = W.shape[0]
        else:

            def norm(X):
                return X.pow(2).sum(1, keepdim=True).sqrt()

            def inner(X, Y):
                return (X * Y).sum(1, keepdim=True)

            n_k = W.shape[1]
        if version == 1:
            theta_hat = W / torch.clamp(norm(W), min=eps)
            Vt = D - theta_hat * inner(D, theta_hat)
            V_hat = Vt / torch.clamp(norm(Vt), min=eps)
        else:
            Vt = D - W * inner(D, W)
            V_hat = Vt / (norm(Vt) + eps)
        W = W - lr * (0.2 * math.sqrt(n_k) * V_hat + wd * W)
        out.append(W)
    return out


# ------------------------------------------------------------------------------------------------
# One step (several) against the transcriptions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale,nesterov", [("paper", False), ("reference", True)])
def test_normuon_matches_paper(shape, scale, nesterov):
    W0 = rnd(*shape, seed=1)
    grads = [rnd(*shape, seed=10 + i) for i in range(3)]
    p = nn.Parameter(W0.clone())
    opt = NorMuon([p], lr=0.03, weight_decay=0.1, nesterov=nesterov, scale=scale, backend="svd")
    got = run_steps(opt, p, grads)
    want = ref_normuon(W0, grads, 0.03, 0.95, 0.95, 1e-10, 0.1, nesterov=nesterov, scale=scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert opt.state[p]["second_moment"].shape == (shape[0], 1)  # one value per output neuron


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kw", [{}, dict(nesterov=False, sign_stabilize=False, beta2=0.9)])
def test_adamuon_matches_paper(shape, kw):
    W0 = rnd(*shape, seed=2)
    grads = [rnd(*shape, seed=20 + i) for i in range(3)]
    p = nn.Parameter(W0.clone())
    opt = AdaMuon([p], lr=0.03, weight_decay=0.1, backend="svd", **kw)
    got = run_steps(opt, p, grads)
    want = ref_adamuon(
        W0,
        grads,
        0.03,
        0.95,
        1e-8,
        0.1,
        nesterov=kw.get("nesterov", True),
        sign=kw.get("sign_stabilize", True),
        beta2=kw.get("beta2"),
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_adamuon_group_of_several_shapes_matches_paper_per_weight():
    """Weights of two shapes and a conv weight in one group (the second moments and weights
    updated in place over the group at once) and one with zero gradients: each gets its own paper update; the zero one
    only its weight decay (its orthogonalized update is 0, gamma 0, no NaN)."""
    shapes = [(12, 8), (8, 12), (12, 2, 2, 2), (12, 8)]  # a tall conv weight: (12, 8) as a matrix
    W0 = [rnd(*s, seed=40 + i) for i, s in enumerate(shapes)]
    grads = [[rnd(*s, seed=50 + 10 * i + k) * (i != 3) for k in range(3)] for i, s in enumerate(shapes)]
    ps = [nn.Parameter(w.clone()) for w in W0]
    opt = AdaMuon(ps, lr=0.03, weight_decay=0.1, backend="svd")
    for k in range(3):
        for p, g in zip(ps, grads):
            p.grad = g[k].clone()
        opt.step()
    for p, w0, g in zip(ps[:3], W0, grads):
        want = ref_adamuon(w0.flatten(1), [x.flatten(1) for x in g], 0.03, 0.95, 1e-8, 0.1)[-1]
        torch.testing.assert_close(p.detach(), want.view(w0.shape), rtol=0, atol=1e-12)
    torch.testing.assert_close(ps[3].detach(), W0[3] * (1 - 0.03 * 0.1) ** 3, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("version", [1, 2])
def test_mano_matches_paper(shape, version):
    W0 = rnd(*shape, seed=3)
    grads = [rnd(*shape, seed=30 + i) for i in range(4)]
    p = nn.Parameter(W0.clone())
    opt = Mano([p], lr=0.03, version=version)  # defaults: momentum 0.95, wd 0.1, eps 1e-8
    got = run_steps(opt, p, grads)
    want = ref_mano(W0, grads, 0.03, 0.95, 1e-8, 0.1, version=version, nesterov=version == 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_mano_update_rms_and_tangency():
    """Each column (first step) of the Mano direction is unit-norm and orthogonal to W's column."""
    W0, G = rnd(16, 8, seed=4), rnd(16, 8, seed=5)
    p = nn.Parameter(W0.clone())
    opt = Mano([p], lr=1.0, weight_decay=0.0, momentum=0.0)
    run_steps(opt, p, [G])
    u = (W0 - p.detach()) / (0.2 * math.sqrt(16))
    torch.testing.assert_close(u.norm(dim=0), torch.ones(8, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close((u * W0).sum(0), torch.zeros(8, dtype=F64), rtol=0, atol=1e-12)


def ref_newton_muon(W, xs, ys, lr, k, beta_k, gamma, nblocks=1, beta=0.95, init=1e-3, eps=1e-8):
    m, n = W.shape
    b = n // nblocks
    Ks = [init * torch.eye(b, dtype=F64) for _ in range(nblocks)]
    K_inv = torch.eye(n, dtype=F64)  # identity until the first refresh
    M, out = torch.zeros_like(W), []
    for t, (x, y) in enumerate(zip(xs, ys)):
        Wr = W.clone().requires_grad_(True)
        loss = ((x @ Wr.T - y) ** 2).mean()
        (G,) = torch.autograd.grad(loss, Wr)
        if (t + 1) % k == 0:
            N = x.shape[0]
            invs = []
            for j in range(nblocks):
                Z = x[:, j * b : (j + 1) * b].T  # inputs as columns
                Ks[j] = beta_k * Ks[j] + (1 - beta_k) * Z @ Z.T / N
                lam = gamma * torch.trace(Ks[j]) / b + eps
                invs.append(torch.linalg.inv(Ks[j] + lam * torch.eye(b, dtype=F64)))
            K_inv = torch.block_diag(*invs)
        Gp = G @ K_inv
        M = beta * M + (1 - beta) * Gp
        U = (1 - beta) * Gp + beta * M  # Nesterov, as Muon
        W = W - lr * max(1.0, m / n) ** 0.5 * polar(U)
        out.append(W)
    return out


def ill_conditioned_inputs(N, n, seed):
    scales = torch.logspace(0, 1.5, n, dtype=F64)
    return rnd(N, n, seed=seed) * scales


@pytest.mark.parametrize("nblocks", [1, 2])
def test_newton_muon_matches_paper(nblocks):
    m, n, N, k = 6, 8, 32, 2
    W0 = rnd(m, n, seed=6)
    xs = [ill_conditioned_inputs(N, n, 60 + i) for i in range(5)]
    ys = [rnd(N, m, seed=70 + i) for i in range(5)]
    model = nn.Sequential(nn.Linear(n, m, bias=False, dtype=F64))
    with torch.no_grad():
        model[0].weight.copy_(W0)
    opt = NewtonMuon.from_model(
        model, lr=0.03, refresh_interval=k, backend="svd", blocks={"0": nblocks} if nblocks > 1 else None
    )
    got = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        got.append(model[0].weight.detach().clone())
    want = ref_newton_muon(W0, xs, ys, 0.03, k, 0.95, 0.2, nblocks=nblocks)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Shared behaviour: training, checkpoints, bad input
# ------------------------------------------------------------------------------------------------


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def make_opt(name, model, **kw):
    if name == "NewtonMuon":
        return NewtonMuon.from_model(model, **kw)
    groups = [
        dict(params=[model[0].weight, model[2].weight], use_muon=True),
        dict(params=[model[0].bias, model[2].bias], use_muon=False, lr=1e-2),
    ]
    return {"NorMuon": NorMuon, "AdaMuon": AdaMuon, "Mano": Mano}[name](groups, **kw)


NAMES = ["NorMuon", "AdaMuon", "Mano", "NewtonMuon"]
TRAIN_KW = {"NorMuon": {}, "AdaMuon": {}, "Mano": dict(lr=0.02), "NewtonMuon": dict(refresh_interval=5)}


@pytest.mark.parametrize("name", NAMES)
def test_decreases_loss_of_small_mlp(name):
    teacher = mlp(seed=100)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1)) * torch.logspace(0, 1, 8)
    with torch.no_grad():
        y = teacher(x)
    model = mlp(seed=0)
    opt = make_opt(name, model, **TRAIN_KW[name])
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses[::10]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_bit_identical(name):
    kw = dict(refresh_interval=2) if name == "NewtonMuon" else {}
    xs = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    y = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))

    def train_step(model, opt, x):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    a = mlp(seed=3)
    opt_a = make_opt(name, a, **kw)
    for x in xs[:3]:  # NewtonMuon refreshes on update 1 (and next on update 3)
        train_step(a, opt_a, x)
    saved = copy.deepcopy(opt_a.state_dict())
    if name == "NewtonMuon":
        assert "precond_K" in saved["state"][0] and "precond_inv" in saved["state"][0]
        assert not torch.equal(saved["state"][0]["precond_inv"], torch.eye(8))

    b = mlp(seed=42)
    b.load_state_dict(a.state_dict())
    opt_b = make_opt(name, b, **kw)
    opt_b.load_state_dict(saved)
    for x in xs[3:]:
        train_step(a, opt_a, x)
        train_step(b, opt_b, x)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)


def matrix_opt(name, params, **kw):
    return {"NorMuon": NorMuon, "AdaMuon": AdaMuon, "Mano": Mano, "NewtonMuon": NewtonMuon}[name](params, **kw)


@pytest.mark.filterwarnings("ignore:NewtonMuon")
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    with pytest.raises(ValueError, match="use_muon=False"):
        matrix_opt(name, [nn.Parameter(torch.zeros(4))])
    w = nn.Parameter(torch.randn(4, 3))
    opt = matrix_opt(name, [w])
    w.grad = torch.full((4, 3), float("nan"))
    with pytest.raises(NonFiniteError):
        opt.step()
    assert not opt.state[w]
    skip = matrix_opt(name, [w], nonfinite="skip")
    before = w.detach().clone()
    skip.step()
    assert torch.equal(w, before) and skip.param_groups[0]["skipped_steps"] == 1 and not skip.state[w]
    w.grad = torch.eye(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


# ------------------------------------------------------------------------------------------------
# Newton-Muon: refresh schedule, hooks
# ------------------------------------------------------------------------------------------------


def test_newton_muon_refresh_schedule():
    k = 3
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    opt = NewtonMuon.from_model(model, refresh_interval=k, backend="svd")
    w = model[0].weight
    refreshed = []
    prev_K = None
    for t in range(8):
        x = torch.randn(10, 6)
        out = model(x)
        model(x)  # a second call in the same step (e.g. a looped block): averaged, same Gram
        assert bool(opt._grams) == ((t + 1) % k == 0)  # inputs captured on refresh steps only
        opt.zero_grad()
        out.pow(2).mean().backward()
        opt.step()
        assert not opt._grams
        K = opt.state[w]["precond_K"].clone()
        if t == 0:
            torch.testing.assert_close(K, 1e-3 * torch.eye(6))
            assert torch.equal(opt.state[w]["precond_inv"], torch.eye(6))
        if prev_K is not None and not torch.equal(K, prev_K):
            refreshed.append(t)
        prev_K = K
        if t == 2:  # the first refresh used the mean Gram of the two calls, i.e. x^T x / N
            torch.testing.assert_close(K, 0.95e-3 * torch.eye(6) + 0.05 * x.T @ x / 10)
    assert refreshed == [2, 5]
    assert opt.state[w]["step"] == 8


def test_newton_muon_captures_only_training_forwards():
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    opt = NewtonMuon.from_model(model, refresh_interval=1)
    with torch.no_grad():
        model(torch.randn(3, 6))
    model.eval()
    model(torch.randn(3, 6))
    assert not opt._grams
    model.train()
    model(torch.randn(3, 6))
    assert opt._grams


def test_newton_muon_does_not_keep_activations():
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    opt = NewtonMuon.from_model(model, refresh_interval=1)
    x = torch.randn(4, 6)
    ref = weakref.ref(x)
    loss = model(x).pow(2).sum()
    loss.backward()
    del x, loss
    gc.collect()
    assert ref() is None  # the hook kept only the 6 x 6 Gram
    opt.step()
    assert not opt._grams


def test_newton_muon_skipped_step_drops_captured_inputs():
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    opt = NewtonMuon.from_model(model, refresh_interval=1, nonfinite="skip")
    model(torch.randn(4, 6)).sum().backward()
    assert opt._grams
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert not opt._grams and not opt.state[model[0].weight]


def test_newton_muon_hooks_are_removable():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = NewtonMuon.from_model(model, refresh_interval=1)
    assert len(model[0]._forward_pre_hooks) == 1 and len(model[2]._forward_pre_hooks) == 1
    opt.remove_hooks()
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    model(torch.randn(2, 6)).sum().backward()
    assert not opt._grams
    with pytest.warns(UserWarning, match="plain Muon"):
        opt.step()
    handle = opt.register(model)
    assert len(handle) == 2 and len(model[0]._forward_pre_hooks) == 1
    handle.remove()
    assert not model[0]._forward_pre_hooks and not opt._sources


def test_newton_muon_warns_for_unhooked_weights():
    w = nn.Parameter(torch.randn(4, 3))
    opt = NewtonMuon([w])
    w.grad = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="plain Muon"):
        opt.step()
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    with pytest.warns(UserWarning, match=r"\(3, 2, 3, 3\)"):
        NewtonMuon.from_model(conv, [dict(params=[conv[0].weight, conv[2].weight])])


def test_newton_muon_block_validation_and_cholesky_fallback():
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match="divide"):
        NewtonMuon.from_model(model, blocks={"0": 4})
    assert not model[0]._forward_pre_hooks  # nothing attached by the failed call
    K = -torch.eye(3, dtype=F64)  # not positive definite: Cholesky fails
    _, inv, ok = newton_refresh(K, None, 0.95, 0.0, 0.0)
    assert not bool(ok) and torch.equal(inv, torch.eye(3, dtype=F64))


def test_newton_muon_low_precision_params_keep_float32_preconditioner():
    model = nn.Sequential(nn.Linear(6, 5, bias=False, dtype=torch.bfloat16))
    opt = NewtonMuon.from_model(model, refresh_interval=1)
    model(torch.randn(4, 6, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = nn.Sequential(nn.Linear(6, 5, bias=False, dtype=torch.bfloat16))
    opt2 = NewtonMuon.from_model(other, refresh_interval=1)
    opt2.load_state_dict(saved)
    st = opt2.state[other[0].weight]
    assert st["precond_K"].dtype == torch.float32
    assert torch.equal(st["precond_inv"], saved["state"][0]["precond_inv"])
