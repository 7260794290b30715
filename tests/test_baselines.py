"""Circuit-Muon baseline: an independent per-head transcription of its OV rule."""

import copy

import torch

from compositional_muon.baselines import CircuitMuon
from test_compositional import TinyGPT, batch, train


def polar(x):
    U, _, Vh = torch.linalg.svd(x, full_matrices=False)
    return U @ Vh


def test_circuit_muon_matches_transcription():
    torch.manual_seed(0)
    m = TinyGPT(L=1, H=4).double()
    ref = copy.deepcopy(m)
    lr, lam, d, H = 0.05, 1e-3, 8, 4
    opt = CircuitMuon.from_model(m, lr=lr, lam=lam, backend="svd", momentum=0.0)
    assert len(opt.ov_pairs) == 1
    for model in (m, ref):
        model(*batch())[1].backward()
    opt.step()
    a = ref.blocks[0].attn
    Wv, Wo = a.v_proj.weight.detach(), a.o_proj.weight.detach()
    dV = -lr * polar(a.v_proj.weight.grad)
    dO = -lr * polar(a.o_proj.weight.grad)
    nV, nO = dV.norm(), dO.norm()
    dV, dO = dV.clone(), dO.clone()
    for h in range(H):
        r, c = slice(h * d, (h + 1) * d), slice(h * d, (h + 1) * d)
        dV[r] *= (Wo[:, c].square().sum() / d + lam) ** -0.5
        dO[:, c] *= (Wv[r].square().sum() / d + lam) ** -0.5
    dV, dO = dV * nV / dV.norm(), dO * nO / dO.norm()
    for h in range(H):
        r, c = slice(h * d, (h + 1) * d), slice(h * d, (h + 1) * d)
        x = ((Wv[r] * dV[r]).sum() - (Wo[:, c] * dO[:, c]).sum()) / (
            Wv[r].square().sum() + Wo[:, c].square().sum() + 2 * d * lam
        )
        dV[r] -= x * Wv[r]
        dO[:, c] += x * Wo[:, c]
    torch.testing.assert_close(m.blocks[0].attn.v_proj.weight, Wv + dV, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.blocks[0].attn.o_proj.weight, Wo + dO, rtol=0, atol=1e-12)
    # everything else is plain Muon (QK included)
    torch.testing.assert_close(
        m.blocks[0].attn.q_proj.weight, a.q_proj.weight.detach() - lr * polar(a.q_proj.weight.grad), rtol=0, atol=1e-12
    )


def test_circuit_muon_trains():
    torch.manual_seed(1)
    m = TinyGPT()
    losses = train(m, CircuitMuon.from_model(m, lr=0.02, adamw_lr=3e-3), 40)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
