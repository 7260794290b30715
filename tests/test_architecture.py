"""The structure's contracts: one CM config with one set of defaults, typed pair layouts, the msign
schedule shared by every path, and strategies pluggable without touching the CM math."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compositional_muon as cmu
from compositional_muon.cm import CMConfig, pair_update
from compositional_muon.compositional import CM_DEFAULTS, pair_layouts
from compositional_muon.msign import DEFAULT_STEPS, POLAR_EXPRESS_COEFFS, msign, msign_schedule
from compositional_muon.parallel import Parallel, SingleProcess, gram_msign
from compositional_muon.plan import HeadRef, PairLayout

F64 = torch.float64


def rnd(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_cm_defaults_come_from_cmconfig():
    ref = CMConfig()
    for f in dataclasses.fields(CMConfig):
        if f.name != "root_iters":
            assert CM_DEFAULTS[f.name] == getattr(ref, f.name), f.name
    assert ref.hybrid is True  # the reference's default for OV
    assert ref.for_kind("qk").hybrid is False and ref.for_kind("ov") is ref


def _ov_inputs(seed):
    wv, wo = rnd(8, 12, seed=seed), rnd(12, 16, seed=seed + 1)
    gv, go = rnd(8, 12, seed=seed + 2), rnd(12, 16, seed=seed + 3)
    return wv, wo, gv, go, torch.zeros_like(wv), torch.zeros_like(wo)


@pytest.mark.parametrize("options", [dict(), dict(hybrid=False, lam=0.1), dict(isotropic=True, msign_backend="svd")])
def test_cm_ov_config_object_equals_keywords_and_defaults(options):
    a, b = _ov_inputs(0), _ov_inputs(0)
    cmu.cm_ov(*a, head_dim=4, eta=0.1, msign_dtype=F64, **options)
    cmu.cm_ov(*b, head_dim=4, eta=0.1, config=CMConfig(msign_dtype=F64, **options))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_cm_qk_rejects_ov_options_and_unknown_keywords():
    wq, wk = rnd(16, 12), rnd(8, 12)
    args = (wq, wk, wq.clone(), wk.clone(), torch.zeros_like(wq), torch.zeros_like(wk))
    with pytest.raises(TypeError, match="hybrid is an OV option"):
        cmu.cm_qk(*args, head_dim=4, eta=0.1, hybrid=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lamda'\]"):
        cmu.cm_qk(*args, head_dim=4, eta=0.1, lamda=0.1)
    with pytest.raises(TypeError, match="`config` must be a CMConfig"):
        cmu.cm_qk(*args, head_dim=4, eta=0.1, config=dict(lam=0.1))


def test_pair_layout_round_trips_and_views():
    layout = PairLayout("l0.qk", "qk", 4, 4, 2, HeadRef(0, 0, 0, 4), HeadRef(1, 0, 0, 4))
    assert PairLayout.from_dict(layout.to_dict()) == layout
    wq, wk = rnd(16, 12), rnd(8, 12)
    A, B = layout.views(wq, wk)
    assert A.shape == (4, 4, 12) and B.shape == (2, 4, 12) and A.data_ptr() == wq.data_ptr()
    with pytest.raises(ValueError, match="not a multiple"):
        PairLayout("x", "qk", 4, 3, 2, HeadRef(0, 0, 0, 4), HeadRef(1, 0, 0, 4))
    with pytest.raises(ValueError, match="unknown CM pair kind"):
        PairLayout("x", "mlp", 4, 4, 2, HeadRef(0, 0, 0, 4), HeadRef(1, 0, 0, 4))


def test_optimizer_groups_hold_serialized_layouts():
    from compositional_muon.training.models import build_model

    model = build_model("gpt", vocab_size=16, n_layer=2, n_embd=16, n_head=4, n_kv_head=2, block_size=8)
    opt = cmu.CompositionalMuon.from_model(model)
    group = opt.param_groups[0]
    layouts = pair_layouts(group)
    assert [p.to_dict() for p in layouts] == group["cm_pairs"]
    assert {p.kind for p in layouts} == {"qk", "ov"} and all(p.group_size == 2 for p in layouts)


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("steps", [None, 3, 11])
def test_gram_msign_runs_msigns_schedule(backend, steps):
    # msign from the Gram alone (float64) equals msign itself in float64, for the same schedule
    X = rnd(3, 5, 20, seed=2)
    got = gram_msign(X, X @ X.mT, 20, backend, steps)
    torch.testing.assert_close(got, msign(X, backend, steps, dtype=F64), rtol=0, atol=1e-10)
    sched = msign_schedule(backend, steps)
    assert len(sched.coeffs) == (DEFAULT_STEPS[backend] if steps is None else steps)
    if backend == "polar_express" and steps == 11:
        assert sched.coeffs[-4:] == (POLAR_EXPRESS_COEFFS[-1],) * 4
    with pytest.raises(ValueError, match="no polynomial schedule"):
        msign_schedule("svd")


class _Counting(SingleProcess):
    """A registered strategy for tensors tagged ``_counted``: one class, no change to the math."""

    calls: list = []
    shape = (8, 6)

    @classmethod
    def claims(cls, t, parallel):
        return tuple(t.shape) == cls.shape

    def matrices(self, mats, compute):
        _Counting.calls.append(len(mats))
        return super().matrices(mats, compute)


def test_a_registered_strategy_is_used_and_gives_the_same_step():
    def run():
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(5, 7))]
        opt = cmu.Muon(ws, msign_dtype=torch.float32)
        for w in ws:
            w.grad = torch.randn_like(w)
        opt.step()
        return [w.detach().clone() for w in ws]

    plain = run()
    Parallel.register(_Counting)
    try:
        _Counting.calls.clear()
        got = run()
        assert _Counting.calls == [1]  # only the (8, 6) matrix was claimed
        assert all(torch.equal(x, y) for x, y in zip(got, plain))
    finally:
        Parallel.registered.remove(_Counting)


def test_pair_update_has_one_definition():
    # the sharded reducer plugs into the same function; no second copy of the CM update exists
    import compositional_muon.distributed as legacy
    import compositional_muon.parallel.reducer as red

    assert not hasattr(red, "pair_update") and not hasattr(legacy, "sharded_pair_update")
    A, B, Ua, Ub = rnd(1, 4, 4, 12), rnd(1, 2, 4, 12, seed=1), rnd(1, 4, 4, 12, seed=2), rnd(1, 2, 4, 12, seed=3)
    cfg = CMConfig(msign_dtype=F64)
    dA, dB = pair_update(A, B, Ua, Ub, 0.1, cfg)
    assert dA.shape == A.shape and dB.shape == B.shape
