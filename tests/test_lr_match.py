"""adjust_lr_fn="match_rms_adamw": update RMS 0.2*lr for Muon, per-head Muon and CM (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compositional_muon import AttentionSpec, CompositionalMuon, Muon, PerHeadMuon
from test_per_head import Attn, _orthonormal_rows

F64 = torch.float64


def _attn(seed, H=4, Hkv=2, d=3, D=16):
    torch.manual_seed(seed)
    return Attn(D, H, Hkv, d).to(F64)


def _spec(a, d=3):
    return [AttentionSpec.separate("attn", a.q_proj, a.k_proj, a.v_proj, a.o_proj, head_dim=d)]


def _grads(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=F64)


def _rms(x):
    return x.square().mean().sqrt().item()


def test_muon_and_per_head_updates_have_rms_02_lr():
    lr = 0.01
    w = nn.Parameter(torch.randn(6, 20, dtype=F64))
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    Muon([w], lr=lr, backend="svd", adjust_lr_fn="match_rms_adamw").step()
    assert _rms(w.detach() - w0) == pytest.approx(0.2 * lr, rel=1e-12)
    a = _attn(0)
    w0 = {n: p.detach().clone() for n, p in a.named_parameters()}
    _grads(a, 1)
    PerHeadMuon([dict(kind="heads", attention=_spec(a), lr=lr, backend="svd", adjust_lr_fn="match_rms_adamw")]).step()
    for n, p in a.named_parameters():
        delta = p.detach() - w0[n]
        blocks = delta.split(3, dim=0) if n != "o_proj.weight" else delta.split(3, dim=1)
        for b in blocks:
            assert _rms(b) == pytest.approx(0.2 * lr, rel=1e-12), n


@pytest.mark.parametrize("method", ["half_split", "joint"])
def test_cm_match_keeps_the_direction_and_fixes_each_factors_rms(method):
    lr = 0.01
    runs = {}
    for adjust in ("original", "match_rms_adamw"):
        a = _attn(0)
        w0 = {n: p.detach().clone() for n, p in a.named_parameters()}
        _grads(a, 1)
        CompositionalMuon(
            [dict(kind="cm", attention=_spec(a), lr=lr, method=method, msign_backend="svd", adjust_lr_fn=adjust)]
        ).step()
        runs[adjust] = {n: p.detach() - w0[n] for n, p in a.named_parameters()}
    for n, m in runs["match_rms_adamw"].items():
        o = runs["original"][n]
        assert _rms(m) == pytest.approx(0.2 * lr, rel=1e-12), n
        torch.testing.assert_close(m, o * (_rms(m) / _rms(o)), rtol=1e-12, atol=1e-15)  # same direction


@pytest.mark.parametrize("Hkv", [4, 2])
def test_cm_match_equals_per_head_match_at_the_same_lr_with_identity_partner_grams(Hkv):
    H, d, D, lr = 4, 3, 16, 0.01
    G = H // Hkv

    def build():
        a = Attn(D, H, Hkv, d).to(F64)
        with torch.no_grad():
            a.q_proj.weight.copy_(_orthonormal_rows(H, d, D, G**-0.5, torch.Generator().manual_seed(1)))
            a.k_proj.weight.copy_(_orthonormal_rows(Hkv, d, D, 1.0, torch.Generator().manual_seed(2)))
            a.v_proj.weight.copy_(_orthonormal_rows(Hkv, d, D, 1.0, torch.Generator().manual_seed(3)))
            a.o_proj.weight.copy_(_orthonormal_rows(H, d, D, G**-0.5, torch.Generator().manual_seed(4)).T)
        return a

    a1, a2 = build(), build()
    _grads(a1, 5)
    _grads(a2, 5)
    CompositionalMuon(
        [
            dict(
                kind="cm",
                attention=_spec(a1),
                lr=lr,
                lam=0.0,
                hybrid=False,
                msign_backend="svd",
                root_method="eigh",
                adjust_lr_fn="match_rms_adamw",
            )
        ]
    ).step()
    PerHeadMuon(
        [dict(kind="heads", attention=_spec(a2), lr=lr, backend="svd", nesterov=False, adjust_lr_fn="match_rms_adamw")]
    ).step()
    for (n, p1), p2 in zip(a1.named_parameters(), a2.parameters()):
        torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-12, atol=1e-12, msg=n)


def test_cm_from_model_passes_the_option_to_muon_and_rejects_unknown():
    from compositional_muon.training.models import build_model

    model = build_model("gpt", n_layer=1, n_embd=16, n_head=2)
    opt = CompositionalMuon.from_model(model, adjust_lr_fn="match_rms_adamw")
    assert [g["adjust_lr_fn"] for g in opt.param_groups if g["kind"] != "adamw"] == ["match_rms_adamw"] * 2
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        CompositionalMuon.from_model(model, adjust_lr_fn="rms")
