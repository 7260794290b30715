"""Muon and MuonWithAuxAdam against independent float64 transcriptions, torch.optim.Muon and
torch.optim.AdamW, plus the torch.optim conventions (state dicts, closures, schedulers, groups) and
the safety checks (non-finite, sparse and complex gradients, bad hyperparameters).

The transcriptions below use plain torch ops and an exact SVD polar factor; they do not call the
library's functional pieces (``muon_momentum``, ``shape_scale``, ``msign``).
"""

import copy
import io
import math

import pytest
import torch
from torch import nn

from compositional_muon import Muon, MuonWithAuxAdam
from compositional_muon.cm import NonFiniteError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rnd(*shape, seed=0, dtype=F64):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(dtype)


def polar(x):
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    return U @ Vh


def factor(rows, cols, rule):
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    assert rule == "match_rms_adamw"
    return 0.2 * math.sqrt(max(rows, cols))


def ref_muon(W, grads, *, lr, beta, wd, nesterov, rule="original"):
    """Float64 Muon: the parameter after each step. ``W`` may be a conv weight (flattened 2-D)."""
    W = W.clone().to(F64)
    rows, cols = W.shape[0], W[0].numel()
    M = torch.zeros_like(W)
    out = []
    for G in grads:
        G = G.to(F64)
        M = M + (1 - beta) * (G - M)  # M.lerp(G, 1 - beta) = beta*M + (1-beta)*G
        U = G + beta * (M - G) if nesterov else M  # G.lerp(M, beta)
        Z = polar(U.reshape(rows, cols)).reshape(W.shape)
        W = (1 - lr * wd) * W - lr * factor(rows, cols, rule) * Z
        out.append(W)
    return out


