"""PerHeadMuon: a float64 transcription, the exact correspondence with CM, routing and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, Muon, PerHeadMuon
from compositional_muon.attention import HeadSlice

F64 = torch.float64


def polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


class Attn(nn.Module):
    def __init__(self, D, H, Hkv, d):
        super().__init__()
        self.head_dim, self.num_heads, self.num_key_value_heads = d, H, Hkv
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)


class Conv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)


class FusedAttn(nn.Module):
    def __init__(self, D, H, conv):
        super().__init__()
        self.n_head = H
        self.c_attn = Conv1D(3 * D, D) if conv else nn.Linear(D, 3 * D, bias=False)
        self.c_proj = Conv1D(D, D) if conv else nn.Linear(D, D, bias=False)


class Net(nn.Module):
    def __init__(self, attn, D=12):
        super().__init__()
        self.embed = nn.Embedding(10, D)
        self.attn = attn
        self.fc = nn.Linear(D, 2 * D, bias=False)


def _model(kind, H=4, Hkv=2, d=3, D=12):
    torch.manual_seed(0)
    attn = Attn(D, H, Hkv, d) if kind == "separate" else FusedAttn(D, H, kind == "conv1d")
    return Net(attn, D).to(F64)


def _blocks(model, kind, H, Hkv, d):
    """(weight, list of index tuples) of every head block in the d x D orientation, by hand."""
    a = model.attn
    if kind == "separate":
        out = []
        for w, n in ((a.q_proj.weight, H), (a.k_proj.weight, Hkv), (a.v_proj.weight, Hkv)):
            out += [(w, lambda t, h=h: t[h * d : (h + 1) * d]) for h in range(n)]
        out += [(a.o_proj.weight, lambda t, h=h: t[:, h * d : (h + 1) * d].T) for h in range(H)]
        return out
    t = (lambda w: w.T) if kind == "conv1d" else (lambda w: w)
    out = [(a.c_attn.weight, lambda x, h=h, t=t: t(x)[h * d : (h + 1) * d]) for h in range(3 * H)]
    out += [(a.c_proj.weight, lambda x, h=h, t=t: t(x)[:, h * d : (h + 1) * d].T) for h in range(H)]
    return out


@pytest.mark.parametrize("kind", ["separate", "fused", "conv1d"])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_float64_transcription(kind, adjust, nesterov):
    H, Hkv, d, D = (4, 2, 3, 12) if kind == "separate" else (4, 4, 3, 12)
    model = _model(kind, H, Hkv, d, D)
    lr, beta, wd = 0.05, 0.9, 0.1
    opt = PerHeadMuon.from_model(
        model, lr=lr, momentum=beta, nesterov=nesterov, weight_decay=wd, backend="svd", adjust_lr_fn=adjust
    )
    blocks = _blocks(model, kind, H, Hkv, d)
    weights = {id(w): w for w, _ in blocks}
    ref = {k: w.detach().clone() for k, w in weights.items()}
    buf = {k: torch.zeros_like(w) for k, w in ref.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = {k: torch.randn(w.shape, generator=g, dtype=F64) for k, w in ref.items()}
        for k, w in weights.items():
            w.grad = grads[k].clone()
        model.fc.weight.grad = torch.zeros_like(model.fc.weight)
        opt.step()
        upd = {k: torch.zeros_like(w) for k, w in ref.items()}
        for k in ref:
            buf[k] = beta * buf[k] + (1 - beta) * grads[k]
        for w, sl in blocks:
            k = id(w)
            u = (1 - beta) * grads[k] + beta * buf[k] if nesterov else buf[k]
            blk = sl(u)
            s = 1.0 if adjust == "original" else 0.2 * max(blk.shape) ** 0.5
            target = sl(upd[k])
            target.copy_(polar(blk) * s)
        for k in ref:
            ref[k] = ref[k] * (1 - lr * wd) - lr * upd[k]
    for k, w in weights.items():
        torch.testing.assert_close(w.detach(), ref[k], rtol=1e-12, atol=1e-12)


def _orthonormal_rows(n, d, D, scale, g):
    q, _ = torch.linalg.qr(torch.randn(D, n * d, generator=g, dtype=F64))
    return (q.T * scale).contiguous()  # n blocks of d orthonormal rows (times scale), all mutually orthogonal


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_cm_with_identity_partner_grams_at_lam0(Hkv, nesterov):
    """CM half_split, hybrid=False, lam=0, whitening both, step eta == PerHeadMuon at lr=eta/2 when
    every partner Gram is the identity: B_g B_g^T = I and sum_{h in g} A_h A_h^T = I."""
    H, d, D, eta, beta, wd = 4, 3, 16, 0.1, 0.9, 0.05
    G = H // Hkv
    g = torch.Generator().manual_seed(2)

    def build():
        attn = Attn(D, H, Hkv, d).to(F64)
        with torch.no_grad():
            attn.q_proj.weight.copy_(_orthonormal_rows(H, d, D, G**-0.5, g0()))
            attn.k_proj.weight.copy_(_orthonormal_rows(Hkv, d, D, 1.0, g0(1)))
            attn.v_proj.weight.copy_(_orthonormal_rows(Hkv, d, D, 1.0, g0(2)))
            attn.o_proj.weight.copy_(_orthonormal_rows(H, d, D, G**-0.5, g0(3)).T)
        return attn

    def g0(s=0):
        return torch.Generator().manual_seed(10 + s)

    a1, a2 = build(), build()
    spec = lambda a: [AttentionSpec.separate("attn", a.q_proj, a.k_proj, a.v_proj, a.o_proj, head_dim=d)]  # noqa: E731
    cm = CompositionalMuon(
        [
            dict(
                kind="cm",
                attention=spec(a1),
                lr=eta,
                lam=0.0,
                hybrid=False,
                momentum=beta,
                nesterov=nesterov,
                weight_decay=wd,
                msign_backend="svd",
                root_method="eigh",
            )
        ]
    )
    ph = PerHeadMuon(
        [
            dict(
                kind="heads",
                attention=spec(a2),
                lr=eta / 2,
                momentum=beta,
                nesterov=nesterov,
                weight_decay=2 * wd,
                backend="svd",
            )
        ]
    )
    # a common momentum history: CM's buffer is sum-form (m), Muon's the EMA (1 - beta) m
    for pc, pp in zip(a1.parameters(), a2.parameters()):
        m = torch.randn(pc.shape, generator=g, dtype=F64)
        cm.state[pc]["momentum_buffer"] = m.clone()
        ph.state[pp]["momentum_buffer"] = (1 - beta) * m
        pc.grad = torch.randn(pc.shape, generator=g, dtype=F64)
        pp.grad = pc.grad.clone()
    cm.step()
    ph.step()
    for (n, pc), pp in zip(a1.named_parameters(), a2.parameters()):
        torch.testing.assert_close(pc.detach(), pp.detach(), rtol=1e-12, atol=1e-12, msg=n)


def test_routing_and_muon_groups_and_errors():
    model = _model("separate").to(torch.float32)
    opt = PerHeadMuon.from_model(model)
    kinds = {n: k for n, k, _ in opt.routing}
    assert kinds["attn.q_proj.weight"] == "heads" and kinds["fc.weight"] == "muon" and kinds["embed.weight"] == "adamw"
    with pytest.raises(TypeError, match="unknown PerHeadMuon option"):
        PerHeadMuon.from_model(model, lam=0.1)
    with pytest.raises(ValueError, match="no attention"):
        PerHeadMuon.from_model(nn.Sequential(nn.Linear(4, 4)))
    # a weight only partly covered by the head slices is refused
    w = nn.Parameter(torch.randn(10, 6))
    bad = AttentionSpec("a", 2, 2, 2, HeadSlice(w, 0, 0), HeadSlice(w, 0, 4))
    with pytest.raises(ValueError, match="partly covered"):
        PerHeadMuon([dict(kind="heads", attention=[bad])])


def test_state_dict_round_trip_and_matches_muon_on_non_attention():
    torch.manual_seed(3)
    m1, m2 = _model("separate").float(), _model("separate").float()
    o1 = PerHeadMuon.from_model(m1, msign_dtype=torch.float32)
    mu = Muon([dict(params=[m2.fc.weight], use_muon=True)], msign_dtype=torch.float32)
    for _ in range(2):
        for a, b in zip(m1.parameters(), m2.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        o1.step()
        mu.step()
    torch.testing.assert_close(m1.fc.weight, m2.fc.weight, rtol=0, atol=0)
    sd = o1.state_dict()
    o2 = PerHeadMuon.from_model(m1, msign_dtype=torch.float32)
    o2.load_state_dict(sd)
    assert o2.param_groups[0]["head_blocks"] == o1.param_groups[0]["head_blocks"]