def run_steps(opt, p, grads):
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def snapshot(opt):
    """Deep copy of params and state, for "nothing was written" checks."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()})
    return params, state


def same_snapshot(a, b):
    pa, sa = a
    pb, sb = b
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][key]), torch.as_tensor(sb[k][key])), key
    return True


SHAPES = [(24, 10), (10, 24), (16, 16)]  # tall, wide, square


# ------------------------------------------------------------------------------------------------
# 1. The update rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_float64_transcription(shape, nesterov):
    W0 = rnd(*shape, seed=1)
    grads = [rnd(*shape, seed=10 + t) for t in range(3)]
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.1, backend="svd")
    got = run_steps(opt, p, grads)
    want = ref_muon(W0, grads, lr=0.03, beta=0.9, wd=0.1, nesterov=nesterov)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    # the momentum buffer is the plain EMA of the gradients
    M = torch.zeros_like(W0)
    for G in grads:
        M = 0.9 * M + 0.1 * G
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], M, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_optim_muon(shape, rule, nesterov):
    W0 = rnd(*shape, seed=2, dtype=torch.float32)
    grads = [rnd(*shape, seed=20 + t, dtype=torch.float32) for t in range(3)]
    kw = dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=nesterov, adjust_lr_fn=rule)
    p, q = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    ours = run_steps(Muon([p], msign_dtype=torch.bfloat16, **kw), p, grads)  # Newton-Schulz, 5 steps, as torch
    theirs = run_steps(torch.optim.Muon([q], **kw), q, grads)
    # Both run the quintic in bfloat16, but torch fuses each polynomial step into addmm (one
    # rounding) while we keep Keller Jordan's separate products: ~1-4% apart, each within ~4% of a
    # float64 Newton-Schulz. The Newton-Schulz band itself is ~30% wide, so 6% still pins the rule.
    for t, (a, b) in enumerate(zip(ours, theirs)):
        rel = (a - b).norm() / (b - W0).norm()
        assert rel < 0.06, (t, rel.item())
        assert (a - W0).norm() > 0  # it moved


# ------------------------------------------------------------------------------------------------
# 2. adjust_lr_fn
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(40, 5), (5, 40)])
def test_adjust_lr_original(shape):
    W0, G = rnd(*shape, seed=3), rnd(*shape, seed=4)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([p], lr=0.1, adjust_lr_fn="original", backend="svd").step()
    d = (p.detach() - W0) / 0.1
    rows, cols = shape
    s = math.sqrt(max(1.0, rows / cols))
    # every singular value of the applied step is the shape factor (msign of a full-rank matrix)
    torch.testing.assert_close(torch.linalg.svdvals(d), torch.full((min(shape),), s, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.pow(2).mean().sqrt().item(), s / math.sqrt(max(shape)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES + [(40, 5), (5, 40)])
def test_adjust_lr_match_rms_adamw(shape):
    W0, G = rnd(*shape, seed=3), rnd(*shape, seed=4)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([p], lr=0.1, adjust_lr_fn="match_rms_adamw", backend="svd").step()
    d = (p.detach() - W0) / 0.1
    # Moonlight's rule gives the update RMS 0.2 whatever the shape
    torch.testing.assert_close(d.pow(2).mean().sqrt().item(), 0.2, rtol=0, atol=1e-12)
    s = 0.2 * math.sqrt(max(shape))
    torch.testing.assert_close(torch.linalg.svdvals(d), torch.full((min(shape),), s, dtype=F64), rtol=0, atol=1e-12)


def test_adjust_lr_none_is_original():
    W0, G = rnd(24, 10, seed=3), rnd(24, 10, seed=4)
    outs = []
    for rule in (None, "original"):
        p = nn.Parameter(W0.clone())
        p.grad = G.clone()
        Muon([p], lr=0.1, adjust_lr_fn=rule, backend="svd").step()
        outs.append(p.detach())
    assert torch.equal(*outs)


# ------------------------------------------------------------------------------------------------
# 3. Conv weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 16, 1, 1), (32, 8, 3, 3), (8, 4, 3, 3)])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_conv_weights_flattened(shape, rule):
    W0 = rnd(*shape, seed=5)
    grads = [rnd(*shape, seed=50 + t) for t in range(2)]
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.05, momentum=0.9, weight_decay=0.01, adjust_lr_fn=rule, backend="svd")
    got = run_steps(opt, p, grads)
    assert p.shape == shape and opt.state[p]["momentum_buffer"].shape == shape
    # explicit 2-D computation
    rows, cols = shape[0], shape[1] * shape[2] * shape[3]
    W, M = W0.reshape(rows, cols), torch.zeros(rows, cols, dtype=F64)
    for G, out in zip(grads, got):
        M = 0.9 * M + 0.1 * G.reshape(rows, cols)
        U = 0.1 * G.reshape(rows, cols) + 0.9 * M
        W = (1 - 0.05 * 0.01) * W - 0.05 * factor(rows, cols, rule) * polar(U)
        torch.testing.assert_close(out, W.reshape(shape), rtol=0, atol=1e-12)
    # the step's size uses the 2-D shape: for the 1x1 conv, (64, 16) -> 2 or 1.6, not the 1x1 kernel's
    if shape == (64, 16, 1, 1):
        p2 = nn.Parameter(W0.clone())
        p2.grad = grads[0].clone()
        Muon([p2], lr=0.05, adjust_lr_fn=rule, backend="svd").step()
        d = (p2.detach() - W0).reshape(rows, cols) / 0.05
        want = 2.0 if rule == "original" else 1.6
        torch.testing.assert_close(torch.linalg.svdvals(d), torch.full((16,), want, dtype=F64), rtol=0, atol=1e-12)


def test_conv_module_channels_last():
    conv = nn.Conv2d(8, 16, 3).double().to(memory_format=torch.channels_last)
    W0 = conv.weight.detach().clone()
    G = rnd(16, 8, 3, 3, seed=6)
    conv.weight.grad = G.clone().to(memory_format=torch.channels_last)
    Muon([conv.weight], lr=0.05, backend="svd").step()
    want = W0.reshape(16, 72) - 0.05 * polar(0.05 * G.reshape(16, 72) + 0.95 * 0.05 * G.reshape(16, 72))
    torch.testing.assert_close(conv.weight.detach(), want.reshape(W0.shape), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. dtypes: float32 params with bfloat16 internals, bfloat16 params
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msign_dtype", [None, torch.bfloat16])  # None: the default working precision
@pytest.mark.parametrize("backend", ["newton_schulz", "polar_express", "svd"])
@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (8, 4, 3, 3)])
def test_float32_params_bfloat16_internals(backend, shape, msign_dtype):
    W0 = rnd(*shape, seed=7, dtype=torch.float32)
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.02, weight_decay=0.1, backend=backend, msign_dtype=msign_dtype)
    for t in range(2):
        p.grad = rnd(*shape, seed=70 + t, dtype=torch.float32)
        opt.step()
    assert p.dtype == torch.float32 and opt.state[p]["momentum_buffer"].dtype == torch.float32
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), W0)


@pytest.mark.parametrize("msign_dtype", [torch.float32, torch.float64])
def test_msign_dtype_float_tracks_exact(msign_dtype):
    """Newton-Schulz in float32/float64 lands in its known band around the exact polar factor."""
    W0, G = rnd(24, 10, seed=8), rnd(24, 10, seed=9)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([p], lr=1.0, backend="newton_schulz", msign_dtype=msign_dtype).step()
    d = (W0 - p.detach()) / math.sqrt(2.4)
    sv = torch.linalg.svdvals(d)
    assert sv.min() > 0.6 and sv.max() < 1.2
    # same singular vectors as the exact polar factor: <d, polar(G)> / ||d|| ||polar|| close to 1
    cos = (d * polar(G)).sum() / (d.norm() * polar(G).norm())
    assert cos > 0.98


@pytest.mark.parametrize("msign_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nesterov", [False, True])
def test_bfloat16_params_keep_the_momentum_buffer(nesterov, msign_dtype):
    beta = 0.9
    shape = (16, 8)
    W0 = rnd(*shape, seed=11, dtype=torch.bfloat16)
    g1 = (3 * rnd(*shape, seed=12)).to(torch.bfloat16)
    g2 = (3 * rnd(*shape, seed=13)).to(torch.bfloat16)
    p = nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.02, momentum=beta, nesterov=nesterov, msign_dtype=msign_dtype)
    p.grad = g1.clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16
    # (1 - beta) * g in bfloat16 arithmetic: computed in float, rounded once
    want = ((1 - beta) * g1.float()).to(torch.bfloat16)
    assert torch.equal(buf, want)
    assert abs(buf.float().norm().item() - 1.0) > 0.5  # not normalized in place by the msign
    assert buf.float().norm().item() == pytest.approx(0.1 * g1.float().norm().item(), rel=1e-2)
    assert not torch.equal(p.detach(), W0) and p.dtype == torch.bfloat16
    p.grad = g2.clone()
    opt.step()
    want2 = want.clone().lerp_(g2, 1 - beta)
    assert torch.equal(opt.state[p]["momentum_buffer"], want2)
    want2_f = beta * want.float() + (1 - beta) * g2.float()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].float(), want2_f, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# 5. MuonWithAuxAdam
# ------------------------------------------------------------------------------------------------

# Keller Jordan's README snippet (github.com/KellerJordan/Muon), verbatim except for the import
# line swapped below and one stray ")" that makes the original a SyntaxError
# ("[*model.head.parameters(), *model.embed.parameters()])").
README_SNIPPET = """
from muon import MuonWithAuxAdam
# Find ≥2D parameters in the body of the network -- these should be optimized by Muon
hidden_weights = [p for p in model.body.parameters() if p.ndim >= 2]
# Find everything else -- these should be optimized by AdamW
hidden_gains_biases = [p for p in model.body.parameters() if p.ndim < 2]
exterior_weights = [*model.head.parameters(), *model.embed.parameters()]
# Create the optimizer
# Note: you can also use multiple groups of each type with different hparams if you want.
muon_group = dict(params=hidden_weights, lr=0.02, weight_decay=0.01, use_muon=True)
adam_group = dict(params=hidden_gains_biases+exterior_weights, lr=3e-4,
                  betas=(0.9, 0.95), weight_decay=0.01, use_muon=False)
optimizer = MuonWithAuxAdam([muon_group, adam_group])
"""


class TinyLM(nn.Module):
    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.LayerNorm(2 * d), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.body(self.embed(idx)))


def lm_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (4, 8), generator=g)
    tgt = torch.randint(0, 32, (4, 8), generator=g)
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())


def test_readme_snippet_runs_with_only_the_import_changed():
    torch.manual_seed(0)
    model = TinyLM()
    ns = {"model": model}
    exec(README_SNIPPET.replace("from muon import", "from compositional_muon import"), ns)
    optimizer = ns["optimizer"]
    assert isinstance(optimizer, MuonWithAuxAdam)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for t in range(5):
        optimizer.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), n
    assert losses[-1] < losses[0]
    muon_group, adam_group = optimizer.param_groups
    assert muon_group["use_muon"] and muon_group["momentum"] == 0.95 and muon_group["lr"] == 0.02
    assert not adam_group["use_muon"] and adam_group["eps"] == 1e-10 and adam_group["betas"] == (0.9, 0.95)
    # the hidden weights carry Muon state, the rest Adam state
    for p in muon_group["params"]:
        assert set(optimizer.state[p]) == {"momentum_buffer"}
    for p in adam_group["params"]:
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(optimizer.state[p])


def test_aux_adam_requires_use_muon():
    w = nn.Parameter(rnd(4, 4))
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAuxAdam([dict(params=[w], lr=0.02)])
    opt = MuonWithAuxAdam([dict(params=[w], use_muon=True)])
    with pytest.raises(ValueError, match="use_muon"):
        opt.add_param_group(dict(params=[nn.Parameter(rnd(3))]))


def test_aux_adam_rejects_vectors_in_muon_group():
    w, b = nn.Parameter(rnd(4, 4)), nn.Parameter(rnd(7))
    with pytest.raises(ValueError, match=r"\(7,\)"):
        MuonWithAuxAdam([dict(params=[w, b], use_muon=True)])
    with pytest.raises(ValueError, match=r"\(\)"):
        MuonWithAuxAdam([dict(params=[nn.Parameter(torch.tensor(1.0))], use_muon=True)])
    with pytest.raises(ValueError, match=r"\(7,\)"):
        Muon([w, b])  # plain Muon defaults to use_muon=True


@pytest.mark.parametrize(
    "adam_kw, torch_kw",
    [
        (dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1), dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
        (dict(), dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)),  # the aux-Adam defaults
    ],
)
def test_aux_adam_matches_torch_adamw(adam_kw, torch_kw):
    shapes = [(5, 3), (7,), (), (2, 3, 4)]
    init = [rnd(*s, seed=30 + i) for i, s in enumerate(shapes)]
    ours = [nn.Parameter(x.clone()) for x in init]
    theirs = [nn.Parameter(x.clone()) for x in init]
    w = nn.Parameter(rnd(6, 6, seed=39))
    opt = MuonWithAuxAdam([dict(params=[w], use_muon=True), dict(params=ours, use_muon=False, **adam_kw)])
    ref = torch.optim.AdamW(theirs, eps=1e-10, **torch_kw)
    for t in range(6):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = rnd(*shapes[i], seed=100 * t + i) * (10.0 ** (i - 1))
            a.grad, b.grad = g.clone(), g.clone()
        w.grad = rnd(6, 6, seed=999 + t)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"], rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-13, atol=0)
        assert float(opt.state[a]["step"]) == 6


def test_muon_use_muon_false_group_is_adamw():
    b0 = rnd(9, seed=40)
    a, b = nn.Parameter(b0.clone()), nn.Parameter(b0.clone())
    w = nn.Parameter(rnd(4, 4))
    opt = Muon([dict(params=[w]), dict(params=[a], use_muon=False, lr=1e-3, weight_decay=0.01)], lr=0.02)
    ref = torch.optim.AdamW([b], lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01)
    for t in range(4):
        g = rnd(9, seed=41 + t)
        a.grad, b.grad, w.grad = g.clone(), g.clone(), rnd(4, 4, seed=t)
        opt.step()
        ref.step()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# 6. torch.optim conventions
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in=6, d=16, d_out=3):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, d), nn.Linear(d, d), nn.Linear(d, d_out)
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x):
        img = x[:, :2, None, None].expand(-1, 2, 5, 5)
        extra = self.conv(img).mean((1, 2, 3), keepdim=True)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) + extra


def mlp_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    y = torch.randn(32, 3, generator=g)
    return (model(x) - y).pow(2).mean()


def make_opt(model, kind):
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    if kind == "aux":
        return MuonWithAuxAdam(
            [
                dict(params=mats, lr=0.02, weight_decay=0.01, use_muon=True),
                dict(params=vecs, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, use_muon=False),
            ]
        )
    return Muon(
        [dict(params=mats), dict(params=vecs, use_muon=False, lr=3e-3)],
        lr=0.02,
        weight_decay=0.01,
        adjust_lr_fn="match_rms_adamw",
    )


def train(model, opt, seeds):
    for s in seeds:
        opt.zero_grad()
        mlp_loss(model, s).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["muon", "aux"])
@pytest.mark.parametrize("via", ["memory", "torch.save"])
def test_state_dict_round_trip_is_bit_identical(kind, via):
    torch.manual_seed(0)
    model = MLP()
    opt = make_opt(model, kind)
    train(model, opt, range(3))
    model2 = copy.deepcopy(model)
    sd = opt.state_dict()
    if via == "memory":
        sd = copy.deepcopy(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf)
    opt2 = make_opt(model2, kind)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(opt.state) == len(list(model.parameters()))
    train(model, opt, range(3, 7))
    train(model2, opt2, range(3, 7))
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state[q][k])), k


def test_state_dict_keeps_hyperparameters_and_counters():
    model = MLP()
    opt = make_opt(model, "muon")
    opt.param_groups[0]["skipped_steps"] = 3
    opt.param_groups[0]["lr"] = 0.123
    sd = copy.deepcopy(opt.state_dict())
    opt2 = make_opt(MLP(), "muon")
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["skipped_steps"] == 3 and opt2.param_groups[0]["lr"] == 0.123
    assert opt2.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert opt2.param_groups[1]["use_muon"] is False


def test_zero_grad():
    model = MLP()
    opt = make_opt(model, "aux")
    mlp_loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no grads: nothing moves, no state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


@pytest.mark.parametrize("kind", ["muon", "aux"])
def test_closure(kind):
    torch.manual_seed(1)
    model = MLP()
    ref = copy.deepcopy(model)
    opt, ref_opt = make_opt(model, kind), make_opt(ref, kind)
    calls = []

    def closure():
        opt.zero_grad()
        loss = mlp_loss(model, len(calls))
        loss.backward()
        calls.append(loss.item())
        return loss

    for t in range(3):
        with torch.no_grad():
            want_loss = mlp_loss(model, t).item()
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.item() == want_loss
        assert len(calls) == t + 1  # evaluated once per step, with grad enabled
        train(ref, ref_opt, [t])
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt.step() is None


def _update_rms(p, before):
    return (p.detach() - before).pow(2).mean().sqrt().item()


def test_lambda_lr_scales_the_update():
    shape = (12, 6)
    p, b = nn.Parameter(rnd(*shape, seed=1)), nn.Parameter(rnd(6, seed=2))
    opt = Muon([dict(params=[p]), dict(params=[b], use_muon=False, lr=1e-2)], lr=0.1, backend="svd")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    s = math.sqrt(2.0)  # original rule, 12 x 6
    for t in range(4):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**t)
        before = p.detach().clone()
        p.grad, b.grad = rnd(*shape, seed=10 + t), rnd(6, seed=20 + t)
        opt.step()
        sched.step()
        assert _update_rms(p, before) == pytest.approx(0.1 * 0.5**t * s / math.sqrt(12), rel=1e-10)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5**4)


@pytest.mark.parametrize("kind", ["muon", "aux"])
def test_one_cycle_lr_scales_the_update(kind):
    shape = (12, 6)
    p, b = nn.Parameter(rnd(*shape, seed=1)), nn.Parameter(rnd(6, seed=2))
    groups = [dict(params=[p], use_muon=True), dict(params=[b], use_muon=False, lr=1e-2)]
    opt = (
        Muon(groups, lr=0.1, backend="svd")
        if kind == "muon"
        else MuonWithAuxAdam([dict(g, **({"backend": "svd"} if g["use_muon"] else {})) for g in groups])
    )
    total = 10
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.1, 1e-2], total_steps=total, pct_start=0.3, anneal_strategy="cos"
    )
    s = math.sqrt(2.0)
    lrs, momenta = [], []
    for t in range(total):
        lr = opt.param_groups[0]["lr"]
        # the one-cycle schedule, written out: cosine warm-up 0.1/25 -> 0.1 over 2 steps, then down to 0.1/25/1e4
        lo, hi, end = 0.1 / 25, 0.1, 0.1 / 25 / 1e4
        up = 0.3 * total - 1
        if t <= up:
            want = hi + (lo - hi) / 2 * (1 + math.cos(math.pi * t / up))
        else:
            want = end + (hi - end) / 2 * (1 + math.cos(math.pi * (t - up) / (total - 1 - up)))
        assert lr == pytest.approx(want, rel=1e-9)
        lrs.append(lr)
        momenta.append(opt.param_groups[0]["momentum"])
        before = p.detach().clone()
        p.grad, b.grad = rnd(*shape, seed=10 + t), rnd(6, seed=20 + t)
        opt.step()
        sched.step()
        assert _update_rms(p, before) == pytest.approx(lr * s / math.sqrt(12), rel=1e-10)
    assert max(lrs) / min(lrs) > 1000
    assert len(set(momenta)) > 1  # cycle_momentum drives Muon's momentum


def test_params_without_grads_are_skipped():
    w, w_nograd = nn.Parameter(rnd(6, 4, seed=1)), nn.Parameter(rnd(6, 4, seed=2))
    b, b_nograd = nn.Parameter(rnd(4, seed=3)), nn.Parameter(rnd(4, seed=4))
    frozen = nn.Parameter(rnd(5, 5, seed=5), requires_grad=False)
    before = [x.detach().clone() for x in (w, w_nograd, b, b_nograd, frozen)]
    opt = MuonWithAuxAdam(
        [
            dict(params=[w, w_nograd, frozen], use_muon=True, weight_decay=0.1),
            dict(params=[b, b_nograd], use_muon=False, weight_decay=0.1),
        ]
    )
    for t in range(2):
        w.grad, b.grad = rnd(6, 4, seed=10 + t), rnd(4, seed=20 + t)
        opt.step()
    assert not torch.equal(w.detach(), before[0]) and not torch.equal(b.detach(), before[2])
    for x, x0 in ((w_nograd, before[1]), (b_nograd, before[3]), (frozen, before[4])):
        assert torch.equal(x.detach(), x0)
        assert len(opt.state[x]) == 0


def test_add_param_group_both_kinds():
    w = nn.Parameter(rnd(8, 4, seed=1))
    opt = Muon([w], lr=0.05, momentum=0.9, backend="svd")
    w2, b = nn.Parameter(rnd(4, 8, seed=2)), nn.Parameter(rnd(8, seed=3))
    opt.add_param_group(dict(params=w2, lr=0.01))  # a bare tensor, use_muon defaults to True
    opt.add_param_group(dict(params=[b], use_muon=False, lr=1e-3))
    g2, gb = opt.param_groups[1], opt.param_groups[2]
    assert g2["use_muon"] and g2["momentum"] == 0.9 and g2["backend"] == "svd" and g2["lr"] == 0.01
    assert not gb["use_muon"] and gb["betas"] == (0.9, 0.95) and gb["eps"] == 1e-10
    with pytest.raises(ValueError, match=r"\(8,\)"):
        opt.add_param_group(dict(params=[nn.Parameter(rnd(8))]))
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[w], use_muon=False))  # already in a group
    W20, B0 = w2.detach().clone(), b.detach().clone()
    G2, GB = rnd(4, 8, seed=4), rnd(8, seed=5)
    w.grad, w2.grad, b.grad = rnd(8, 4, seed=6), G2.clone(), GB.clone()
    opt.step()
    torch.testing.assert_close(w2.detach(), W20 - 0.01 * polar(0.1 * G2 + 0.9 * 0.1 * G2), rtol=0, atol=1e-12)
    # first Adam step: m_hat = g, v_hat = g^2 -> -lr * sign(g) (up to eps)
    torch.testing.assert_close(b.detach(), B0 - 1e-3 * GB / (GB.abs() + 1e-10), rtol=0, atol=1e-12)
    aux = MuonWithAuxAdam([dict(params=[nn.Parameter(rnd(3, 3))], use_muon=True)])
    v = nn.Parameter(rnd(3))
    aux.add_param_group(dict(params=[v], use_muon=False, lr=0.1))
    v0 = v.detach().clone()
    v.grad = torch.ones(3, dtype=F64)
    aux.step()
    torch.testing.assert_close(v.detach(), v0 - 0.1, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# 7. Safety
# ------------------------------------------------------------------------------------------------


def _safety_setup(nonfinite):
    torch.manual_seed(3)
    model = MLP()
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    opt = Muon([dict(params=mats), dict(params=vecs, use_muon=False)], nonfinite=nonfinite)
    train(model, opt, [0])  # populate states
    return model, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_and_writes_nothing(bad):
    model, opt = _safety_setup("raise")
    names = [n for n, _ in model.named_parameters()]
    for target in names:
        opt.zero_grad()
        mlp_loss(model, 1).backward()
        p = dict(model.named_parameters())[target]
        p.grad.view(-1)[0] = bad
        before = snapshot(opt)
        with pytest.raises(NonFiniteError):
            opt.step()
        assert same_snapshot(before, snapshot(opt)), target
        assert all(g["skipped_steps"] == 0 for g in opt.param_groups)


def test_nonfinite_skip_counts_and_writes_nothing():
    model, opt = _safety_setup("skip")
    for k, target in enumerate(["fc2.weight", "fc1.bias", "conv.weight"]):
        opt.zero_grad()
        mlp_loss(model, 1).backward()
        dict(model.named_parameters())[target].grad.view(-1)[-1] = float("nan")
        before = snapshot(opt)
        assert opt.step() is None
        assert same_snapshot(before, snapshot(opt)), target
        assert [g["skipped_steps"] for g in opt.param_groups] == [k + 1, k + 1]
    # a finite step afterwards goes through
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, [2])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [g["skipped_steps"] for g in opt.param_groups] == [3, 3]


@pytest.mark.parametrize("use_muon", [True, False])
def test_sparse_gradient_raises_type_error(use_muon):
    emb = nn.Embedding(10, 4, sparse=True)
    w = nn.Parameter(torch.randn(4, 4))
    opt = MuonWithAuxAdam([dict(params=[w], use_muon=True), dict(params=[emb.weight], use_muon=use_muon)])
    w.grad = torch.randn(4, 4)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = snapshot(opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert same_snapshot(before, snapshot(opt))


@pytest.mark.parametrize("use_muon", [True, False])
def test_complex_param_raises_type_error(use_muon):
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    z.grad = torch.randn(4, 4, dtype=torch.complex64)
    opt = Muon([dict(params=[z], use_muon=use_muon)])
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert len(opt.state[z]) == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=-0.01),
        dict(momentum=1.0),
        dict(momentum=1.5),
        dict(momentum=-0.1),
        dict(backend="qr"),
        dict(adjust_lr_fn="spectral"),
        dict(ns_steps=0),
        dict(weight_decay=-0.1),
        dict(nonfinite="ignore"),
        # NaN slipped through `x < 0` checks; a fractional ns_steps was silently truncated
        dict(lr=float("nan")),
        dict(weight_decay=float("nan")),
        dict(momentum=float("nan")),
        dict(ns_steps=2.5),
        dict(ns_steps=float("inf")),
        dict(ns_steps=float("nan")),
        dict(ns_steps="5"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kw):
    with pytest.raises(ValueError):
        Muon([nn.Parameter(rnd(4, 4))], **kw)
    if "nonfinite" not in kw:
        with pytest.raises(ValueError):
            MuonWithAuxAdam([dict(params=[nn.Parameter(rnd(4, 4))], use_muon=True, **kw)])


def test_integral_ns_steps_accepted():
    import numpy as np

    for k in (3, 3.0, np.int64(3)):
        assert Muon([nn.Parameter(rnd(4, 4))], ns_steps=k).param_groups[0]["ns_steps"] == 3


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=-1.0),
        dict(betas=(1.0, 0.9)),
        dict(betas=(0.9, 1.2)),
        dict(weight_decay=-1),
        dict(eps=-1e-8),
        dict(lr=float("nan")),
        dict(eps=float("nan")),
    ],
)
def test_bad_adam_hyperparameters_raise(kw):
    with pytest.raises(ValueError):
        MuonWithAuxAdam([dict(params=[nn.Parameter(rnd(4))], use_muon=False, **kw)])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 4, 3, 3), (4, 0, 3, 3)])
@pytest.mark.parametrize("backend", ["newton_schulz", "svd"])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_empty_weights_step(shape, backend, rule):
    """A zero-width layer used to crash the step (ZeroDivisionError in the shape factor)."""
    w, e = nn.Parameter(rnd(6, 4)), nn.Parameter(rnd(*shape))
    w0 = w.detach().clone()
    opt = Muon([w, e], backend=backend, adjust_lr_fn=rule, weight_decay=0.1)
    w.grad, e.grad = rnd(6, 4, seed=1), rnd(*shape, seed=2)
    opt.step()
    assert e.shape == shape and not torch.equal(w.detach(), w0)


# ------------------------------------------------------------------------------------------------
# 8. Same-shape batching
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, msign_dtype, dtype, tol",
    [
        ("svd", None, F64, 1e-12),
        ("newton_schulz", torch.float32, torch.float32, 1e-5),
        ("polar_express", torch.float64, F64, 1e-12),
        ("newton_schulz", torch.bfloat16, torch.float32, 2e-2),  # batched bf16 kernels round differently
        ("polar_express", None, torch.float32, 2e-2),  # the default working precision
    ],
)
def test_batched_same_shape_equals_separate(backend, msign_dtype, dtype, tol):
    shapes = [(12, 8), (12, 8), (8, 12), (12, 8), (8, 12), (4, 2, 3, 3), (4, 2, 3, 3), (4, 18)]
    init = [rnd(*s, seed=60 + i, dtype=dtype) for i, s in enumerate(shapes)]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, backend=backend, msign_dtype=msign_dtype)
    together = [nn.Parameter(x.clone()) for x in init]
    alone = [nn.Parameter(x.clone()) for x in init]
    opt = Muon(together, **kw)
    opts = [Muon([p], **kw) for p in alone]
    for t in range(3):
        for i, s in enumerate(shapes):
            g = rnd(*s, seed=600 + 10 * t + i, dtype=dtype)
            together[i].grad, alone[i].grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
        for a, b, x0 in zip(together, alone, init):
            rel = (a - b).norm() / (b - x0).norm()
            assert rel < tol, rel.item()


# ------------------------------------------------------------------------------------------------
# 9. Training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["muon", "aux"])
def test_mlp_regression_loss_decreases(kind):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        y = teacher(x)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    if kind == "muon":
        opt = Muon([dict(params=mats), dict(params=vecs, use_muon=False, lr=3e-3)], lr=0.02)
    else:
        opt = MuonWithAuxAdam([dict(params=mats, lr=0.02, use_muon=True), dict(params=vecs, lr=3e-3, use_muon=False)])
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert sum(losses[-10:]) < sum(losses[:10])


def test_positional_order_matches_keller_and_torch():
    # Muon(params, lr, weight_decay, momentum, ...) as in Keller Jordan's muon.py and torch.optim.Muon
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([p], 0.05, 0.01, 0.9)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"]) == (0.05, 0.01, 0.9)
